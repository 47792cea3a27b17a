//! The routing core, without I/O: (connection, packet) events in, (connection, packet)
//! deliveries out.
//!
//! It keeps what MQTT calls the *session* (it outlives connections): subscriptions, the QoS
//! 1/2 messages in flight with their packet identifiers, the queue of messages waiting for
//! the flow-control window or for an offline client to return, QoS 2 identifiers received
//! and not yet released, the will, and the session's expiry. Beside the sessions: the topic
//! trie, the retained messages, and the `$SYS` statistics.
//!
//! Routing is in two steps so that rules other than a topic match can use the second:
//! [`Broker::route`] finds the subscribers of a topic, and [`Broker::deliver`] puts a message
//! into one client's session (its window, else its queue) -- the later "call one named
//! connection" routing of the D-Bus half is a `deliver` to the name's owner. Every decision
//! about who may connect, publish or subscribe goes through an [`Authorizer`].
//!
//! Persistence sits behind the core: every change to a persistent session or to the retained
//! set is also written as a [`StoreOp`] for the store to commit, and acknowledgements of QoS
//! 1/2 publications are held in a separate list that the server releases only once the store
//! says the batch is durable.

use super::codec::{Message, Version};
use super::store::{Record, StoreOp, StoredMsg};
use super::topic::{parse_filter, ClientIx, Matches, SubOpts, Trie};
use crate::model::evloop::Slab;
use bytes::Bytes;
use mqtt_proto::v5::{self, ConnectReasonCode as Crc, DisconnectReasonCode as Drc};
use mqtt_proto::{Pid, QoS, QosPid, TopicFilter};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connection, as the server names it: unique for the life of the process.
pub type ConnId = u64;

/// Who is at the other end of a connection (for the authorizer, and the logs).
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The peer's address.
    pub peer: String,
    /// The peer's uid, for a Unix-socket connection (`SO_PEERCRED`).
    pub peer_uid: Option<u32>,
    /// The CONNECT user name.
    pub username: Option<Arc<str>>,
    /// The client identifier (assigned if the client sent none).
    pub client_id: Arc<str>,
}

/// Decides who may connect, publish and subscribe.
pub trait Authorizer: Send + Sync + std::fmt::Debug {
    /// May this client connect (with this password)?
    ///
    /// # Errors
    /// The CONNACK reason code that refuses it.
    fn connect(&self, who: &Identity, password: Option<&[u8]>) -> Result<(), Crc>;
    /// May it publish to `topic`?
    fn publish(&self, who: &Identity, topic: &str) -> bool;
    /// May it subscribe to `filter`?
    fn subscribe(&self, who: &Identity, filter: &str) -> bool;
}

/// Everyone may do everything (the default, as with mosquitto without a password file).
#[derive(Debug, Default)]
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn connect(&self, _: &Identity, _: Option<&[u8]>) -> Result<(), Crc> {
        Ok(())
    }
    fn publish(&self, _: &Identity, _: &str) -> bool {
        true
    }
    fn subscribe(&self, _: &Identity, _: &str) -> bool {
        true
    }
}

/// Limits and settings of the broker.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// QoS 1/2 messages in flight to one client (further capped by its receive maximum).
    pub max_inflight: u16,
    /// Messages queued for one client (beyond those in flight).
    pub max_queued: usize,
    /// Bytes queued for one client.
    pub max_queued_bytes: usize,
    /// Bytes queued for all clients together.
    pub max_total_bytes: usize,
    /// Largest packet accepted (sent in CONNACK).
    pub max_packet: u32,
    /// Topic aliases a client may use (sent in CONNACK).
    pub topic_alias_max: u16,
    /// QoS 1/2 publications a client may leave unacknowledged (sent in CONNACK).
    pub receive_max: u16,
    /// Longest keep-alive accepted; a longer or zero one is replaced (server keep-alive).
    pub max_keep_alive: Option<u16>,
    /// How often `$SYS` is published.
    pub sys_interval: Duration,
    /// Whether acknowledgements wait for the store.
    pub durable: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_inflight: 20,
            max_queued: 1000,
            max_queued_bytes: 16 << 20,
            max_total_bytes: 1 << 30,
            max_packet: 1 << 20,
            topic_alias_max: 64,
            receive_max: 1024,
            max_keep_alive: None,
            sys_interval: Duration::from_secs(10),
            durable: false,
        }
    }
}

/// Counters shared with the server (which adds the byte counts).
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// PUBLISH packets received.
    pub msgs_in: AtomicU64,
    /// PUBLISH packets sent.
    pub msgs_out: AtomicU64,
    /// Messages dropped (queue caps, slow subscribers, expiry).
    pub dropped: AtomicU64,
}

/// One delivery of a message to a connection.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub msg: Arc<Message>,
    /// QoS of this delivery.
    pub qos: u8,
    /// Packet identifier (QoS 1/2).
    pub pid: u16,
    /// A redelivery.
    pub dup: bool,
    /// RETAIN flag as sent.
    pub retain: bool,
    /// Subscription identifiers.
    pub sub_ids: Vec<u32>,
}

fn pkt(p: v5::Packet) -> Out {
    Out::Packet(Box::new(p))
}

/// What the broker asks of a connection.
#[derive(Debug)]
pub enum Out {
    /// Send this control packet (boxed: most outputs are deliveries, which are small).
    Packet(Box<v5::Packet>),
    /// Send this PUBLISH.
    Publish(Delivery),
    /// Close the connection (after a DISCONNECT with this reason, for 5.0).
    Close(Option<Drc>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flight {
    /// PUBLISH sent, awaiting PUBACK (QoS 1) or PUBREC (QoS 2).
    Sent,
    /// PUBREL sent, awaiting PUBCOMP.
    Released,
}

#[derive(Debug, Clone)]
struct Pending {
    msg: Arc<Message>,
    qos: u8,
    retain: bool,
    sub_ids: Vec<u32>,
    /// Store key (0 when not persisted).
    seq: u64,
}

#[derive(Debug)]
struct Inflight {
    pid: u16,
    state: Flight,
    p: Pending,
}

#[derive(Debug, Clone)]
struct Will {
    msg: Message,
    delay: u32,
}

#[derive(Debug)]
struct Client {
    id: Arc<str>,
    conn: Option<ConnId>,
    version: Version,
    identity: Identity,
    /// Session expiry interval in seconds (`u32::MAX`: never).
    expiry: u32,
    expires_at: Option<Instant>,
    subs: HashMap<Arc<str>, SubOpts>,
    inflight: VecDeque<Inflight>,
    window: usize,
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    next_pid: u16,
    rx_qos2: HashSet<u16>,
    will: Option<Will>,
    will_at: Option<Instant>,
    next_seq: u64,
    dropped: u64,
}

impl Client {
    fn persistent(&self) -> bool {
        self.expiry > 0
    }

    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            let p = self.next_pid;
            if !self.inflight.iter().any(|f| f.pid == p) {
                return p;
            }
        }
    }

