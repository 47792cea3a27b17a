//! Arbitrary bytes from two clients into the bus's session and broker: whatever arrives, no
//! panic, and the broker's outputs can always be encoded.
//!
//! `cargo fuzz run bus_session --sanitizer none`
#![no_main]

use libfuzzer_sys::fuzz_target;
use socklab::bus::broker::{AllowAll, Broker, BrokerConfig, Identity, Out};
use socklab::bus::codec::PublishHeader;
use socklab::bus::session::{Inbound, Session, SessionConfig};
use std::sync::Arc;
use std::time::Instant;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let cfg = SessionConfig {
        max_packet: 4096,
        ..Default::default()
    };
    let mut broker = Broker::new(BrokerConfig::default(), Arc::new(AllowAll), now);
    let mut sessions = [Session::new(cfg, now), Session::new(cfg, now)];
    // The first byte of each chunk picks the client and the chunk length.
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let who = (head & 1) as usize;
        let len = ((head >> 1) as usize + 1).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        let mut events = Vec::new();
        if let Err(v) = sessions[who].receive(chunk, now, &mut events) {
            sessions[who].violation(&v);
        }
        for e in events {
            match e {
                Inbound::Connect(version, c) => {
                    broker.connect(who as u64, version, *c, Identity::default(), now)
                }
                Inbound::Packet(p) => broker.packet(who as u64, p, now),
            }
        }
        broker.tick(now);
        for (conn, out) in std::mem::take(&mut broker.out) {
            let s = &mut sessions[conn as usize];
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
                    broker.closed(conn, true, now);
                }
            }
            s.out.clear();
        }
        broker.ops.clear();
    }
});
