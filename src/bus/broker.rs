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
use super::dbus::{self, Bus};
use super::store::{Record, StoreOp, StoredMsg};
use super::topic::{parse_filter, ByTopic, ClientIx, Matches, SubOpts, Trie};
use crate::model::evloop::Slab;
use crate::timer::Timers;
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
    /// How the user name was established (see [`super::auth::Gate`]).
    pub verified: Verified,
}

/// How a user name was established.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Verified {
    /// Taken from CONNECT as given (no password file), or no user name.
    #[default]
    None,
    /// CONNECT's password matched the password file.
    Password,
    /// A verified TLS client certificate.
    Certificate,
    /// The Unix-socket peer's uid (`SO_PEERCRED`).
    PeerCred,
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
    /// May it subscribe to `filter` (without a `$share/GROUP/` prefix)?
    fn subscribe(&self, who: &Identity, filter: &str) -> bool;
    /// May it own (or wait in the queue for) the well-known bus name `name`? Asked by
    /// `RequestName` before the registry changes (the D-Bus half, [`super::dbus`]).
    fn own(&self, who: &Identity, name: &str) -> bool {
        let _ = (who, name);
        true
    }
    /// May it call `member` (of `interface`, if given) on the bus name `destination`?
    /// Asked before the call is routed; `Ping` and `Introspect` are always answered.
    fn call(
        &self,
        who: &Identity,
        destination: &str,
        interface: Option<&str>,
        member: &str,
    ) -> bool {
        let _ = (who, destination, interface, member);
        true
    }
    /// For a granted subscription: must each delivery through it be checked with
    /// [`Authorizer::read`] (a rule forbids part of what the filter matches)?
    fn subscribe_filtered(&self, who: &Identity, filter: &str) -> bool {
        let _ = (who, filter);
        false
    }
    /// May it receive a message published to `topic`?
    fn read(&self, who: &Identity, topic: &str) -> bool {
        let _ = (who, topic);
        true
    }
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
    /// Bytes of queued and retained messages together (the global memory cap).
    pub max_total_bytes: usize,
    /// Sessions, connected or not (past it a new client gets CONNACK "quota exceeded").
    pub max_sessions: usize,
    /// Largest packet accepted (sent in CONNACK).
    pub max_packet: u32,
    /// Topic aliases a client may use (sent in CONNACK).
    pub topic_alias_max: u16,
    /// QoS 1/2 publications a client may leave unacknowledged (sent in CONNACK).
    pub receive_max: u16,
    /// Longest keep-alive accepted; a longer or zero one is replaced (server keep-alive).
    pub max_keep_alive: Option<u16>,
    /// Subscriptions one session may hold (past it: SUBACK 0x97, quota exceeded).
    pub max_subscriptions: usize,
    /// How often `$SYS` is published.
    pub sys_interval: Duration,
    /// Whether acknowledgements wait for the store.
    pub durable: bool,
    /// Limits of the D-Bus half (names, rules, calls waiting for replies).
    pub bus: super::dbus::BusConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_inflight: 20,
            max_queued: 1000,
            max_queued_bytes: 16 << 20,
            max_total_bytes: 1 << 30,
            max_sessions: 1_000_000,
            max_packet: 1 << 20,
            topic_alias_max: 64,
            receive_max: 1024,
            max_keep_alive: None,
            max_subscriptions: 10_000,
            sys_interval: Duration::from_secs(10),
            durable: false,
            bus: Default::default(),
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

/// What a broker deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// A delayed will goes out.
    Will,
    /// An offline session expires.
    Expiry,
}

#[derive(Debug, Clone)]
struct Will {
    msg: Message,
    delay: u32,
    /// When a delayed will goes out (once its connection ended).
    at: Option<Instant>,
}

/// A session's message flow: what is in flight and queued, and the packet identifiers in
/// use. Allocated with the first QoS 1/2 message, so that an idle session does not carry it.
#[derive(Debug)]
struct Flow {
    inflight: VecDeque<Inflight>,
    queue: VecDeque<Pending>,
    /// Bytes held by `inflight` and `queue` (for the caps).
    queued_bytes: usize,
    next_pid: u16,
    /// QoS 2 packet identifiers received and not yet released.
    rx_qos2: HashSet<u16>,
    /// Store key of the last message persisted for this session.
    next_seq: u64,
    /// Messages dropped at the caps (the log says so at 1, 2, 4, 8...).
    dropped: u64,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            inflight: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_pid: 0,
            rx_qos2: HashSet::new(),
            next_seq: 1,
            dropped: 0,
        }
    }
}

impl Flow {
    fn alloc_pid(&mut self) -> u16 {
        loop {
            self.next_pid = self.next_pid.wrapping_add(1).max(1);
            let p = self.next_pid;
            if !self.inflight.iter().any(|f| f.pid == p) {
                return p;
            }
        }
    }
}

/// A session's subscriptions (filter text → options), allocated with the first one.
#[derive(Debug, Default)]
// Boxed on purpose: a map is 48 bytes inline, which every idle session would carry.
#[allow(clippy::box_collection)]
struct Subs(Option<Box<HashMap<Arc<str>, SubOpts>>>);

impl Subs {
    fn insert(&mut self, f: Arc<str>, o: SubOpts) -> Option<SubOpts> {
        self.0.get_or_insert_with(Default::default).insert(f, o)
    }

    fn remove(&mut self, f: &str) -> Option<SubOpts> {
        self.0.as_mut()?.remove(f)
    }

    fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &SubOpts)> {
        self.0.iter().flat_map(|m| m.iter())
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn contains(&self, f: &str) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(f))
    }
}

/// A session (MQTT's sense: it outlives connections). Kept small: an idle client costs this
/// struct, its identity and its map entries; its flow, subscriptions and will are allocated
/// when it has them.
#[derive(Debug)]
struct Client {
    id: Arc<str>,
    conn: Option<ConnId>,
    version: Version,
    /// Messages in flight at most: `--max-inflight`, capped by the client's receive maximum.
    window: u16,
    /// Session expiry interval in seconds (`u32::MAX`: never).
    expiry: u32,
    identity: Identity,
    expires_at: Option<Instant>,
    subs: Subs,
    flow: Option<Box<Flow>>,
    will: Option<Box<Will>>,
    /// Some subscription needs each delivery checked ([`Authorizer::subscribe_filtered`]).
    filtered: bool,
}