    fn record(&self) -> Record {
        Record {
            client: self.id.clone(),
            expiry: self.expiry,
            v5: self.version.is_v5(),
            subs: self.subs.iter().map(|(f, o)| (f.clone(), *o)).collect(),
        }
    }
}

/// The broker's state.
#[derive(Debug)]
pub struct Broker {
    cfg: BrokerConfig,
    auth: Arc<dyn Authorizer>,
    clients: Slab<Client>,
    by_id: HashMap<Arc<str>, ClientIx>,
    conns: HashMap<ConnId, ClientIx>,
    trie: Trie,
    retained: HashMap<Arc<str>, Arc<Message>>,
    total_queued: usize,
    /// Shared counters.
    pub stats: Arc<Stats>,
    started: Instant,
    next_sys: Instant,
    assigned: u64,
    matches: Matches,
    /// Deliveries and packets for connections, in order.
    pub out: Vec<(ConnId, Out)>,
    /// Acknowledgements to send once `ops` are durable (with `--data`).
    pub gated: Vec<(ConnId, Out)>,
    /// Changes for the store.
    pub ops: Vec<StoreOp>,
}

impl Broker {
    /// An empty broker.
    pub fn new(cfg: BrokerConfig, auth: Arc<dyn Authorizer>, now: Instant) -> Broker {
        Broker {
            next_sys: now,
            cfg,
            auth,
            clients: Slab::new(),
            by_id: HashMap::new(),
            conns: HashMap::new(),
            trie: Trie::new(),
            retained: HashMap::new(),
            total_queued: 0,
            stats: Arc::new(Stats::default()),
            started: now,
            assigned: 0,
            matches: Matches::default(),
            out: Vec::new(),
            gated: Vec::new(),
            ops: Vec::new(),
        }
    }

    /// Number of sessions (connected or not).
    pub fn sessions(&self) -> usize {
        self.clients.len()
    }

