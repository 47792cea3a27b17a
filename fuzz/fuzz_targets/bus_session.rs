//! Arbitrary bytes from three clients into the bus's session and broker, with connections
//! lost and time passing: whatever arrives, no panic, and everything the broker sends
//! decodes again with the `mqtt-proto` crate.
//!
//! Input: one byte of broker settings (bit 0: durable, as with `--data`; bit 1: a queue of
//! 2 messages and a window of 1, so the caps are reached), then chunks, each a head byte
//! and its bytes. Head bits 0-1: the client (0-2), or 3 for "a client lost its connection"
//! (which one: bits 2-6 modulo 3; no bytes follow); bits 2-6: the chunk length - 1; bit 7:
//! a second passes first (delayed wills, expiries, keep-alives). Seeds: `fuzz/corpus/bus_session/`, made by
//! `fuzz/bus_session_seeds.py`.
//!
//! `cargo fuzz run bus_session --sanitizer none fuzz/corpus/bus_session`
#![no_main]

use libfuzzer_sys::fuzz_target;
use socklab::bus::broker::{AllowAll, Broker, BrokerConfig, Identity, Out};
use socklab::bus::codec::mqtt_proto::{self, v5::ErrorV5, v5::PropertyId};
use socklab::bus::codec::{PublishHeader, Version};
use socklab::bus::session::{Inbound, Session, SessionConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 3;

fuzz_target!(|data: &[u8]| {
    let Some((&settings, mut rest)) = data.split_first() else {
        return;
    };
    let mut now = Instant::now();
    let cfg = SessionConfig {
        max_packet: 4096,
        ..Default::default()
    };
    let mut bcfg = BrokerConfig {
        durable: settings & 1 != 0,
        max_subscriptions: 8,
        ..Default::default()
    };
    if settings & 2 != 0 {
        bcfg.max_queued = 2;
        bcfg.max_inflight = 1;
    }
    let mut broker = Broker::new(bcfg, Arc::new(AllowAll), now);
    let mut sessions: Vec<Session> = (0..CLIENTS).map(|_| Session::new(cfg, now)).collect();
    // Connection ids change when a client reconnects, as the server's do.
    let mut conn: Vec<u64> = (0..CLIENTS as u64).collect();
    while let Some((&head, tail)) = rest.split_first() {
        if head & 0x80 != 0 {
            now += Duration::from_secs(1);
        }
        let len = ((head >> 2) & 0x1f) as usize + 1;
        let who = (head & 3) as usize;
        if who == 3 {
            rest = tail;
            let c = (len - 1) % CLIENTS;
            broker.closed(conn[c], true, now);
            conn[c] += CLIENTS as u64;
            sessions[c] = Session::new(cfg, now);
        } else {
            let (chunk, next) = tail.split_at(len.min(tail.len()));
            rest = next;
            let mut events = Vec::new();
            if let Err(v) = sessions[who].receive(chunk, now, &mut events) {
                sessions[who].violation(&v);
            }
            for e in events {
                match e {
                    Inbound::Connect(version, c) => {
                        broker.connect(conn[who], version, *c, Identity::default(), now)
                    }
                    Inbound::Packet(p) => broker.packet(conn[who], p, now),
                }
            }
        }
        broker.tick(now);
        for (id, out) in std::mem::take(&mut broker.out) {
            let Some(c) = conn.iter().position(|&x| x == id) else {
                continue; // a connection lost meanwhile
            };
            let s = &mut sessions[c];
            s.out.clear();
            match out {
                Out::Packet(p) => s.send(&p),
                Out::Publish(d) => {
                    let h = PublishHeader {
                        qos: d.qos,
                        pid: d.pid,
                        dup: d.dup,
                        retain: d.retain,
                        sub_ids: &d.sub_ids,
                        alias: None,
                        expiry: d.msg.expiry_left(now),
                    };
                    s.deliver(&d.msg, h);
                }
                Out::Close(r) => {
                    if let Some(r) = r {
                        s.disconnect(r);
                    }
                    broker.closed(id, false, now);
                }
            }
            decodes(s.version(), &s.out);
        }
        broker.ops.clear();
        broker.gated.clear();
    }
});

/// Everything the broker wrote for a client decodes, packet by packet.
fn decodes(version: Version, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let (_, total) = socklab::bus::codec::frame(bytes, usize::MAX >> 4)
            .expect("a valid fixed header")
            .expect("a whole packet");
        let p = &bytes[..total];
        if version.is_v5() {
            match mqtt_proto::v5::Packet::decode(p) {
                Ok(packet) => assert!(packet.is_some(), "complete: {p:02x?}"),
                // A PUBLISH to overlapping subscriptions carries several identifiers, which
                // 5.0 allows from a server and the crate's decoder (made for servers) not.
                Err(ErrorV5::DuplicatedProperty(PropertyId::SubscriptionIdentifier)) => {}
                Err(e) => panic!("{e}: {p:02x?}"),
            }
        } else {
            mqtt_proto::v3::Packet::decode(p)
                .unwrap_or_else(|e| panic!("{e}: {p:02x?}"))
                .expect("complete");
        }
        bytes = &bytes[total..];
    }
}