impl Client {
    fn persistent(&self) -> bool {
        self.expiry > 0
    }

    /// The flow, allocated on first use.
    fn flow(&mut self) -> &mut Flow {
        self.flow.get_or_insert_with(Default::default)
    }

    fn inflight_len(&self) -> usize {
        self.flow.as_ref().map_or(0, |f| f.inflight.len())
    }

    /// When an offline session's connection ended, as far as its deadlines tell (its expiry,
    /// or its delayed will); `None` for a connected session, or one with neither.
    fn offline_since(&self) -> Option<Instant> {
        if self.conn.is_some() {
            return None;
        }
        let by_expiry = self
            .expires_at
            .and_then(|at| at.checked_sub(Duration::from_secs(self.expiry as u64)));
        by_expiry.or_else(|| {
            let w = self.will.as_ref()?;
            w.at?
                .checked_sub(Duration::from_secs(w.delay.min(self.expiry) as u64))
        })
    }

    /// The session as the store keeps it (`offline_since`: when its connection ended).
    fn record(&self, offline_since: Option<Instant>) -> Record {
        Record {
            client: self.id.clone(),
            expiry: self.expiry,
            v5: self.version.is_v5(),
            subs: self.subs.iter().map(|(f, o)| (f.clone(), *o)).collect(),
            offline_since,
            will: self.will.as_ref().map(|w| (w.msg.clone(), w.delay)),
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
    /// Retained messages by topic (walked by each new subscription's filter).
    retained: ByTopic<Arc<Message>>,
    total_queued: usize,
    /// Bytes held by retained messages (they count against the global cap too).
    retained_bytes: usize,
    /// Retained messages not kept for the global cap (the log says so at 1, 2, 4...).
    retained_refused: u64,
    /// Shared counters.
    pub stats: Arc<Stats>,
    started: Instant,
    next_sys: Instant,
    assigned: u64,
    matches: Matches,
    /// Delayed wills and session expiries, in order.
    timers: Timers<(ClientIx, Due)>,
    /// Deliveries and packets for connections, in order.
    pub out: Vec<(ConnId, Out)>,
    /// Acknowledgements to send once `ops` are durable (with `--data`).
    pub gated: Vec<(ConnId, Out)>,
    /// Changes for the store.
    pub ops: Vec<StoreOp>,
    /// The D-Bus half: unique and well-known names, calls, match rules, monitors.
    dbus: Bus,
}

impl Broker {
    /// An empty broker.
    pub fn new(cfg: BrokerConfig, auth: Arc<dyn Authorizer>, now: Instant) -> Broker {
        Broker {
            next_sys: now,
            dbus: Bus::new(cfg.bus.clone(), auth.clone()),
            cfg,
            auth,
            clients: Slab::new(),
            by_id: HashMap::new(),
            conns: HashMap::new(),
            trie: Trie::new(),
            retained: ByTopic::new(),
            retained_bytes: 0,
            retained_refused: 0,
            total_queued: 0,
            stats: Arc::new(Stats::default()),
            started: now,
            assigned: 0,
            matches: Matches::default(),
            timers: Timers::new(),
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

    /// The D-Bus half (names, calls, rules), for queries and tests.
    pub fn bus(&self) -> &Bus {
        &self.dbus
    }

    /// When the earliest method call waiting for a reply times out.
    pub fn next_call_deadline(&self) -> Option<Instant> {
        self.dbus.next_deadline()
    }

    /// Deliver what the D-Bus half produced, each to one connection's session.
    fn flush_bus(&mut self, now: Instant) {
        if self.dbus.out.is_empty() {
            return;
        }
        for s in std::mem::take(&mut self.dbus.out) {
            if let Some(&ix) = self.conns.get(&s.to) {
                self.deliver(ix, s.msg, s.qos, false, Vec::new(), now);
            }
        }
    }

    /// Method calls whose timeout passed fail with `NoReply` (any loop may call this).
    pub fn expire_calls(&mut self, now: Instant) {
        if self.dbus.next_deadline().is_some_and(|d| d <= now) {
            self.dbus.expire(now);
            self.flush_bus(now);
        }
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
            let topic = m.topic.clone();
            self.retained_bytes += m.cost();
            self.retained.insert(&topic, Arc::new(m));
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
            // A session that was connected when the server went down lost its connection
            // now, without DISCONNECT: its expiry runs from now and its will applies. One
            // that was offline keeps counting from when it went offline.
            let since = r.offline_since.unwrap_or(now);
            if r.expiry != u32::MAX {
                let at = since + Duration::from_secs(r.expiry as u64);
                c.expires_at = Some(at);
                self.timers.insert(at, (ix, Due::Expiry));
            }
            if let Some((msg, delay)) = r.will {
                let at = since + Duration::from_secs(delay.min(r.expiry) as u64);
                c.will = Some(Box::new(Will {
                    msg,
                    delay,
                    at: Some(at),
                }));
                self.timers.insert(at, (ix, Due::Will));
            }
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
                    .flow()
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
            let c = self.clients.get_mut(ix).expect("present").flow();
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
            subs: Subs::default(),
            window: self.cfg.max_inflight.max(1),
            flow: None,
            will: None,
            filtered: false,
        });
        self.by_id.insert(id, ix);
        ix
    }

    /// Remove a session entirely: its subscriptions leave the trie, its queue is freed.
    fn discard(&mut self, ix: ClientIx) {
        let Some(c) = self.clients.remove(ix) else {
            return;
        };
        if let Some(at) = c.expires_at {
            self.timers.remove(at, (ix, Due::Expiry));
        }
        if let Some(at) = c.will.as_ref().and_then(|w| w.at) {
            self.timers.remove(at, (ix, Due::Will));
        }
        for (f, _) in c.subs.iter() {
            if let Some(pf) = parse_filter(f) {
                self.trie.remove(&pf, ix);
            }
        }
        self.total_queued -= c.flow.as_ref().map_or(0, |f| f.queued_bytes);
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
        let refuse = |b: &mut Broker, code: Crc, why: &str| {
            let mut ack = v5::Connack::new(false, code);
            ack.properties.reason_string = Some(why.into());
            b.send(conn, pkt(v5::Packet::Connack(ack)));
            b.send(conn, Out::Close(None));
        };
        let mut assigned = None;
        let id: Arc<str> = if c.client_id.is_empty() {
            if !version.is_v5() && !c.clean_start {
                // 3.1.1: a zero-length identifier needs a clean session.
                return refuse(
                    self,
                    Crc::ClientIdentifierNotValid,
                    "an empty client identifier needs a clean session",
                );
            }
            self.assigned += 1;
            let id: Arc<str> = format!("socklab-{}-{}", std::process::id(), self.assigned).into();
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        identity.client_id = id.clone();
        if identity.username.is_none() {
            identity.username = c.username.clone().filter(|u| !u.is_empty());
        }
        if let Some(method) = &c.properties.auth_method {
            // Enhanced authentication (AUTH exchanges) is not offered: no method is known.
            tracing::info!(client = %id, peer = %identity.peer, %method, "connection refused: unknown authentication method");
            return refuse(
                self,
                Crc::BadAuthMethod,
                "no enhanced authentication method is offered",
            );
        }
        if let Some(max) = self.cfg.max_keep_alive {
            // 3.1.1 has no way to tell a client to use another keep-alive: one longer than
            // allowed (or none) is refused, as mosquitto does.
            if !version.is_v5() && (c.keep_alive == 0 || c.keep_alive > max) {
                tracing::info!(client = %id, peer = %identity.peer, keep_alive = c.keep_alive, max, "connection refused: keep-alive over --max-keep-alive");
                return refuse(
                    self,
                    Crc::ClientIdentifierNotValid,
                    "keep-alive over the server's maximum",
                );
            }
        }
        if let Err(code) = self.auth.connect(&identity, c.password.as_deref()) {
            tracing::info!(client = %id, peer = %identity.peer, ?code, "connection refused");
            return refuse(self, code, "not authorized");
        }
        if let Some(w) = &c.last_will {
            if !self.auth.publish(&identity, &w.topic_name) {
                tracing::info!(client = %id, topic = %&*w.topic_name, "connection refused: the will's topic is not writable");
                return refuse(self, Crc::NotAuthorized, "the will's topic is not writable");
            }
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
                self.dbus.disconnected(old);
                self.flush_bus(now);
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
            None if self.clients.len() >= self.cfg.max_sessions => {
                tracing::warn!(client = %id, max = self.cfg.max_sessions, "connection refused: too many sessions");
                return refuse(
                    self,
                    Crc::QuotaExceeded,
                    "the server holds too many sessions",
                );
            }
            None => self.new_client(id.clone(), version, identity.clone()),
        };
        let cfg_inflight = self.cfg.max_inflight.max(1);
        let cl = self.clients.get_mut(ix).expect("present");
        cl.conn = Some(conn);
        cl.version = version;
        cl.identity = identity;
        cl.expiry = expiry;
        // A resumed session no longer expires, and its pending will is cancelled.
        if let Some(at) = cl.expires_at.take() {
            self.timers.remove(at, (ix, Due::Expiry));
        }
        if let Some(at) = cl.will.as_ref().and_then(|w| w.at) {
            self.timers.remove(at, (ix, Due::Will));
        }
        cl.window = cfg_inflight.min(c.properties.receive_max.unwrap_or(u16::MAX));
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
            Box::new(Will {
                msg,
                delay: wp.delay_interval.unwrap_or(0),
                at: None,
            })
        });
        let persistent = cl.persistent();
        let record = cl.record(None);
        self.conns.insert(conn, ix);
        let unique = self.dbus.connected(conn);
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
            p.user_properties.push(v5::UserProperty {
                name: dbus::prop::UNIQUE_NAME.into(),
                value: unique,
            });
        }
        self.send(conn, pkt(v5::Packet::Connack(ack)));
        // NameOwnerChanged for the new unique name, after the CONNACK.
        self.flush_bus(now);
        if present {
            // The session may have been made by another user: what it may no longer
            // have goes before anything is resent.
            self.recheck(ix);
            self.resume(ix, now);
        }
    }