    /// Number of subscriptions.
    pub fn subscriptions(&self) -> usize {
        self.trie.len()
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Bytes queued for all clients.
    pub fn queued_bytes(&self) -> usize {
        self.total_queued
    }

    fn send(&mut self, conn: ConnId, out: Out) {
        self.out.push((conn, out));
    }

    fn ack(&mut self, conn: ConnId, p: v5::Packet) {
        if self.cfg.durable {
            self.gated.push((conn, pkt(p)));
        } else {
            self.out.push((conn, pkt(p)));
        }
    }

    /// Put back what the store kept (at start-up, before any connection).
    pub fn restore(
        &mut self,
        records: Vec<Record>,
        queued: Vec<StoredMsg>,
        retained: Vec<Message>,
        rx: Vec<(Arc<str>, u16)>,
        now: Instant,
    ) {
        for m in retained {
            self.retained.insert(m.topic.clone(), Arc::new(m));
        }
        for r in records {
            let ix = self.new_client(
                r.client.clone(),
                if r.v5 { Version::V5 } else { Version::V311 },
                Identity {
                    client_id: r.client.clone(),
                    ..Default::default()
                },
            );
            let c = &mut self.clients.get_mut(ix).expect("just added");
            c.expiry = r.expiry;
            c.expires_at =
                (r.expiry != u32::MAX).then(|| now + Duration::from_secs(r.expiry as u64));
            for (f, o) in r.subs {
                if let Some(pf) = parse_filter(&f) {
                    self.trie.insert(&pf, ix, o);
                }
                self.clients.get_mut(ix).expect("present").subs.insert(f, o);
            }
        }
        for (client, pid) in rx {
            if let Some(&ix) = self.by_id.get(&client) {
                self.clients
                    .get_mut(ix)
                    .expect("present")
                    .rx_qos2
                    .insert(pid);
            }
        }
        let mut queued = queued;
        queued.sort_by_key(|q| q.seq);
        for q in queued {
            let Some(&ix) = self.by_id.get(&q.client) else {
                continue;
            };
            let cost = q.msg.cost();
            self.total_queued += cost;
            let c = self.clients.get_mut(ix).expect("present");
            c.next_seq = c.next_seq.max(q.seq + 1);
            c.queued_bytes += cost;
            let p = Pending {
                msg: Arc::new(q.msg),
                qos: q.qos,
                retain: q.retain,
                sub_ids: q.sub_ids,
                seq: q.seq,
            };
            if q.pid != 0 {
                c.inflight.push_back(Inflight {
                    pid: q.pid,
                    state: if q.released {
                        Flight::Released
                    } else {
                        Flight::Sent
                    },
                    p,
                });
                c.next_pid = c.next_pid.max(q.pid);
            } else {
                c.queue.push_back(p);
            }
        }
    }

    fn new_client(&mut self, id: Arc<str>, version: Version, identity: Identity) -> ClientIx {
        let ix = self.clients.insert(Client {
            id: id.clone(),
            conn: None,
            version,
            identity,
            expiry: 0,
            expires_at: None,
            subs: HashMap::new(),
            inflight: VecDeque::new(),
            window: self.cfg.max_inflight.max(1) as usize,
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_pid: 0,
            rx_qos2: HashSet::new(),
            will: None,
            will_at: None,
            next_seq: 1,
            dropped: 0,
        });
        self.by_id.insert(id, ix);
        ix
    }

    /// Remove a session entirely: its subscriptions leave the trie, its queue is freed.
    fn discard(&mut self, ix: ClientIx) {
        let Some(c) = self.clients.remove(ix) else {
            return;
        };
        for f in c.subs.keys() {
            if let Some(pf) = parse_filter(f) {
                self.trie.remove(&pf, ix);
            }
        }
        self.total_queued -= c.queued_bytes;
        if self.by_id.get(&c.id) == Some(&ix) {
            self.by_id.remove(&c.id);
        }
        if c.persistent() {
            self.ops.push(StoreOp::DropSession(c.id.clone()));
        }
    }

    /// A client sent CONNECT on `conn`.
    pub fn connect(
        &mut self,
        conn: ConnId,
        version: Version,
        c: v5::Connect,
        mut identity: Identity,
        now: Instant,
    ) {
        let refuse = |b: &mut Broker, code: Crc| {
            b.send(
                conn,
                pkt(v5::Packet::Connack(v5::Connack::new(false, code))),
            );
            b.send(conn, Out::Close(None));
        };
        let mut assigned = None;
        let id: Arc<str> = if c.client_id.is_empty() {
            if !version.is_v5() && !c.clean_start {
                // 3.1.1: a zero-length identifier needs a clean session.
                return refuse(self, Crc::ClientIdentifierNotValid);
            }
            self.assigned += 1;
            let id: Arc<str> = format!("socklab-{}-{}", std::process::id(), self.assigned).into();
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        identity.client_id = id.clone();
        identity.username = c.username.clone();
        if let Err(code) = self.auth.connect(&identity, c.password.as_deref()) {
            tracing::info!(client = %id, peer = %identity.peer, ?code, "connection refused");
            return refuse(self, code);
        }
        let expiry = if version.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        // An existing session: take it over (closing its connection) or discard it.
        let mut present = false;
        if let Some(&ix) = self.by_id.get(&id) {
            let old_conn = self.clients.get_mut(ix).and_then(|cl| cl.conn.take());
            if let Some(old) = old_conn {
                self.conns.remove(&old);
                self.send(old, Out::Close(Some(Drc::SessionTakenOver)));
                // The old connection ended without DISCONNECT: its will goes out, unless a
                // will delay lets the resumed session cancel it.
                let cl = self.clients.get_mut(ix).expect("present");
                if let Some(w) = cl.will.take() {
                    if w.delay == 0 || c.clean_start {
                        self.publish_will(w.msg, now);
                    }
                }
            }
            if c.clean_start {
                self.discard(ix);
            } else {
                present = true;
            }
        }
        let ix = match self.by_id.get(&id) {
            Some(&ix) => ix,
            None => self.new_client(id.clone(), version, identity.clone()),
        };
        let cfg_inflight = self.cfg.max_inflight.max(1) as usize;
        let cl = self.clients.get_mut(ix).expect("present");
        cl.conn = Some(conn);
        cl.version = version;
        cl.identity = identity;
        cl.expiry = expiry;
        cl.expires_at = None;
        cl.will_at = None;
        cl.window = cfg_inflight.min(c.properties.receive_max.unwrap_or(u16::MAX) as usize);
        cl.will = c.last_will.as_ref().map(|w| {
            let mut pubw = v5::Publish::new(
                match w.qos {
                    QoS::Level0 => QosPid::Level0,
                    QoS::Level1 => QosPid::Level1(Pid::default()),
                    QoS::Level2 => QosPid::Level2(Pid::default()),
                },
                w.topic_name.clone(),
                w.payload.clone(),
            );
            pubw.retain = w.retain;
            let wp = &w.properties;
            pubw.properties.payload_is_utf8 = wp.payload_is_utf8;
            pubw.properties.message_expiry_interval = wp.message_expiry_interval;
            pubw.properties.content_type = wp.content_type.clone();
            pubw.properties.response_topic = wp.response_topic.clone();
            pubw.properties.correlation_data = wp.correlation_data.clone();
            pubw.properties.user_properties = wp.user_properties.clone();
            let mut msg = Message::from_publish(&pubw, Arc::from(&*w.topic_name), now);
            msg.expires = None;
            Will {
                msg,
                delay: wp.delay_interval.unwrap_or(0),
            }
        });
        let persistent = cl.persistent();
        let record = cl.record();
        self.conns.insert(conn, ix);
        if persistent {
            self.ops.push(StoreOp::Session(record));
        }
        let mut ack = v5::Connack::new(present, Crc::Success);
        if version.is_v5() {
            let p = &mut ack.properties;
            p.receive_max = Some(self.cfg.receive_max);
            p.max_packet_size = Some(self.cfg.max_packet);
            p.topic_alias_max = Some(self.cfg.topic_alias_max);
            p.retain_available = Some(true);
            p.wildcard_subscription_available = Some(true);
            p.subscription_id_available = Some(true);
            p.shared_subscription_available = Some(true);
            p.assigned_client_id = assigned;
            if let Some(max) = self.cfg.max_keep_alive {
                if c.keep_alive == 0 || c.keep_alive > max {
                    p.server_keep_alive = Some(max);
                }
            }
            if c.properties.request_response_info == Some(true) {
                p.response_info = Some(format!("socklab/response/{id}").into());
            }
        }
        self.send(conn, pkt(v5::Packet::Connack(ack)));
        if present {
            self.resume(ix, now);
        }
    }

    /// Resend what was in flight (PUBLISH with DUP, or PUBREL), then fill the window.
    fn resume(&mut self, ix: ClientIx, now: Instant) {
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        let Some(conn) = cl.conn else {
            return;
        };
        let mut outs = Vec::new();
        for f in &cl.inflight {
            outs.push(match f.state {
                Flight::Sent => Out::Publish(Delivery {
                    msg: f.p.msg.clone(),
                    qos: f.p.qos,
                    pid: f.pid,
                    dup: true,
                    retain: f.p.retain,
                    sub_ids: f.p.sub_ids.clone(),
                }),
                Flight::Released => pkt(v5::Packet::Pubrel(v5::Pubrel::new_success(
                    Pid::try_from(f.pid).expect("nonzero"),
                ))),
            });
        }
        for o in outs {
            self.send(conn, o);
        }
        self.refill(ix, now);
    }

    /// Move queued messages into the flight window while it has room.
    fn refill(&mut self, ix: ClientIx, now: Instant) {
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        let Some(conn) = cl.conn else {
            return;
        };
        let mut outs = Vec::new();
        let mut freed = 0;
        let mut dropped = 0;
        let persistent = cl.persistent();
        let mut ops = Vec::new();
        while cl.inflight.len() < cl.window {
            let Some(p) = cl.queue.pop_front() else {
                break;
            };
            let cost = p.msg.cost();
            cl.queued_bytes -= cost;
            freed += cost;
            if p.msg.expired(now) {
                dropped += 1;
                if p.seq != 0 {
                    ops.push(StoreOp::Unqueue(cl.id.clone(), p.seq));
                }
                continue;
            }
            if p.qos == 0 {
                outs.push(Out::Publish(Delivery {
                    msg: p.msg,
                    qos: 0,
                    pid: 0,
                    dup: false,
                    retain: p.retain,
                    sub_ids: p.sub_ids,
                }));
                continue;
            }
            let pid = cl.alloc_pid();
            if persistent && p.seq != 0 {
                ops.push(StoreOp::Flight(cl.id.clone(), p.seq, pid, false));
            }
            // Its bytes stay counted while in flight.
            cl.queued_bytes += cost;
            freed -= cost;
            outs.push(Out::Publish(Delivery {
                msg: p.msg.clone(),
                qos: p.qos,
                pid,
                dup: false,
                retain: p.retain,
                sub_ids: p.sub_ids.clone(),
            }));
            cl.inflight.push_back(Inflight {
                pid,
                state: Flight::Sent,
                p,
            });
        }
        self.total_queued -= freed;
        self.ops.extend(ops);
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        for o in outs {
            self.send(conn, o);
        }
    }

    /// Put `msg` into client `ix`'s session with this QoS: straight out if the window has
    /// room, else queued (capped: past `--max-queued` or the byte caps the message is dropped
    /// and counted). QoS 0 is not queued for an offline client.
    pub fn deliver(
        &mut self,
        ix: ClientIx,
        msg: Arc<Message>,
        qos: u8,
        retain: bool,
        sub_ids: Vec<u32>,
        now: Instant,
    ) {
        let max_queued = self.cfg.max_queued;
        let max_bytes = self.cfg.max_queued_bytes;
        let total_room = self.cfg.max_total_bytes.saturating_sub(self.total_queued);
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        if qos == 0 {
            if let Some(conn) = cl.conn {
                self.out.push((
                    conn,
                    Out::Publish(Delivery {
                        msg,
                        qos: 0,
                        pid: 0,
                        dup: false,
                        retain,
                        sub_ids,
                    }),
                ));
            }
            return;
        }
        let cost = msg.cost();
        if cl.conn.is_some()
            && cl.queue.is_empty()
            && cl.inflight.len() < cl.window
            && cost <= total_room
        {
            let pid = cl.alloc_pid();
            let seq = if cl.persistent() {
                cl.next_seq += 1;
                self.ops.push(StoreOp::Queue(StoredMsg {
                    client: cl.id.clone(),
                    seq: cl.next_seq,
                    msg: (*msg).clone(),
                    qos,
                    retain,
                    sub_ids: sub_ids.clone(),
                    pid,
                    released: false,
                }));
                cl.next_seq
            } else {
                0
            };
            cl.queued_bytes += cost;
            self.total_queued += cost;
            let conn = cl.conn.expect("online");
            cl.inflight.push_back(Inflight {
                pid,
                state: Flight::Sent,
                p: Pending {
                    msg: msg.clone(),
                    qos,
                    retain,
                    sub_ids: sub_ids.clone(),
                    seq,
                },
            });
            self.out.push((
                conn,
                Out::Publish(Delivery {
                    msg,
                    qos,
                    pid,
                    dup: false,
                    retain,
                    sub_ids,
                }),
            ));
            return;
        }
        if cl.queue.len() >= max_queued || cl.queued_bytes + cost > max_bytes || cost > total_room {
            cl.dropped += 1;
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if cl.dropped.is_power_of_two() {
                tracing::warn!(
                    client = %cl.id, dropped = cl.dropped, queued = cl.queue.len(),
                    "queue full: dropping QoS {qos} messages for this client (count so far)"
                );
            }
            return;
        }
        let seq = if cl.persistent() {
            cl.next_seq += 1;
            self.ops.push(StoreOp::Queue(StoredMsg {
                client: cl.id.clone(),
                seq: cl.next_seq,
                msg: (*msg).clone(),
                qos,
                retain,
                sub_ids: sub_ids.clone(),
                pid: 0,
                released: false,
            }));
            cl.next_seq
        } else {
            0
        };
        cl.queued_bytes += cost;
        self.total_queued += cost;
        cl.queue.push_back(Pending {
            msg,
            qos,
            retain,
            sub_ids,
            seq,
        });
        if cl.conn.is_some() {
            self.refill(ix, now);
        }
    }

    /// Route a message published by client `from` (if any) to every matching subscription:
    /// overlapping subscriptions of one client give one delivery at the highest QoS, with
    /// all their subscription identifiers; each shared group gives one member a copy.
    pub fn route(&mut self, msg: Arc<Message>, from: Option<ClientIx>, now: Instant) {
        let mut m = std::mem::take(&mut self.matches);
        self.trie.matches(&msg.topic, &mut m);
        m.subs.sort_unstable_by_key(|s| s.0);
        let mut i = 0;
        while i < m.subs.len() {
            let ix = m.subs[i].0;
            let mut qos = 0u8;
            let mut retain = false;
            let mut ids = Vec::new();
            let mut any = false;
            while i < m.subs.len() && m.subs[i].0 == ix {
                let o = m.subs[i].1;
                i += 1;
                if o.no_local && Some(ix) == from {
                    continue;
                }
                any = true;
                qos = qos.max(o.qos.min(msg.qos as u8));
                retain |= o.retain_as_published && msg.retain;
                if let Some(id) = o.id {
                    ids.push(id);
                }
            }
            if any {
                self.deliver(ix, msg.clone(), qos, retain, ids, now);
            }
        }
        for k in 0..m.shared.len() {
            let (ix, o) = m.shared[k];
            if o.no_local && Some(ix) == from {
                continue;
            }
            let qos = o.qos.min(msg.qos as u8);
            let retain = o.retain_as_published && msg.retain;
            self.deliver(
                ix,
                msg.clone(),
                qos,
                retain,
                o.id.into_iter().collect(),
                now,
            );
        }
        self.matches = m;
    }

    fn publish_will(&mut self, msg: Message, now: Instant) {
        let msg = Arc::new(msg);
        if msg.retain {
            self.set_retained(msg.clone());
        }
        self.route(msg, None, now);
    }

    fn set_retained(&mut self, msg: Arc<Message>) {
        if msg.payload.is_empty() {
            if self.retained.remove(&msg.topic).is_some() {
                self.ops.push(StoreOp::Retain(msg.topic.clone(), None));
            }
        } else {
            self.retained.insert(msg.topic.clone(), msg.clone());
            if msg.qos != QoS::Level0 || self.cfg.durable {
                self.ops
                    .push(StoreOp::Retain(msg.topic.clone(), Some((*msg).clone())));
            }
        }
    }

    /// A packet from connection `conn` (after CONNECT).
    pub fn packet(&mut self, conn: ConnId, packet: v5::Packet, now: Instant) {
        let Some(&ix) = self.conns.get(&conn) else {
            return; // taken over or closed meanwhile
        };
        match packet {
            v5::Packet::Publish(p) => self.on_publish(conn, ix, p, now),
            v5::Packet::Puback(a) => self.on_done(ix, a.pid.value(), true, now),
            v5::Packet::Pubrec(r) => {
                if r.reason_code as u8 >= 0x80 {
                    self.on_done(ix, r.pid.value(), false, now);
                    return;
                }
                let cl = self.clients.get_mut(ix).expect("present");
                if let Some(f) = cl.inflight.iter_mut().find(|f| f.pid == r.pid.value()) {
                    f.state = Flight::Released;
                    if f.p.seq != 0 {
                        self.ops
                            .push(StoreOp::Flight(cl.id.clone(), f.p.seq, f.pid, true));
                    }
                }
                self.send(
                    conn,
                    pkt(v5::Packet::Pubrel(v5::Pubrel::new_success(r.pid))),
                );
            }
            v5::Packet::Pubcomp(c) => self.on_done(ix, c.pid.value(), false, now),
            v5::Packet::Pubrel(r) => {
                let cl = self.clients.get_mut(ix).expect("present");
                let known = cl.rx_qos2.remove(&r.pid.value());
                let persistent = cl.persistent();
                let id = cl.id.clone();
                if known && persistent {
                    self.ops.push(StoreOp::RxQos2(id, r.pid.value(), false));
                }
                let code = if known {
                    v5::PubcompReasonCode::Success
                } else {
                    v5::PubcompReasonCode::PacketIdentifierNotFound
                };
                self.ack(conn, v5::Packet::Pubcomp(v5::Pubcomp::new(r.pid, code)));
            }
            v5::Packet::Subscribe(s) => self.on_subscribe(conn, ix, s, now),
            v5::Packet::Unsubscribe(u) => {
                let cl = self.clients.get_mut(ix).expect("present");
                let mut codes = Vec::new();
                for f in &u.topics {
                    let had = cl.subs.remove(&**f).is_some();
                    if had {
                        if let Some(pf) = parse_filter(f) {
                            self.trie.remove(&pf, ix);
                        }
                    }
                    codes.push(if had {
                        v5::UnsubscribeReasonCode::Success
                    } else {
                        v5::UnsubscribeReasonCode::NoSubscriptionExisted
                    });
                }
                if cl.persistent() {
                    self.ops.push(StoreOp::Session(cl.record()));
                }
                self.send(
                    conn,
                    pkt(v5::Packet::Unsuback(v5::Unsuback::new(u.pid, codes))),
                );
            }
            v5::Packet::Disconnect(d) => {
                let cl = self.clients.get_mut(ix).expect("present");
                if let Some(e) = d.properties.session_expiry_interval {
                    if cl.expiry == 0 && e != 0 {
                        self.send(conn, Out::Close(Some(Drc::ProtocolError)));
                        self.closed(conn, true, now);
                        return;
                    }
                    cl.expiry = e;
                    let rec = cl.record();
                    self.ops.push(StoreOp::Session(rec));
                }
                let abnormal = d.reason_code == Drc::DisconnectWithWillMessage;
                self.send(conn, Out::Close(None));
                self.closed(conn, abnormal, now);
            }
            _ => {}
        }
    }

    fn on_publish(&mut self, conn: ConnId, ix: ClientIx, p: v5::Publish, now: Instant) {
        self.stats.msgs_in.fetch_add(1, Ordering::Relaxed);
        let cl = self.clients.get_mut(ix).expect("present");
        let allowed = self.auth.publish(&cl.identity, &p.topic_name);
        let pid = p.qos_pid.pid();
        let v5c = cl.version.is_v5();
        if p.qos_pid.qos() == QoS::Level2 {
            let pid = pid.expect("QoS 2 has a pid");
            if !cl.rx_qos2.insert(pid.value()) {
                // A resend of one we already have: acknowledge again, do not route again.
                self.ack(conn, v5::Packet::Pubrec(v5::Pubrec::new_success(pid)));
                return;
            }
            if cl.persistent() {
                let id = cl.id.clone();
                self.ops.push(StoreOp::RxQos2(id, pid.value(), true));
            }
        }
        if !allowed {
            tracing::info!(client = %cl.id, topic = %&*p.topic_name, "publish denied");
        }
        if allowed {
            let msg = Arc::new(Message::from_publish(&p, Arc::from(&*p.topic_name), now));
            if msg.retain {
                self.set_retained(msg.clone());
            }
            self.route(msg, Some(ix), now);
        }
        match p.qos_pid {
            QosPid::Level0 => {}
            QosPid::Level1(pid) => {
                let code = if allowed || !v5c {
                    v5::PubackReasonCode::Success
                } else {
                    v5::PubackReasonCode::NotAuthorized
                };
                self.ack(conn, v5::Packet::Puback(v5::Puback::new(pid, code)));
            }
            QosPid::Level2(pid) => {
                let code = if allowed || !v5c {
                    v5::PubrecReasonCode::Success
                } else {
                    v5::PubrecReasonCode::NotAuthorized
                };
                self.ack(conn, v5::Packet::Pubrec(v5::Pubrec::new(pid, code)));
            }
        }
    }

    /// The client acknowledged (PUBACK, PUBCOMP, or a PUBREC with an error) packet `pid`.
    fn on_done(&mut self, ix: ClientIx, pid: u16, puback: bool, now: Instant) {
        let cl = self.clients.get_mut(ix).expect("present");
        let Some(pos) = cl.inflight.iter().position(|f| f.pid == pid) else {
            return;
        };
        if puback && cl.inflight[pos].p.qos != 1 {
            return;
        }
        let f = cl.inflight.remove(pos).expect("found");
        let cost = f.p.msg.cost();
        cl.queued_bytes -= cost;
        self.total_queued -= cost;
        if f.p.seq != 0 {
            self.ops.push(StoreOp::Unqueue(cl.id.clone(), f.p.seq));
        }
        self.refill(ix, now);
    }

    fn on_subscribe(&mut self, conn: ConnId, ix: ClientIx, s: v5::Subscribe, now: Instant) {
        let sub_id = s.properties.subscription_id.map(|v| v.value());
        let mut codes = Vec::with_capacity(s.topics.len());
        let mut retained_out = Vec::new();
        let cl = self.clients.get_mut(ix).expect("present");
        for (f, o) in &s.topics {
            let text: &str = f;
            let Some(pf) = parse_filter(text) else {
                codes.push(v5::SubscribeReasonCode::TopicFilterInvalid);
                continue;
            };
            if !self.auth.subscribe(&cl.identity, text) {
                codes.push(v5::SubscribeReasonCode::NotAuthorized);
                continue;
            }
            if pf.group.is_some() && o.no_local {
                codes.push(v5::SubscribeReasonCode::TopicFilterInvalid);
                continue;
            }
            let opts = SubOpts {
                qos: o.max_qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling as u8,
                id: sub_id,
            };
            let existed = cl.subs.insert(Arc::from(text), opts).is_some();
            self.trie.insert(&pf, ix, opts);
            codes.push(match o.max_qos {
                QoS::Level0 => v5::SubscribeReasonCode::GrantedQoS0,
                QoS::Level1 => v5::SubscribeReasonCode::GrantedQoS1,
                QoS::Level2 => v5::SubscribeReasonCode::GrantedQoS2,
            });
            // Retained messages: not for shared subscriptions (5.0 4.8.2), and as the
            // retain handling option says.
            let send = pf.group.is_none()
                && match opts.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send {
                for m in self.retained.values() {
                    if super::topic::matches(pf.filter, &m.topic) && !m.expired(now) {
                        retained_out.push((m.clone(), opts));
                    }
                }
            }
        }
        if cl.persistent() {
            self.ops.push(StoreOp::Session(cl.record()));
        }
        self.send(conn, pkt(v5::Packet::Suback(v5::Suback::new(s.pid, codes))));
        for (m, o) in retained_out {
            let qos = o.qos.min(m.qos as u8);
            // Retained messages sent because of a new subscription keep RETAIN set.
            self.deliver(ix, m, qos, true, o.id.into_iter().collect(), now);
        }
    }

    /// Connection `conn` ended: `abnormal` when it closed without a DISCONNECT (or with
    /// reason 0x04), which sends the will (after its delay).
    pub fn closed(&mut self, conn: ConnId, abnormal: bool, now: Instant) {
        let Some(ix) = self.conns.remove(&conn) else {
            return;
        };
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        if cl.conn != Some(conn) {
            return;
        }
        cl.conn = None;
        // QoS 0 deliveries in flight die with the connection; QoS 1/2 stay for resumption.
        let will = cl.will.take();
        let expiry = cl.expiry;
        if let Some(w) = will.filter(|_| abnormal) {
            if w.delay > 0 && expiry > 0 {
                let delay = w.delay.min(expiry);
                cl.will_at = Some(now + Duration::from_secs(delay as u64));
                cl.will = Some(w);
            } else {
                self.publish_will(w.msg, now);
            }
        }
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        if cl.expiry == 0 && cl.will.is_none() {
            self.discard(ix);
        } else if cl.expiry != u32::MAX {
            cl.expires_at = Some(now + Duration::from_secs(cl.expiry as u64));
        }
    }

    /// Time-driven work: delayed wills, expired sessions, `$SYS`. Returns when to call again.
    pub fn tick(&mut self, now: Instant) -> Instant {
        let mut wills = Vec::new();
        let mut expired = Vec::new();
        for (ix, c) in self.clients.iter() {
            if c.conn.is_none() {
                if c.will_at.is_some_and(|t| t <= now) {
                    wills.push(ix);
                }
                if c.expires_at.is_some_and(|t| t <= now) {
                    expired.push(ix);
                }
            }
        }
        for ix in wills {
            let c = self.clients.get_mut(ix).expect("present");
            c.will_at = None;
            if let Some(w) = c.will.take() {
                self.publish_will(w.msg, now);
            }
            let c = self.clients.get_mut(ix).expect("present");
            if c.expiry == 0 {
                self.discard(ix);
            }
        }
        for ix in expired {
            if let Some(c) = self.clients.get_mut(ix) {
                if let Some(w) = c.will.take() {
                    self.publish_will(w.msg, now);
                }
            }
            tracing::debug!("session expired");
            self.discard(ix);
        }
        if now >= self.next_sys {
            self.publish_sys(now);
            self.next_sys = now + self.cfg.sys_interval;
        }
        self.next_sys.min(now + Duration::from_secs(1))
    }

    fn publish_sys(&mut self, now: Instant) {
        let s = &self.stats;
        let connected = self
            .clients
            .iter()
            .filter(|(_, c)| c.conn.is_some())
            .count();
        let items: Vec<(&str, String)> = vec![
            (
                "$SYS/broker/version",
                format!("socklab {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "$SYS/broker/uptime",
                format!("{} seconds", now.duration_since(self.started).as_secs()),
            ),
            ("$SYS/broker/clients/connected", connected.to_string()),
            ("$SYS/broker/clients/total", self.clients.len().to_string()),
            (
                "$SYS/broker/messages/received",
                s.msgs_in.load(Ordering::Relaxed).to_string(),
            ),
            (
                "$SYS/broker/messages/sent",
                s.msgs_out.load(Ordering::Relaxed).to_string(),
            ),
            (
                "$SYS/broker/messages/dropped",
                s.dropped.load(Ordering::Relaxed).to_string(),
            ),
            (
                "$SYS/broker/bytes/received",
                s.bytes_in.load(Ordering::Relaxed).to_string(),
            ),
            (
                "$SYS/broker/bytes/sent",
                s.bytes_out.load(Ordering::Relaxed).to_string(),
            ),
            (
                "$SYS/broker/subscriptions/count",
                self.trie.len().to_string(),
            ),
            (
                "$SYS/broker/retained messages/count",
                self.retained
                    .iter()
                    .filter(|(t, _)| !t.starts_with('$'))
                    .count()
                    .to_string(),
            ),
        ];
        for (topic, value) in items {
            let msg = Arc::new(Message {
                topic: topic.into(),
                payload: Bytes::from(value),
                qos: QoS::Level0,
                retain: true,
                props: Default::default(),
                expires: None,
            });
            self.retained.insert(msg.topic.clone(), msg.clone());
            self.route(msg, None, now);
        }
    }

    /// A session's messages in flight and queued (for tests and diagnostics).
    pub fn queue_len(&self, client: &str) -> Option<(usize, usize)> {
        let ix = *self.by_id.get(client)?;
        let c = self.clients.iter().find(|(i, _)| *i == ix)?.1;
        Some((c.inflight.len(), c.queue.len()))
    }

    /// The filter text, validated as a topic filter (for tests and clients).
    pub fn valid_filter(f: &str) -> bool {
        TopicFilter::try_from(f).is_ok() && parse_filter(f).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_proto::TopicName;

    fn broker() -> Broker {
        Broker::new(BrokerConfig::default(), Arc::new(AllowAll), Instant::now())
    }

    fn connect(
        b: &mut Broker,
        conn: ConnId,
        id: &str,
        version: Version,
        clean: bool,
        expiry: Option<u32>,
    ) {
        let mut c = v5::Connect::new(id.into(), 60);
        c.clean_start = clean;
        c.properties.session_expiry_interval = expiry;
        b.connect(conn, version, c, Identity::default(), Instant::now());
    }

    fn subscribe(b: &mut Broker, conn: ConnId, filter: &str, qos: QoS) {
        let s = v5::Subscribe::new(
            Pid::try_from(1).unwrap(),
            vec![(
                TopicFilter::try_from(filter).unwrap(),
                v5::SubscriptionOptions::new(qos),
            )],
        );
        b.packet(conn, v5::Packet::Subscribe(s), Instant::now());
    }

    fn publish(
        b: &mut Broker,
        conn: ConnId,
        topic: &str,
        payload: &'static [u8],
        qos: QoS,
        pid: u16,
        retain: bool,
    ) {
        let qp = match qos {
            QoS::Level0 => QosPid::Level0,
            QoS::Level1 => QosPid::Level1(Pid::try_from(pid).unwrap()),
            QoS::Level2 => QosPid::Level2(Pid::try_from(pid).unwrap()),
        };
        let mut p = v5::Publish::new(
            qp,
            TopicName::try_from(topic).unwrap(),
            Bytes::from_static(payload),
        );
        p.retain = retain;
        b.packet(conn, v5::Packet::Publish(p), Instant::now());
    }

    fn publishes(b: &mut Broker, conn: ConnId) -> Vec<Delivery> {
        b.out
            .drain(..)
            .filter_map(|(c, o)| match o {
                Out::Publish(d) if c == conn => Some(d),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn qos1_flows_and_the_window_refills_on_puback() {
        let mut b = Broker::new(
            BrokerConfig {
                max_inflight: 2,
                ..Default::default()
            },
            Arc::new(AllowAll),
            Instant::now(),
        );
        connect(&mut b, 1, "sub", Version::V5, true, None);
        subscribe(&mut b, 1, "t", QoS::Level1);
        connect(&mut b, 2, "pub", Version::V5, true, None);
        b.out.clear();
        for i in 1..=3 {
            publish(&mut b, 2, "t", b"x", QoS::Level1, i, false);
        }
        let acks = b
            .out
            .iter()
            .filter(|(c, o)| {
                *c == 2 && matches!(o, Out::Packet(p) if matches!(**p, v5::Packet::Puback(_)))
            })
            .count();
        assert_eq!(acks, 3);
        let sent = publishes(&mut b, 1);
        assert_eq!(sent.len(), 2, "window of 2");
        b.packet(
            1,
            v5::Packet::Puback(v5::Puback::new_success(Pid::try_from(sent[0].pid).unwrap())),
            Instant::now(),
        );
        assert_eq!(publishes(&mut b, 1).len(), 1, "refilled");
    }

    #[test]
    fn qos2_resend_is_not_routed_twice() {
        let mut b = broker();
        connect(&mut b, 1, "sub", Version::V5, true, None);
        subscribe(&mut b, 1, "t", QoS::Level2);
        connect(&mut b, 2, "pub", Version::V5, true, None);
        b.out.clear();
        publish(&mut b, 2, "t", b"x", QoS::Level2, 5, false);
        publish(&mut b, 2, "t", b"x", QoS::Level2, 5, false);
        assert_eq!(publishes(&mut b, 1).len(), 1);
        b.packet(
            2,
            v5::Packet::Pubrel(v5::Pubrel::new_success(Pid::try_from(5).unwrap())),
            Instant::now(),
        );
        publish(&mut b, 2, "t", b"y", QoS::Level2, 5, false);
        assert_eq!(publishes(&mut b, 1).len(), 1, "a new message after PUBREL");
    }

    #[test]
    fn persistent_session_queues_offline_and_resends_with_dup() {
        let mut b = broker();
        connect(&mut b, 1, "s", Version::V311, false, None);
        subscribe(&mut b, 1, "t", QoS::Level1);
        connect(&mut b, 2, "p", Version::V311, true, None);
        publish(&mut b, 2, "t", b"a", QoS::Level1, 1, false);
        b.closed(1, true, Instant::now());
        publish(&mut b, 2, "t", b"b", QoS::Level1, 2, false);
        publish(&mut b, 2, "t", b"c", QoS::Level0, 0, false);
        assert_eq!(b.queue_len("s"), Some((1, 1)));
        b.out.clear();
        connect(&mut b, 3, "s", Version::V311, false, None);
        let connack = b.out.iter().find_map(|(_, o)| match o {
            Out::Packet(p) => match &**p {
                v5::Packet::Connack(c) => Some(c.session_present),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(connack, Some(true));
        let d = publishes(&mut b, 3);
        assert_eq!(d.len(), 2, "QoS 0 was not queued offline");
        assert!(d[0].dup && &d[0].msg.payload[..] == b"a");
        assert!(!d[1].dup && &d[1].msg.payload[..] == b"b");
    }

    #[test]
    fn retained_set_replace_clear_and_retain_flag_rules() {
        let mut b = broker();
        connect(&mut b, 2, "p", Version::V5, true, None);
        publish(&mut b, 2, "r", b"one", QoS::Level0, 0, true);
        publish(&mut b, 2, "r", b"two", QoS::Level0, 0, true);
        connect(&mut b, 1, "s", Version::V311, true, None);
        b.out.clear();
        // As the codec lifts a 3.1.1 SUBSCRIBE: retain-as-published off.
        let mut o = v5::SubscriptionOptions::new(QoS::Level0);
        o.retain_as_published = false;
        let s = v5::Subscribe::new(
            Pid::default(),
            vec![(TopicFilter::try_from("r").unwrap(), o)],
        );
        b.packet(1, v5::Packet::Subscribe(s), Instant::now());
        let d = publishes(&mut b, 1);
        assert_eq!(d.len(), 1);
        assert!(d[0].retain && &d[0].msg.payload[..] == b"two");
        publish(&mut b, 2, "r", b"live", QoS::Level0, 0, true);
        assert!(
            !publishes(&mut b, 1)[0].retain,
            "3.1.1: established subscription clears RETAIN"
        );
        publish(&mut b, 2, "r", b"", QoS::Level0, 0, true);
        assert_eq!(b.retained_count(), 0);
    }

    #[test]
    fn wills_go_out_on_abnormal_close_only_and_after_their_delay() {
        let mut b = broker();
        connect(&mut b, 1, "s", Version::V5, true, None);
        subscribe(&mut b, 1, "will", QoS::Level0);
        for (conn, abnormal) in [(2, false), (3, true)] {
            let mut c = v5::Connect::new(format!("w{conn}").into(), 60);
            c.last_will = Some(v5::LastWill::new(
                QoS::Level0,
                TopicName::try_from("will").unwrap(),
                Bytes::from_static(b"bye"),
            ));
            b.connect(conn, Version::V5, c, Identity::default(), Instant::now());
            b.out.clear();
            if abnormal {
                b.closed(conn, true, Instant::now());
            } else {
                b.packet(
                    conn,
                    v5::Packet::Disconnect(v5::Disconnect::new_normal()),
                    Instant::now(),
                );
            }
            assert_eq!(publishes(&mut b, 1).len(), abnormal as usize);
        }
        let t0 = Instant::now();
        let mut c = v5::Connect::new("delayed".into(), 60);
        c.properties.session_expiry_interval = Some(100);
        let mut w = v5::LastWill::new(
            QoS::Level0,
            TopicName::try_from("will").unwrap(),
            Bytes::from_static(b"late"),
        );
        w.properties.delay_interval = Some(5);
        c.last_will = Some(w);
        b.connect(4, Version::V5, c, Identity::default(), t0);
        b.closed(4, true, t0);
        b.tick(t0 + Duration::from_secs(1));
        assert!(publishes(&mut b, 1)
            .iter()
            .all(|d| d.msg.topic.starts_with('$')));
        b.tick(t0 + Duration::from_secs(6));
        assert!(publishes(&mut b, 1)
            .iter()
            .any(|d| &d.msg.payload[..] == b"late"));
    }

    #[test]
    fn no_local_and_shared_subscriptions() {
        let mut b = broker();
        connect(&mut b, 1, "a", Version::V5, true, None);
        let mut o = v5::SubscriptionOptions::new(QoS::Level0);
        o.no_local = true;
        b.packet(
            1,
            v5::Packet::Subscribe(v5::Subscribe::new(
                Pid::default(),
                vec![(TopicFilter::try_from("t").unwrap(), o)],
            )),
            Instant::now(),
        );
        publish(&mut b, 1, "t", b"x", QoS::Level0, 0, false);
        assert!(publishes(&mut b, 1).is_empty());
        connect(&mut b, 2, "w1", Version::V5, true, None);
        connect(&mut b, 3, "w2", Version::V5, true, None);
        subscribe(&mut b, 2, "$share/g/job", QoS::Level0);
        subscribe(&mut b, 3, "$share/g/job", QoS::Level0);
        b.out.clear();
        for _ in 0..4 {
            publish(&mut b, 1, "job", b"x", QoS::Level0, 0, false);
        }
        let to2 = b
            .out
            .iter()
            .filter(|(c, o)| *c == 2 && matches!(o, Out::Publish(_)))
            .count();
        let to3 = b
            .out
            .iter()
            .filter(|(c, o)| *c == 3 && matches!(o, Out::Publish(_)))
            .count();
        assert_eq!((to2, to3), (2, 2));
    }

    #[test]
    fn queue_cap_drops_and_counts() {
        let mut b = Broker::new(
            BrokerConfig {
                max_inflight: 1,
                max_queued: 2,
                ..Default::default()
            },
            Arc::new(AllowAll),
            Instant::now(),
        );
        connect(&mut b, 1, "s", Version::V5, true, None);
        subscribe(&mut b, 1, "t", QoS::Level1);
        connect(&mut b, 2, "p", Version::V5, true, None);
        for i in 1..=10 {
            publish(&mut b, 2, "t", b"x", QoS::Level1, i, false);
        }
        assert_eq!(b.queue_len("s"), Some((1, 2)));
        assert_eq!(b.stats.dropped.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn takeover_closes_the_old_connection() {
        let mut b = broker();
        connect(&mut b, 1, "same", Version::V5, false, Some(60));
        b.out.clear();
        connect(&mut b, 2, "same", Version::V5, false, Some(60));
        assert!(b
            .out
            .iter()
            .any(|(c, o)| *c == 1 && matches!(o, Out::Close(Some(Drc::SessionTakenOver)))));
        // A late packet or close from the old connection changes nothing.
        b.closed(1, true, Instant::now());
        assert_eq!(b.sessions(), 1);
    }
}