    /// Replace the authorizer (SIGHUP reread the files): connected clients it refuses are
    /// disconnected (5.0: reason 0x87), and every session loses the subscriptions it may no
    /// longer have.
    pub fn set_authorizer(&mut self, auth: Arc<dyn Authorizer>, now: Instant) {
        self.auth = auth;
        let mut refused = Vec::new();
        for ix in self.clients.tokens() {
            let c = self.clients.get(ix).expect("listed");
            if let Some(conn) = c.conn {
                if self.auth.connect(&c.identity, None).is_err() {
                    refused.push(conn);
                }
            }
            self.recheck(ix);
        }
        for conn in refused {
            tracing::info!(conn, "disconnected: no longer authorized");
            self.send(conn, Out::Close(Some(Drc::NotAuthorized)));
            self.closed(conn, false, now);
        }
    }

    /// Check session `ix`'s subscriptions against its identity: drop those refused, and
    /// note whether deliveries must be checked one by one.
    fn recheck(&mut self, ix: ClientIx) {
        let Some(c) = self.clients.get_mut(ix) else {
            return;
        };
        let mut gone = Vec::new();
        let mut filtered = false;
        for (f, _) in c.subs.iter() {
            let Some(pf) = parse_filter(f) else {
                continue;
            };
            if !self.auth.subscribe(&c.identity, pf.filter) {
                gone.push(f.clone());
            } else {
                filtered |= self.auth.subscribe_filtered(&c.identity, pf.filter);
            }
        }
        c.filtered = filtered;
        if gone.is_empty() {
            return;
        }
        tracing::info!(client = %c.id, withdrawn = gone.len(), "subscriptions withdrawn: no longer authorized");
        for f in &gone {
            c.subs.remove(f);
            if let Some(pf) = parse_filter(f) {
                self.trie.remove(&pf, ix);
            }
        }
        if c.persistent() {
            self.ops.push(StoreOp::Session(c.record(c.offline_since())));
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
        for f in cl.flow.iter().flat_map(|f| f.inflight.iter()) {
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
        let window = cl.window as usize;
        let persistent = cl.persistent();
        let Some(flow) = cl.flow.as_deref_mut() else {
            return; // nothing ever queued
        };
        let mut outs = Vec::new();
        let mut freed = 0;
        let mut dropped = 0;
        let mut ops = Vec::new();
        while flow.inflight.len() < window {
            let Some(p) = flow.queue.pop_front() else {
                break;
            };
            let cost = p.msg.cost();
            flow.queued_bytes -= cost;
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
            let pid = flow.alloc_pid();
            if persistent && p.seq != 0 {
                ops.push(StoreOp::Flight(cl.id.clone(), p.seq, pid, false));
            }
            // Its bytes stay counted while in flight.
            flow.queued_bytes += cost;
            freed -= cost;
            outs.push(Out::Publish(Delivery {
                msg: p.msg.clone(),
                qos: p.qos,
                pid,
                dup: false,
                retain: p.retain,
                sub_ids: p.sub_ids.clone(),
            }));
            flow.inflight.push_back(Inflight {
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
        let total_room = self
            .cfg
            .max_total_bytes
            .saturating_sub(self.total_queued + self.retained_bytes);
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
        let (conn, window, persistent) = (cl.conn, cl.window as usize, cl.persistent());
        let flow = cl.flow.get_or_insert_with(Default::default);
        let free = flow.queue.is_empty() && flow.inflight.len() < window && cost <= total_room;
        if let Some(conn) = conn.filter(|_| free) {
            let pid = flow.alloc_pid();
            let seq = if persistent {
                flow.next_seq += 1;
                self.ops.push(StoreOp::Queue(StoredMsg {
                    client: cl.id.clone(),
                    seq: flow.next_seq,
                    msg: (*msg).clone(),
                    qos,
                    retain,
                    sub_ids: sub_ids.clone(),
                    pid,
                    released: false,
                }));
                flow.next_seq
            } else {
                0
            };
            flow.queued_bytes += cost;
            self.total_queued += cost;
            flow.inflight.push_back(Inflight {
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
        if flow.queue.len() >= max_queued
            || flow.queued_bytes + cost > max_bytes
            || cost > total_room
        {
            flow.dropped += 1;
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if flow.dropped.is_power_of_two() {
                tracing::warn!(
                    client = %cl.id, dropped = flow.dropped, queued = flow.queue.len(),
                    "queue full: dropping QoS {qos} messages for this client (count so far)"
                );
            }
            return;
        }
        let seq = if persistent {
            flow.next_seq += 1;
            self.ops.push(StoreOp::Queue(StoredMsg {
                client: cl.id.clone(),
                seq: flow.next_seq,
                msg: (*msg).clone(),
                qos,
                retain,
                sub_ids: sub_ids.clone(),
                pid: 0,
                released: false,
            }));
            flow.next_seq
        } else {
            0
        };
        flow.queued_bytes += cost;
        self.total_queued += cost;
        flow.queue.push_back(Pending {
            msg,
            qos,
            retain,
            sub_ids,
            seq,
        });
        if conn.is_some() {
            self.refill(ix, now);
        }
    }

    /// Route a message published by client `from` (if any) to every matching subscription:
    /// overlapping subscriptions of one client give one delivery at the highest QoS, with
    /// all their subscription identifiers; each shared group gives one member a copy.
    pub fn route(&mut self, msg: Arc<Message>, from: Option<ClientIx>, now: Instant) {
        let mut m = std::mem::take(&mut self.matches);
        self.trie.matches(&msg.topic, &mut m);
        // One client's overlapping subscriptions are merged below: group them (usually they
        // come in order already, one node's list).
        if !m.subs.is_sorted_by_key(|s| s.0) {
            m.subs.sort_unstable_by_key(|s| s.0);
        }
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
            if any && self.may_read(ix, &msg.topic) {
                self.deliver(ix, msg.clone(), qos, retain, ids, now);
            }
        }
        for k in 0..m.shared.len() {
            let (ix, o) = m.shared[k];
            if (o.no_local && Some(ix) == from) || !self.may_read(ix, &msg.topic) {
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

    /// Whether client `ix` may receive `topic` (asked only of clients with a subscription
    /// the authorizer wants checked per delivery).
    fn may_read(&self, ix: ClientIx, topic: &str) -> bool {
        match self.clients.get(ix) {
            Some(c) if c.filtered => self.auth.read(&c.identity, topic),
            _ => true,
        }
    }

    fn publish_will(&mut self, mut msg: Message, now: Instant) {
        // Its message expiry interval runs from when it is published.
        msg.expires = msg
            .props
            .expiry
            .map(|s| now + Duration::from_secs(s as u64));
        let msg = Arc::new(msg);
        if msg.retain {
            self.set_retained(msg.clone());
        }
        self.route(msg, None, now);
    }

    /// Set, replace or (empty payload) clear the retained message of a topic. Retained
    /// messages count against the global memory cap with the queues: past it, a new one is
    /// not kept (it is still delivered), counted and logged.
    fn set_retained(&mut self, msg: Arc<Message>) {
        if msg.payload.is_empty() {
            if let Some(old) = self.retained.remove(&msg.topic) {
                self.retained_bytes -= old.cost();
                self.ops.push(StoreOp::Retain(msg.topic.clone(), None));
            }
            return;
        }
        let cost = msg.cost();
        let old = self.retained.get(&msg.topic).map_or(0, |m| m.cost());
        let used = self.total_queued + self.retained_bytes - old;
        if used + cost > self.cfg.max_total_bytes {
            self.retained_refused += 1;
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if self.retained_refused.is_power_of_two() {
                tracing::warn!(
                    topic = %msg.topic, refused = self.retained_refused,
                    "memory cap reached: a retained message is not kept (count so far)"
                );
            }
            return;
        }
        self.retained_bytes = self.retained_bytes - old + cost;
        self.retained.insert(&msg.topic, msg.clone());
        // `$SYS` is the broker's own, made anew after a restart: not stored.
        let own = msg.topic.starts_with("$SYS/");
        if !own && (msg.qos != QoS::Level0 || self.cfg.durable) {
            self.ops
                .push(StoreOp::Retain(msg.topic.clone(), Some((*msg).clone())));
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
                let flight = cl
                    .flow
                    .as_deref_mut()
                    .and_then(|fl| fl.inflight.iter_mut().find(|f| f.pid == r.pid.value()));
                if let Some(f) = flight {
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
                let known = cl
                    .flow
                    .as_deref_mut()
                    .is_some_and(|f| f.rx_qos2.remove(&r.pid.value()));
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
                    let had = cl.subs.remove(f).is_some();
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
                    self.ops.push(StoreOp::Session(cl.record(None)));
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
                    let rec = cl.record(None);
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
        // Calls, replies and driver requests under $bus/ are checked by the D-Bus half
        // itself (the Authorizer's `call` and `own`; a reply only from the connection the
        // call was routed to); signals are publications and need a write rule for their topic.
        let dbus_checked =
            p.topic_name.starts_with(dbus::PREFIX) && !p.topic_name.starts_with(dbus::SIGNAL_TOPIC);
        let allowed = dbus_checked || self.auth.publish(&cl.identity, &p.topic_name);
        let pid = p.qos_pid.pid();
        let v5c = cl.version.is_v5();
        if p.qos_pid.qos() == QoS::Level2 && (allowed || !v5c) {
            // (A 5.0 refusal ends the flow with PUBREC 0x87: the identifier is not kept.)
            let pid = pid.expect("QoS 2 has a pid");
            if !cl.flow().rx_qos2.insert(pid.value()) {
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
        if allowed && p.topic_name.starts_with(dbus::PREFIX) {
            // The D-Bus half: calls, replies, signals; never routed through the trie.
            let msg = Message::from_publish(&p, Arc::from(&*p.topic_name), now);
            let who = self.clients.get_mut(ix).expect("present").identity.clone();
            self.dbus.publish(conn, &who, &msg, now);
            self.flush_bus(now);
        } else if allowed {
            let msg = Arc::new(Message::from_publish(&p, Arc::from(&*p.topic_name), now));
            if msg.retain {
                self.set_retained(msg.clone());
            }
            if self.dbus.has_monitors() {
                self.dbus.observe(Some(conn), &msg);
                self.flush_bus(now);
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
        let Some(flow) = cl.flow.as_deref_mut() else {
            return;
        };
        let Some(pos) = flow.inflight.iter().position(|f| f.pid == pid) else {
            return;
        };
        if puback && flow.inflight[pos].p.qos != 1 {
            return;
        }
        let f = flow.inflight.remove(pos).expect("found");
        let cost = f.p.msg.cost();
        flow.queued_bytes -= cost;
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
            if !self.auth.subscribe(&cl.identity, pf.filter) {
                tracing::info!(client = %cl.id, filter = text, "subscription denied");
                codes.push(v5::SubscribeReasonCode::NotAuthorized);
                continue;
            }
            if pf.filter.starts_with(dbus::PREFIX) {
                // $bus/ messages go to a name's owner or match rules, never to subscribers.
                tracing::info!(client = %cl.id, filter = text, "subscription to $bus/ refused: use AddMatch");
                codes.push(v5::SubscribeReasonCode::TopicFilterInvalid);
                continue;
            }
            let checked = self.auth.subscribe_filtered(&cl.identity, pf.filter);
            cl.filtered |= checked;
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
            let existed = cl.subs.contains(text);
            if !existed && cl.subs.len() >= self.cfg.max_subscriptions {
                tracing::info!(client = %cl.id, max = self.cfg.max_subscriptions, "subscription refused: too many");
                codes.push(v5::SubscribeReasonCode::QuotaExceeded);
                continue;
            }
            cl.subs.insert(Arc::from(text), opts);
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
                let mut found = Vec::new();
                self.retained.matching(pf.filter, &mut found);
                for m in found {
                    if !m.expired(now) && (!checked || self.auth.read(&cl.identity, &m.topic)) {
                        retained_out.push((m.clone(), opts));
                    }
                }
            }
        }
        if cl.persistent() {
            self.ops.push(StoreOp::Session(cl.record(None)));
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
        // Calls it was to answer fail at once (NoReply); its names pass on.
        self.dbus.disconnected(conn);
        self.flush_bus(now);
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
        if let Some(mut w) = will.filter(|_| abnormal) {
            if w.delay > 0 && expiry > 0 {
                let at = now + Duration::from_secs(w.delay.min(expiry) as u64);
                w.at = Some(at);
                cl.will = Some(w);
                self.timers.insert(at, (ix, Due::Will));
            } else {
                self.publish_will(w.msg, now);
            }
        }
        let Some(cl) = self.clients.get_mut(ix) else {
            return;
        };
        if cl.expiry == 0 && cl.will.is_none() {
            self.discard(ix);
            return;
        }
        if cl.expiry != u32::MAX {
            let at = now + Duration::from_secs(cl.expiry as u64);
            cl.expires_at = Some(at);
            self.timers.insert(at, (ix, Due::Expiry));
        }
        if cl.persistent() {
            // Its expiry and a pending will count from now, also after a restart.
            self.ops.push(StoreOp::Session(cl.record(Some(now))));
        }
    }

    /// The server is stopping without the clients having said DISCONNECT: every connection
    /// ends as a lost one -- its will is published, or, if delayed, kept with a durable
    /// session to go out after the restart. Without durability the sessions end with the
    /// process, so every pending will goes out now.
    pub fn shutdown(&mut self, now: Instant) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        // Wills first, while every subscriber is still connected to receive them.
        for conn in &conns {
            let Some(c) = self
                .conns
                .get(conn)
                .and_then(|&ix| self.clients.get_mut(ix))
            else {
                continue;
            };
            let delayed = c.will.as_ref().is_some_and(|w| w.delay > 0);
            if !(self.cfg.durable && c.persistent() && delayed) {
                if let Some(w) = c.will.take() {
                    self.publish_will(w.msg, now);
                }
            }
        }
        for conn in conns {
            self.closed(conn, true, now);
        }
        if self.cfg.durable {
            return;
        }
        let pending: Vec<ClientIx> = self
            .clients
            .iter()
            .filter(|(_, c)| c.will.is_some())
            .map(|(ix, _)| ix)
            .collect();
        for ix in pending {
            let Some(w) = self.clients.get_mut(ix).and_then(|c| c.will.take()) else {
                continue;
            };
            if let Some(at) = w.at {
                self.timers.remove(at, (ix, Due::Will));
            }
            self.publish_will(w.msg, now);
        }
    }

    /// Time-driven work: delayed wills, expired sessions, `$SYS`. Returns when to call again.
    /// Only what is due is looked at (the deadlines are kept in order), not every session.
    pub fn tick(&mut self, now: Instant) -> Instant {
        while let Some((at, (ix, due))) = self.timers.pop_due(now) {
            let Some(c) = self.clients.get_mut(ix) else {
                continue;
            };
            if c.conn.is_some() {
                continue;
            }
            match due {
                Due::Will => {
                    if c.will.as_ref().and_then(|w| w.at) == Some(at) {
                        let w = c.will.take().expect("checked");
                        self.publish_will(w.msg, now);
                    }
                }
                Due::Expiry => {
                    if c.expires_at == Some(at) {
                        if let Some(w) = c.will.take() {
                            if let Some(wat) = w.at {
                                self.timers.remove(wat, (ix, Due::Will));
                            }
                            self.publish_will(w.msg, now);
                        }
                        tracing::debug!("session expired");
                        self.discard(ix);
                    }
                }
            }
        }
        if now >= self.next_sys {
            self.publish_sys(now);
            self.next_sys = now + self.cfg.sys_interval;
        }
        self.expire_calls(now);
        let next = self.timers.timeout(now).map_or(self.next_sys, |t| now + t);
        let next = next.min(self.next_sys).min(now + Duration::from_secs(1));
        self.dbus.next_deadline().map_or(next, |d| d.min(next))
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
                self.retained.len_without_dollar().to_string(),
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
            self.set_retained(msg.clone());
            self.route(msg, None, now);
        }
    }

    /// A session's messages in flight and queued (for tests and diagnostics).
    pub fn queue_len(&self, client: &str) -> Option<(usize, usize)> {
        let ix = *self.by_id.get(client)?;
        let c = self.clients.iter().find(|(i, _)| *i == ix)?.1;
        Some((
            c.inflight_len(),
            c.flow.as_ref().map_or(0, |f| f.queue.len()),
        ))
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

    #[test]
    fn sessions_expire_when_due_and_resuming_cancels_it() {
        let mut b = broker();
        let t0 = Instant::now();
        let mut c = v5::Connect::new("e".into(), 60);
        c.properties.session_expiry_interval = Some(10);
        b.connect(1, Version::V5, c.clone(), Identity::default(), t0);
        b.closed(1, true, t0);
        b.tick(t0 + Duration::from_secs(5));
        assert_eq!(b.sessions(), 1);
        // Resumed at 6 s and closed again at 8 s: it now expires at 18 s, not 10 s.
        c.clean_start = false;
        b.connect(
            2,
            Version::V5,
            c,
            Identity::default(),
            t0 + Duration::from_secs(6),
        );
        b.closed(2, true, t0 + Duration::from_secs(8));
        b.tick(t0 + Duration::from_secs(11));
        assert_eq!(b.sessions(), 1, "the first deadline was cancelled");
        let next = b.tick(t0 + Duration::from_secs(17));
        assert!(next <= t0 + Duration::from_secs(18));
        b.tick(t0 + Duration::from_secs(18));
        assert_eq!(b.sessions(), 0);
    }

    #[test]
    fn subscriptions_past_the_cap_are_refused_with_quota_exceeded() {
        let mut b = Broker::new(
            BrokerConfig {
                max_subscriptions: 2,
                ..Default::default()
            },
            Arc::new(AllowAll),
            Instant::now(),
        );
        connect(&mut b, 1, "s", Version::V5, true, None);
        for f in ["a", "b", "a", "c"] {
            subscribe(&mut b, 1, f, QoS::Level0);
        }
        let codes: Vec<_> = b
            .out
            .iter()
            .filter_map(|(_, o)| match o {
                Out::Packet(p) => match &**p {
                    v5::Packet::Suback(s) => Some(s.topics[0]),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        use v5::SubscribeReasonCode as R;
        assert_eq!(
            codes,
            [
                R::GrantedQoS0,
                R::GrantedQoS0,
                R::GrantedQoS0,
                R::QuotaExceeded
            ],
            "replacing an existing one is fine, a third is not"
        );
        assert_eq!(b.subscriptions(), 2);
    }

    fn will_connect(b: &mut Broker, conn: ConnId, id: &str, delay: u32, expiry: u32, now: Instant) {
        let mut c = v5::Connect::new(id.into(), 60);
        c.properties.session_expiry_interval = Some(expiry);
        let mut w = v5::LastWill::new(
            QoS::Level1,
            TopicName::try_from("will").unwrap(),
            Bytes::copy_from_slice(id.as_bytes()),
        );
        w.properties.delay_interval = Some(delay);
        w.properties.message_expiry_interval = Some(30);
        c.last_will = Some(w);
        b.connect(conn, Version::V5, c, Identity::default(), now);
    }

    #[test]
    fn shutdown_sends_wills_and_a_durable_broker_keeps_delayed_ones() {
        let t0 = Instant::now();
        for durable in [false, true] {
            let mut b = Broker::new(
                BrokerConfig {
                    durable,
                    ..Default::default()
                },
                Arc::new(AllowAll),
                t0,
            );
            connect(&mut b, 1, "s", Version::V5, true, None);
            subscribe(&mut b, 1, "will", QoS::Level1);
            will_connect(&mut b, 2, "now", 0, 100, t0);
            will_connect(&mut b, 3, "later", 60, 100, t0);
            b.out.clear();
            b.ops.clear();
            let t1 = t0 + Duration::from_secs(1);
            b.shutdown(t1);
            let sent = publishes(&mut b, 1);
            assert!(
                sent.iter().all(|d| d.msg.expiry_left(t1) == Some(30)),
                "a will's message expiry runs from when it is published"
            );
            let mut got: Vec<String> = sent
                .iter()
                .map(|d| String::from_utf8_lossy(&d.msg.payload).into_owned())
                .collect();
            got.sort();
            if durable {
                assert_eq!(got, ["now"], "the delayed will waits for its delay");
                let kept = b.ops.iter().any(|op| {
                    matches!(op, StoreOp::Session(r)
                        if &*r.client == "later" && r.will.is_some() && r.offline_since.is_some())
                });
                assert!(
                    kept,
                    "the pending will and the time it went offline are stored"
                );
            } else {
                assert_eq!(
                    got,
                    ["later", "now"],
                    "the sessions end: every will goes out"
                );
            }
        }
    }

    #[test]
    fn restored_sessions_count_expiry_and_will_delay_from_when_they_went_offline() {
        let t0 = Instant::now();
        let msg = |p: &'static [u8]| Message {
            topic: "will".into(),
            payload: Bytes::from_static(p),
            qos: QoS::Level0,
            retain: false,
            props: Default::default(),
            expires: None,
        };
        let record = |id: &str, since: Option<Instant>, will: Option<(Message, u32)>| Record {
            client: id.into(),
            expiry: 100,
            v5: true,
            subs: Vec::new(),
            offline_since: since,
            will,
        };
        let mut b = broker();
        b.restore(
            vec![
                // Offline for 90 s: 10 s left; its will (delay 60) is already due.
                record(
                    "old",
                    Some(t0 - Duration::from_secs(90)),
                    Some((msg(b"old"), 60)),
                ),
                // Connected when the server died: its will (delay 0) goes out now.
                record("crashed", None, Some((msg(b"crashed"), 0))),
                // Offline for 10 s, will delay 60: 50 s to go.
                record(
                    "waiting",
                    Some(t0 - Duration::from_secs(10)),
                    Some((msg(b"waiting"), 60)),
                ),
            ],
            Vec::new(),
            Vec::new(),
            Vec::new(),
            t0,
        );
        connect(&mut b, 1, "s", Version::V5, true, None);
        subscribe(&mut b, 1, "will", QoS::Level0);
        b.out.clear();
        b.tick(t0);
        let mut got: Vec<String> = publishes(&mut b, 1)
            .iter()
            .map(|d| String::from_utf8_lossy(&d.msg.payload).into_owned())
            .collect();
        got.sort();
        assert_eq!(got, ["crashed", "old"]);
        assert_eq!(b.sessions(), 4);
        b.tick(t0 + Duration::from_secs(11));
        assert_eq!(b.sessions(), 3, "'old' expired 100 s after it went offline");
        b.tick(t0 + Duration::from_secs(51));
        assert!(publishes(&mut b, 1)
            .iter()
            .any(|d| &d.msg.payload[..] == b"waiting"));
    }
    #[test]
    fn the_global_cap_covers_retained_messages_and_sessions_are_capped() {
        let mut b = Broker::new(
            BrokerConfig {
                max_total_bytes: 300,
                max_sessions: 2,
                ..Default::default()
            },
            Arc::new(AllowAll),
            Instant::now(),
        );
        connect(&mut b, 1, "p", Version::V5, true, None);
        // Each costs 64 + topic + payload bytes: 66 here, so four fit in 300.
        for t in ["a", "b", "c", "d", "e", "f"] {
            publish(&mut b, 1, t, b"x", QoS::Level0, 0, true);
        }
        assert_eq!(b.retained_count(), 4);
        assert_eq!(b.stats.dropped.load(Ordering::Relaxed), 2);
        // Replacing one does not need more room; clearing one makes room.
        publish(&mut b, 1, "a", b"y", QoS::Level0, 0, true);
        publish(&mut b, 1, "b", b"", QoS::Level0, 0, true);
        publish(&mut b, 1, "e", b"x", QoS::Level0, 0, true);
        assert_eq!(b.retained_count(), 4);
        connect(&mut b, 2, "q", Version::V5, true, None);
        b.out.clear();
        connect(&mut b, 3, "r", Version::V5, true, None);
        let refused = b.out.iter().any(|(c, o)| {
            *c == 3
                && matches!(o, Out::Packet(p) if matches!(&**p,
                    v5::Packet::Connack(a) if a.reason_code == Crc::QuotaExceeded))
        });
        assert!(refused, "a third session is refused");
        assert_eq!(b.sessions(), 2);
    }

    /// A broker whose authorizer is the policy of this ACL file (anonymous allowed).
    fn acl_broker(acl: &str) -> Broker {
        let acl = super::super::auth::acl::Acl::parse(acl).unwrap();
        let policy = super::super::auth::Policy::new(None, Some(acl), true);
        Broker::new(BrokerConfig::default(), Arc::new(policy), Instant::now())
    }

    fn connect_as(b: &mut Broker, conn: ConnId, id: &str, user: Option<&str>, version: Version) {
        let c = v5::Connect::new(id.into(), 60);
        let who = Identity {
            username: user.map(Into::into),
            ..Default::default()
        };
        b.connect(conn, version, c, who, Instant::now());
    }

    fn suback(b: &mut Broker, conn: ConnId) -> Vec<v5::SubscribeReasonCode> {
        b.out
            .iter()
            .find_map(|(c, o)| match o {
                Out::Packet(p) if *c == conn => match &**p {
                    v5::Packet::Suback(s) => Some(s.topics.clone()),
                    _ => None,
                },
                _ => None,
            })
            .expect("a SUBACK")
    }

    const ACL: &str = "user alice\ntopic readwrite a/#\ntopic deny a/secret\n\
                       user bob\ntopic read a/open\ntopic write b/#\n";

    #[test]
    fn denied_subscription_gets_0x87_and_others_are_granted() {
        let mut b = acl_broker(ACL);
        connect_as(&mut b, 1, "c1", Some("bob"), Version::V5);
        b.out.clear();
        let s = v5::Subscribe::new(
            Pid::try_from(1).unwrap(),
            ["a/open", "a/#", "$share/g/a/open"]
                .iter()
                .map(|f| {
                    (
                        TopicFilter::try_from(*f).unwrap(),
                        v5::SubscriptionOptions::new(QoS::Level1),
                    )
                })
                .collect(),
        );
        b.packet(1, v5::Packet::Subscribe(s), Instant::now());
        use v5::SubscribeReasonCode as R;
        assert_eq!(
            suback(&mut b, 1),
            [R::GrantedQoS1, R::NotAuthorized, R::GrantedQoS1]
        );
        assert_eq!(b.subscriptions(), 2);
    }

    #[test]
    fn a_denied_retained_publish_is_not_kept() {
        let mut b = acl_broker(ACL);
        connect_as(&mut b, 2, "pub", Some("alice"), Version::V5);
        publish(
            &mut b,
            2,
            "a/secret",
            b"retained secret",
            QoS::Level0,
            0,
            true,
        );
        publish(&mut b, 2, "a/x", b"retained x", QoS::Level0, 0, true);
        assert_eq!(b.retained_count(), 1, "alice may write a/x, not a/secret");
    }

    #[test]
    fn retained_and_live_messages_never_reach_who_may_not_read_them() {
        // The writer may write everything; the reader reads a/# but not a/secret.
        let mut b =
            acl_broker("user w\ntopic write #\nuser r\ntopic read a/#\ntopic deny a/secret\n");
        connect_as(&mut b, 2, "pub", Some("w"), Version::V5);
        publish(&mut b, 2, "a/secret", b"s", QoS::Level0, 0, true);
        publish(&mut b, 2, "a/x", b"x", QoS::Level0, 0, true);
        assert_eq!(b.retained_count(), 2);
        connect_as(&mut b, 1, "sub", Some("r"), Version::V311);
        b.out.clear();
        subscribe(&mut b, 1, "a/#", QoS::Level0);
        let got: Vec<String> = publishes(&mut b, 1)
            .iter()
            .map(|d| d.msg.topic.to_string())
            .collect();
        assert_eq!(got, ["a/x"], "retained");
        publish(&mut b, 2, "a/secret", b"s2", QoS::Level0, 0, false);
        publish(&mut b, 2, "a/y", b"y", QoS::Level0, 0, false);
        let got: Vec<String> = publishes(&mut b, 1)
            .iter()
            .map(|d| d.msg.topic.to_string())
            .collect();
        assert_eq!(got, ["a/y"], "live");
        // $SYS is not granted by a/# and not by a rule for #.
        b.tick(Instant::now() + Duration::from_secs(60));
        assert!(publishes(&mut b, 1).is_empty());
    }

    #[test]
    fn denied_publish_is_dropped_in_311_and_refused_with_0x87_in_5() {
        let mut b = acl_broker(ACL);
        connect_as(&mut b, 1, "s", Some("alice"), Version::V5);
        subscribe(&mut b, 1, "a/#", QoS::Level1);
        for (conn, v) in [(2, Version::V311), (3, Version::V5)] {
            connect_as(&mut b, conn, &format!("p{conn}"), Some("bob"), v);
            b.out.clear();
            publish(&mut b, conn, "a/open", b"x", QoS::Level1, 7, false);
            publish(&mut b, conn, "a/open", b"x", QoS::Level2, 8, false);
            let codes: Vec<u8> = b
                .out
                .iter()
                .filter_map(|(c, o)| match o {
                    Out::Packet(p) if *c == conn => match &**p {
                        v5::Packet::Puback(a) => Some(a.reason_code as u8),
                        v5::Packet::Pubrec(r) => Some(r.reason_code as u8),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            let want: &[u8] = if v.is_v5() { &[0x87, 0x87] } else { &[0, 0] };
            assert_eq!(codes, want, "{v:?}");
            assert!(publishes(&mut b, 1).is_empty(), "nothing routed");
        }
        // A 5.0 refusal does not keep the QoS 2 identifier: its reuse is a new message.
        b.set_authorizer(
            Arc::new(super::super::auth::Policy::new(None, None, true)),
            Instant::now(),
        );
        publish(&mut b, 3, "a/open", b"now", QoS::Level2, 8, false);
        assert_eq!(publishes(&mut b, 1).len(), 1);
    }

    #[test]
    fn will_on_a_forbidden_topic_refuses_the_connection() {
        let mut b = acl_broker(ACL);
        let mut c = v5::Connect::new("w".into(), 60);
        c.last_will = Some(v5::LastWill::new(
            QoS::Level0,
            TopicName::try_from("a/secret").unwrap(),
            Bytes::from_static(b"bye"),
        ));
        let who = Identity {
            username: Some("alice".into()),
            ..Default::default()
        };
        b.connect(1, Version::V5, c, who, Instant::now());
        let code = b.out.iter().find_map(|(_, o)| match o {
            Out::Packet(p) => match &**p {
                v5::Packet::Connack(c) => Some(c.reason_code),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(code, Some(Crc::NotAuthorized));
        assert_eq!(b.sessions(), 0);
    }

    #[test]
    fn new_rules_withdraw_subscriptions_of_live_and_resumed_sessions() {
        let mut b = acl_broker("user r\ntopic read a/#\ntopic read b/#\nuser w\ntopic write #\n");
        connect_as(&mut b, 1, "sub", Some("r"), Version::V5);
        subscribe(&mut b, 1, "a/#", QoS::Level0);
        subscribe(&mut b, 1, "b/#", QoS::Level0);
        connect_as(&mut b, 2, "pub", Some("w"), Version::V5);
        assert_eq!(b.subscriptions(), 2);
        let acl =
            super::super::auth::acl::Acl::parse("user r\ntopic read a/#\nuser w\ntopic write #\n")
                .unwrap();
        b.set_authorizer(
            Arc::new(super::super::auth::Policy::new(None, Some(acl), true)),
            Instant::now(),
        );
        assert_eq!(b.subscriptions(), 1, "b/# withdrawn");
        b.out.clear();
        publish(&mut b, 2, "b/1", b"x", QoS::Level0, 0, false);
        publish(&mut b, 2, "a/1", b"x", QoS::Level0, 0, false);
        assert_eq!(publishes(&mut b, 1).len(), 1);
        // A persistent session resumed by another user keeps only what that user may have.
        let mut c = v5::Connect::new("keep".into(), 60);
        c.clean_start = false;
        c.properties.session_expiry_interval = Some(600);
        let r = Identity {
            username: Some("r".into()),
            ..Default::default()
        };
        b.connect(3, Version::V5, c.clone(), r, Instant::now());
        subscribe(&mut b, 3, "a/#", QoS::Level1);
        b.closed(3, false, Instant::now());
        let w = Identity {
            username: Some("w".into()),
            ..Default::default()
        };
        b.connect(4, Version::V5, c, w, Instant::now());
        assert_eq!(b.subscriptions(), 1, "only the live sub's a/# is left");
    }
}
