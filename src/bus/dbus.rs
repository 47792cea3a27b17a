//! The D-Bus half of the bus, without I/O: unique names, the bus driver
//! (`org.freedesktop.DBus`: names, match rules, monitors), method calls routed to a name's
//! owner with their replies and errors matched to the call, signals selected by match rules,
//! and `Ping`/`Introspect` answered for every connection.
//!
//! It sits inside the [`super::broker::Broker`]: every PUBLISH to a topic under `$bus/` is
//! handed here instead of to the topic trie, and what this layer sends ([`Send`]) the broker
//! puts into the receiving connection's session with [`super::broker::Broker::deliver`]. The
//! wire mapping (topics, user properties, correlation data) is in `docs/bus.md`:
//!
//! | topic | message |
//! | --- | --- |
//! | `$bus/call/DESTINATION` | a method call (user properties `member`, `path`, `interface`, `timeout`; Response Topic + Correlation Data for the reply) |
//! | `$bus/reply` | a reply or, with user property `error`, an error (Correlation Data as received with the call) |
//! | `$bus/signal/INTERFACE/MEMBER` | a signal (user properties `path`, `destination`) |
//!
//! The calls and replies never pass through the trie: a call reaches the name's primary
//! owner only, a reply the caller only (on the caller's Response Topic, with the caller's
//! Correlation Data). Who may own and call a name is asked of the broker's
//! [`Authorizer`] (`own`, `call`) right before the registry or the callee is touched.

use super::broker::{Authorizer, ConnId, Identity};
use super::codec::{Message, MessageProps};
use super::names::{self, NameEvent, Registry, ReleaseReply};
use super::rules::{Fields, Kind, Rule};
use bytes::Bytes;
use mqtt_proto::QoS;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bus's own name, as on D-Bus.
pub const DRIVER: &str = "org.freedesktop.DBus";
/// The bus's object path.
pub const DRIVER_PATH: &str = "/org/freedesktop/DBus";
/// Topics under this prefix belong to the bus layer, never to the trie.
pub const PREFIX: &str = "$bus/";
/// Method calls: `$bus/call/DESTINATION`.
pub const CALL_TOPIC: &str = "$bus/call/";
/// Replies and errors go to this topic (it is the Response Topic of every delivered call).
pub const REPLY_TOPIC: &str = "$bus/reply";
/// Signals: `$bus/signal/INTERFACE/MEMBER`.
pub const SIGNAL_TOPIC: &str = "$bus/signal/";
/// Interface of `Ping`.
pub const PEER: &str = "org.freedesktop.DBus.Peer";
/// Interface of `Introspect`.
pub const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
/// Interface of `BecomeMonitor`.
pub const MONITORING: &str = "org.freedesktop.DBus.Monitoring";
/// socklab's own driver methods (`SetIntrospection`).
pub const SOCKLAB: &str = "org.socklab.Bus1";

/// The user property names of the wire mapping.
pub mod prop {
    /// `method_call`, `method_return`, `error`, `signal` (set by the bus; `publish` for plain
    /// MQTT messages shown to monitors).
    pub const TYPE: &str = "type";
    /// The sender's unique name (set by the bus).
    pub const SENDER: &str = "sender";
    /// The destination as addressed.
    pub const DESTINATION: &str = "destination";
    /// Object path (default `/`).
    pub const PATH: &str = "path";
    /// Interface.
    pub const INTERFACE: &str = "interface";
    /// Member (method or signal name).
    pub const MEMBER: &str = "member";
    /// Error name, on an error reply.
    pub const ERROR: &str = "error";
    /// A call's timeout in milliseconds.
    pub const TIMEOUT: &str = "timeout";
    /// The bus's number for a call (shown to monitors).
    pub const SERIAL: &str = "serial";
    /// The call a reply answers (shown to monitors).
    pub const REPLY_SERIAL: &str = "reply-serial";
    /// In CONNACK: the connection's unique name.
    pub const UNIQUE_NAME: &str = "unique-name";

    /// Whether the bus sets this property itself (a sender's own value is dropped).
    pub fn reserved(k: &str) -> bool {
        matches!(
            k,
            TYPE | SENDER
                | DESTINATION
                | PATH
                | INTERFACE
                | MEMBER
                | ERROR
                | TIMEOUT
                | SERIAL
                | REPLY_SERIAL
        )
    }
}

/// Error names the bus itself sends (those of D-Bus).
pub mod error {
    /// The callee disconnected or gave up the name before replying, or the timeout passed.
    pub const NO_REPLY: &str = "org.freedesktop.DBus.Error.NoReply";
    /// Nobody owns the destination.
    pub const SERVICE_UNKNOWN: &str = "org.freedesktop.DBus.Error.ServiceUnknown";
    /// The driver has no such method.
    pub const UNKNOWN_METHOD: &str = "org.freedesktop.DBus.Error.UnknownMethod";
    /// Arguments of the wrong number or type, or a malformed message.
    pub const INVALID_ARGS: &str = "org.freedesktop.DBus.Error.InvalidArgs";
    /// `GetNameOwner` / `ListQueuedOwners` of a name nobody owns.
    pub const NAME_HAS_NO_OWNER: &str = "org.freedesktop.DBus.Error.NameHasNoOwner";
    /// `AddMatch` with a bad rule.
    pub const MATCH_RULE_INVALID: &str = "org.freedesktop.DBus.Error.MatchRuleInvalid";
    /// `RemoveMatch` of a rule not added.
    pub const MATCH_RULE_NOT_FOUND: &str = "org.freedesktop.DBus.Error.MatchRuleNotFound";
    /// Too many names, rules or calls waiting for replies.
    pub const LIMITS_EXCEEDED: &str = "org.freedesktop.DBus.Error.LimitsExceeded";
    /// The authorizer said no.
    pub const ACCESS_DENIED: &str = "org.freedesktop.DBus.Error.AccessDenied";
    /// A generic failure (used by `bus own` for a command that failed).
    pub const FAILED: &str = "org.freedesktop.DBus.Error.Failed";
}

/// Limits of the bus layer (D-Bus's daemon has the same kinds of limits).
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Names one connection may own or wait for.
    pub max_names: usize,
    /// Match rules per connection (a monitor's rules too).
    pub max_rules: usize,
    /// Match rules of all connections together (each signal is matched against them).
    pub max_rules_total: usize,
    /// Well-known names on the bus.
    pub max_names_total: usize,
    /// Calls one connection may have waiting for replies.
    pub max_pending: usize,
    /// Calls all connections together may have waiting for replies (each costs the bus a
    /// few hundred bytes until it is answered or times out).
    pub max_pending_total: usize,
    /// A call's timeout when it sets none.
    pub default_timeout: Duration,
    /// The longest timeout a call may set.
    pub max_timeout: Duration,
    /// Bytes of introspection data a connection may register.
    pub max_introspect: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            max_names: 512,
            max_rules: 512,
            max_rules_total: 100_000,
            max_names_total: 100_000,
            max_pending: 1024,
            max_pending_total: 100_000,
            default_timeout: Duration::from_secs(25),
            max_timeout: Duration::from_secs(600),
            max_introspect: 64 << 10,
        }
    }
}

/// A message for one connection.
#[derive(Debug, Clone)]
pub struct Send {
    /// The receiving connection.
    pub to: ConnId,
    /// The message (shared between the receivers of one signal).
    pub msg: Arc<Message>,
    /// The QoS to deliver it with.
    pub qos: u8,
}

#[derive(Debug)]
struct Peer {
    unique: Arc<str>,
    rules: Vec<Rule>,
    /// `Some(rules)` once the connection became a monitor (no rules: everything).
    monitor: Option<Vec<Rule>>,
    introspect: Option<Arc<str>>,
    /// Calls this connection made that wait for a reply.
    calling: HashSet<u64>,
    /// Calls routed to this connection that it has not answered.
    serving: HashSet<u64>,
}

#[derive(Debug)]
struct Call {
    caller: ConnId,
    reply_to: Arc<str>,
    correlation: Option<Bytes>,
    callee: ConnId,
    /// The destination as the caller addressed it.
    name: Arc<str>,
    member: Arc<str>,
    qos: u8,
    deadline: Instant,
}

/// The D-Bus layer's state.
#[derive(Debug)]
pub struct Bus {
    cfg: BusConfig,
    auth: Arc<dyn Authorizer>,
    names: Registry,
    peers: HashMap<ConnId, Peer>,
    by_unique: HashMap<Arc<str>, ConnId>,
    next_unique: u64,
    /// Connections with match rules (signals are matched against these only).
    listeners: Vec<ConnId>,
    monitors: Vec<ConnId>,
    calls: HashMap<u64, Call>,
    /// Match rules of every connection (listeners' and monitors'), against `max_rules_total`.
    rules_total: usize,
    deadlines: BTreeSet<(Instant, u64)>,
    next_serial: u64,
    id: String,
    /// What to deliver, in order.
    pub out: Vec<Send>,
}

type DriverResult = Result<Vec<Value>, (&'static str, String)>;

fn user<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
    m.props
        .user
        .iter()
        .find(|(k, _)| &**k == key)
        .map(|(_, v)| &**v)
}

fn kv(k: &str, v: &str) -> (Arc<str>, Arc<str>) {
    (Arc::from(k), Arc::from(v))
}

fn args_of(payload: &[u8]) -> Option<Vec<Value>> {
    if payload.is_empty() {
        return Some(Vec::new());
    }
    serde_json::from_slice::<Vec<Value>>(payload).ok()
}

/// Encode arguments as the payload (a JSON array).
pub fn payload(args: &[Value]) -> Bytes {
    Bytes::from(serde_json::to_vec(args).unwrap_or_else(|_| b"[]".to_vec()))
}

fn qos_of(n: u8) -> QoS {
    super::codec::qos_from(n.min(2)).unwrap_or(QoS::Level0)
}

fn build(
    topic: Arc<str>,
    body: Bytes,
    qos: u8,
    user: Vec<(Arc<str>, Arc<str>)>,
    response_topic: Option<Arc<str>>,
    correlation: Option<Bytes>,
    like: Option<&MessageProps>,
) -> Arc<Message> {
    Arc::new(Message {
        topic,
        payload: body,
        qos: qos_of(qos),
        retain: false,
        props: MessageProps {
            payload_utf8: like.and_then(|p| p.payload_utf8),
            expiry: None,
            content_type: like.and_then(|p| p.content_type.clone()),
            response_topic,
            correlation,
            user,
        },
        expires: None,
    })
}

/// The sender's own user properties that are passed on (the bus's are dropped).
fn passed_on(m: &Message, into: &mut Vec<(Arc<str>, Arc<str>)>) {
    into.extend(
        m.props
            .user
            .iter()
            .filter(|(k, _)| !prop::reserved(k))
            .cloned(),
    );
}

const INTROSPECT_HEADER: &str = "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n";

const STANDARD_INTERFACES: &str = "  <interface name=\"org.freedesktop.DBus.Peer\">\n    <method name=\"Ping\"/>\n  </interface>\n  <interface name=\"org.freedesktop.DBus.Introspectable\">\n    <method name=\"Introspect\">\n      <arg name=\"xml_data\" type=\"s\" direction=\"out\"/>\n    </method>\n  </interface>\n";

fn driver_introspection() -> String {
    let mut s = String::from(INTROSPECT_HEADER);
    s.push_str("<node>\n");
    s.push_str(STANDARD_INTERFACES);
    s.push_str("  <interface name=\"org.freedesktop.DBus\">\n");
    for (m, ins, outs) in [
        ("Hello", "", "s"),
        ("RequestName", "su", "u"),
        ("ReleaseName", "s", "u"),
        ("ListNames", "", "as"),
        ("ListActivatableNames", "", "as"),
        ("NameHasOwner", "s", "b"),
        ("GetNameOwner", "s", "s"),
        ("ListQueuedOwners", "s", "as"),
        ("AddMatch", "s", ""),
        ("RemoveMatch", "s", ""),
        ("GetId", "", "s"),
    ] {
        s.push_str(&format!("    <method name=\"{m}\">\n"));
        for (t, dir) in [(ins, "in"), (outs, "out")] {
            let mut rest = t;
            while !rest.is_empty() {
                let n = if rest.starts_with('a') { 2 } else { 1 };
                s.push_str(&format!(
                    "      <arg type=\"{}\" direction=\"{dir}\"/>\n",
                    &rest[..n]
                ));
                rest = &rest[n..];
            }
        }
        s.push_str("    </method>\n");
    }
    for (sig, t) in [
        ("NameOwnerChanged", "sss"),
        ("NameLost", "s"),
        ("NameAcquired", "s"),
    ] {
        s.push_str(&format!("    <signal name=\"{sig}\">\n"));
        for _ in t.chars() {
            s.push_str("      <arg type=\"s\"/>\n");
        }
        s.push_str("    </signal>\n");
    }
    s.push_str("  </interface>\n  <interface name=\"org.freedesktop.DBus.Monitoring\">\n    <method name=\"BecomeMonitor\">\n      <arg type=\"as\" direction=\"in\"/>\n      <arg type=\"u\" direction=\"in\"/>\n    </method>\n  </interface>\n  <interface name=\"org.socklab.Bus1\">\n    <method name=\"SetIntrospection\">\n      <arg type=\"s\" direction=\"in\"/>\n    </method>\n  </interface>\n</node>\n");
    s
}

fn default_introspection() -> String {
    format!("{INTROSPECT_HEADER}<node>\n{STANDARD_INTERFACES}</node>\n")
}

fn str_arg(args: &[Value], i: usize) -> Result<&str, (&'static str, String)> {
    args.get(i).and_then(Value::as_str).ok_or_else(|| {
        (
            error::INVALID_ARGS,
            format!("argument {i} must be a string"),
        )
    })
}

impl Bus {
    /// An empty bus layer.
    pub fn new(cfg: BusConfig, auth: Arc<dyn Authorizer>) -> Bus {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Bus {
            names: Registry::new(cfg.max_names),
            cfg,
            auth,
            peers: HashMap::new(),
            by_unique: HashMap::new(),
            next_unique: 0,
            listeners: Vec::new(),
            monitors: Vec::new(),
            calls: HashMap::new(),
            rules_total: 0,
            deadlines: BTreeSet::new(),
            next_serial: 0,
            id: format!("{:032x}", t ^ ((std::process::id() as u128) << 64)),
            out: Vec::new(),
        }
    }

    /// The unique name of a connection.
    pub fn unique_name(&self, conn: ConnId) -> Option<&Arc<str>> {
        self.peers.get(&conn).map(|p| &p.unique)
    }

    /// The connection owning `name` (unique or well-known).
    pub fn resolve(&self, name: &str) -> Option<ConnId> {
        if name.starts_with(':') {
            self.by_unique.get(name).copied()
        } else {
            self.names.owner(name)
        }
    }

    /// Calls waiting for a reply (for tests and diagnostics).
    pub fn pending_calls(&self) -> usize {
        self.calls.len()
    }

    /// When the earliest pending call times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|d| d.0)
    }

    /// Whether any connection monitors the bus.
    pub fn has_monitors(&self) -> bool {
        !self.monitors.is_empty()
    }

    /// A connection was accepted (after CONNECT): it gets its unique name (`:1.N`).
    pub fn connected(&mut self, conn: ConnId) -> Arc<str> {
        self.next_unique += 1;
        let unique: Arc<str> = format!(":1.{}", self.next_unique).into();
        self.peers.insert(
            conn,
            Peer {
                unique: unique.clone(),
                rules: Vec::new(),
                monitor: None,
                introspect: None,
                calling: HashSet::new(),
                serving: HashSet::new(),
            },
        );
        self.by_unique.insert(unique.clone(), conn);
        if !self.listeners.is_empty() || !self.monitors.is_empty() {
            self.name_owner_changed(&unique, "", &unique);
        }
        unique
    }

    /// A connection ended: calls it was to answer fail at once with `NoReply`; its names pass
    /// to the next in their queues; its own calls are forgotten.
    pub fn disconnected(&mut self, conn: ConnId) {
        let Some(peer) = self.peers.get_mut(&conn) else {
            return;
        };
        let calling = std::mem::take(&mut peer.calling);
        let serving = std::mem::take(&mut peer.serving);
        self.listeners.retain(|c| *c != conn);
        self.monitors.retain(|c| *c != conn);
        for serial in calling {
            if let Some(c) = self.calls.remove(&serial) {
                self.deadlines.remove(&(c.deadline, serial));
                if let Some(p) = self.peers.get_mut(&c.callee) {
                    p.serving.remove(&serial);
                }
            }
        }
        let mut serving: Vec<u64> = serving.into_iter().collect();
        serving.sort_unstable();
        for serial in serving {
            self.fail(
                serial,
                error::NO_REPLY,
                "the recipient disconnected without replying",
            );
        }
        // The names pass on while the old owner's unique name is still known (for
        // NameOwnerChanged); then the connection is forgotten.
        let mut events = Vec::new();
        self.names.remove_owner(conn, &mut events);
        self.name_events(events);
        let Some(peer) = self.peers.remove(&conn) else {
            return;
        };
        self.rules_total -= peer.rules.len() + peer.monitor.as_ref().map_or(0, Vec::len);
        self.by_unique.remove(&peer.unique);
        if !self.listeners.is_empty() || !self.monitors.is_empty() {
            self.name_owner_changed(&peer.unique, &peer.unique, "");
        }
    }

    /// Calls whose timeout passed fail with `NoReply`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(at, serial)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(c) = self.calls.get(&serial) else {
                continue;
            };
            let msg = format!(
                "no reply to {} from {} within the call's timeout",
                c.member, c.name
            );
            self.fail(serial, error::NO_REPLY, &msg);
        }
    }

    /// A PUBLISH from `from` to a `$bus/` topic.
    pub fn publish(&mut self, from: ConnId, who: &Identity, msg: &Message, now: Instant) {
        if !self.peers.contains_key(&from) {
            return;
        }
        let topic = msg.topic.clone();
        if let Some(dest) = topic.strip_prefix(CALL_TOPIC) {
            self.on_call(from, who, dest, msg, now);
        } else if &*topic == REPLY_TOPIC {
            self.on_reply(from, msg);
        } else if let Some(rest) = topic.strip_prefix(SIGNAL_TOPIC) {
            self.on_signal(from, rest, msg);
        } else {
            tracing::info!(topic = %topic, "publish to an unknown $bus/ topic dropped");
        }
    }

    /// A plain MQTT publication, shown to monitors (only called when there are some).
    pub fn observe(&mut self, from: Option<ConnId>, msg: &Message) {
        let sender = from
            .and_then(|c| self.peers.get(&c))
            .map_or(Arc::from(""), |p| p.unique.clone());
        let mut m = msg.clone();
        m.retain = false;
        m.props.user.insert(0, kv(prop::TYPE, "publish"));
        m.props.user.insert(1, (Arc::from(prop::SENDER), sender));
        let m = Arc::new(m);
        let qos = msg.qos as u8;
        for mon in self.monitors.clone() {
            let rules = self.peers.get(&mon).and_then(|p| p.monitor.as_ref());
            if rules.is_some_and(|r| r.is_empty()) && Some(mon) != from {
                self.out.push(Send {
                    to: mon,
                    msg: m.clone(),
                    qos,
                });
            }
        }
    }

    fn send(&mut self, to: ConnId, msg: Arc<Message>, qos: u8) {
        self.out.push(Send { to, msg, qos });
    }

    fn sender_names(&self, conn: Option<ConnId>) -> Vec<Arc<str>> {
        conn.map(|c| self.names.held_by(c))
            .unwrap_or_default()
            .into_iter()
            .filter(|n| self.names.owner(n) == conn)
            .collect()
    }

    /// Copies for monitors whose rules select the message (not for `receiver`, a monitor
    /// that was sent the message itself, such as the reply to its own `BecomeMonitor`).
    fn copy_to_monitors(
        &mut self,
        msg: &Arc<Message>,
        kind: Kind,
        from: Option<ConnId>,
        receiver: Option<ConnId>,
    ) {
        if self.monitors.is_empty() {
            return;
        }
        let names = self.sender_names(from);
        let args = args_of(&msg.payload);
        let f = Fields {
            kind,
            sender: user(msg, prop::SENDER).unwrap_or(""),
            sender_names: &names,
            path: user(msg, prop::PATH),
            interface: user(msg, prop::INTERFACE),
            member: user(msg, prop::MEMBER),
            destination: user(msg, prop::DESTINATION),
            args: args.as_deref(),
        };
        let mut to = Vec::new();
        for &mon in &self.monitors {
            if Some(mon) == receiver {
                continue;
            }
            if let Some(rules) = self.peers.get(&mon).and_then(|p| p.monitor.as_ref()) {
                if rules.is_empty() || rules.iter().any(|r| r.matches(&f)) {
                    to.push(mon);
                }
            }
        }
        let qos = msg.qos as u8;
        for mon in to {
            self.send(mon, msg.clone(), qos);
        }
    }

    /// An error reply straight to the caller of a message that was never routed.
    fn error_to(&mut self, to: ConnId, call: &Message, name: &str, text: &str) {
        let Some(reply_to) = call.props.response_topic.clone() else {
            tracing::debug!(error = name, "{text} (the call expects no reply)");
            return;
        };
        let user = vec![
            kv(prop::TYPE, Kind::Error.as_str()),
            kv(prop::SENDER, DRIVER),
            kv(prop::ERROR, name),
        ];
        let m = build(
            reply_to,
            payload(&[json!(text)]),
            call.qos as u8,
            user,
            None,
            call.props.correlation.clone(),
            None,
        );
        self.send(to, m.clone(), call.qos as u8);
        self.copy_to_monitors(&m, Kind::Error, None, Some(to));
    }

    /// A reply from the bus itself (driver, `Ping`, `Introspect`).
    fn bus_reply(&mut self, to: ConnId, call: &Message, sender: &str, result: DriverResult) {
        let (name, text, args) = match result {
            Ok(args) => (None, String::new(), args),
            Err((name, text)) => (Some(name), text, Vec::new()),
        };
        if let Some(name) = name {
            self.error_to(to, call, name, &text);
            return;
        }
        let Some(reply_to) = call.props.response_topic.clone() else {
            return;
        };
        let user = vec![
            kv(prop::TYPE, Kind::Return.as_str()),
            kv(prop::SENDER, sender),
        ];
        let m = build(
            reply_to,
            payload(&args),
            call.qos as u8,
            user,
            None,
            call.props.correlation.clone(),
            None,
        );
        self.send(to, m.clone(), call.qos as u8);
        self.copy_to_monitors(&m, Kind::Return, None, Some(to));
    }

    fn on_call(&mut self, from: ConnId, who: &Identity, dest: &str, msg: &Message, now: Instant) {
        let Some(member) = user(msg, prop::MEMBER).filter(|m| !m.is_empty()) else {
            return self.error_to(
                from,
                msg,
                error::INVALID_ARGS,
                "a method call needs the user property \"member\"",
            );
        };
        let member: Arc<str> = member.into();
        let interface = user(msg, prop::INTERFACE).filter(|i| !i.is_empty());
        let path = user(msg, prop::PATH).unwrap_or("/");
        if !path.starts_with('/') {
            return self.error_to(
                from,
                msg,
                error::INVALID_ARGS,
                &format!("the object path {path:?} is not absolute"),
            );
        }
        let timeout = match user(msg, prop::TIMEOUT) {
            None => self.cfg.default_timeout,
            Some(t) => match t.parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms).min(self.cfg.max_timeout),
                Err(_) => {
                    return self.error_to(
                        from,
                        msg,
                        error::INVALID_ARGS,
                        &format!("timeout {t:?} is not a number of milliseconds"),
                    )
                }
            },
        };
        if dest == DRIVER {
            self.copy_call_to_monitors(from, msg, dest, path, interface, &member, None);
            let result = self.driver(from, who, interface, &member, &msg.payload);
            return self.bus_reply(from, msg, DRIVER, result);
        }
        let Some(callee) = self.resolve(dest) else {
            return self.error_to(
                from,
                msg,
                error::SERVICE_UNKNOWN,
                &format!("the name {dest} is not owned by any connection"),
            );
        };
        // The standard interfaces every connection answers (the bus answers for it).
        let standard = match (interface, &*member) {
            (None | Some(PEER), "Ping") => Some(Ok(Vec::new())),
            (None | Some(INTROSPECTABLE), "Introspect") => {
                let doc = self
                    .peers
                    .get(&callee)
                    .and_then(|p| p.introspect.as_ref())
                    .map_or_else(default_introspection, |d| d.to_string());
                Some(Ok(vec![json!(doc)]))
            }
            (Some(PEER | INTROSPECTABLE), m) => Some(Err((
                error::UNKNOWN_METHOD,
                format!("no method {m} in interface {}", interface.unwrap_or("")),
            ))),
            _ => None,
        };
        if let Some(result) = standard {
            let sender = self.peers.get(&callee).map(|p| p.unique.clone());
            self.copy_call_to_monitors(from, msg, dest, path, interface, &member, None);
            return self.bus_reply(from, msg, sender.as_deref().unwrap_or(dest), result);
        }
        if !self.auth.call(who, dest, interface, &member) {
            tracing::info!(client = %who.client_id, destination = dest, member = %member, "call denied");
            return self.error_to(
                from,
                msg,
                error::ACCESS_DENIED,
                &format!("not allowed to call {member} on {dest}"),
            );
        }
        let caller_unique = self.peers.get(&from).map(|p| p.unique.clone());
        let Some(caller_unique) = caller_unique else {
            return;
        };
        let reply = match &msg.props.response_topic {
            Some(rt) => {
                if self.peers.get(&from).map_or(0, |p| p.calling.len()) >= self.cfg.max_pending {
                    return self.error_to(
                        from,
                        msg,
                        error::LIMITS_EXCEEDED,
                        &format!(
                            "more than {} calls waiting for replies",
                            self.cfg.max_pending
                        ),
                    );
                }
                if self.calls.len() >= self.cfg.max_pending_total {
                    tracing::warn!(
                        calls = self.calls.len(),
                        "the bus's cap of calls waiting for replies is reached"
                    );
                    return self.error_to(
                        from,
                        msg,
                        error::LIMITS_EXCEEDED,
                        &format!(
                            "the bus has {} calls waiting for replies, its limit",
                            self.cfg.max_pending_total
                        ),
                    );
                }
                self.next_serial += 1;
                let serial = self.next_serial;
                let deadline = now + timeout;
                self.calls.insert(
                    serial,
                    Call {
                        caller: from,
                        reply_to: rt.clone(),
                        correlation: msg.props.correlation.clone(),
                        callee,
                        name: dest.into(),
                        member: member.clone(),
                        qos: msg.qos as u8,
                        deadline,
                    },
                );
                self.deadlines.insert((deadline, serial));
                if let Some(p) = self.peers.get_mut(&from) {
                    p.calling.insert(serial);
                }
                if let Some(p) = self.peers.get_mut(&callee) {
                    p.serving.insert(serial);
                }
                Some(serial)
            }
            None => None,
        };
        let mut up = vec![
            kv(prop::TYPE, Kind::Call.as_str()),
            (Arc::from(prop::SENDER), caller_unique),
            kv(prop::DESTINATION, dest),
            kv(prop::PATH, path),
        ];
        if let Some(i) = interface {
            up.push(kv(prop::INTERFACE, i));
        }
        up.push((Arc::from(prop::MEMBER), member.clone()));
        passed_on(msg, &mut up);
        let m = build(
            msg.topic.clone(),
            msg.payload.clone(),
            msg.qos as u8,
            up,
            reply.map(|_| Arc::from(REPLY_TOPIC)),
            reply.map(|s| Bytes::copy_from_slice(&s.to_be_bytes())),
            Some(&msg.props),
        );
        self.send(callee, m.clone(), msg.qos as u8);
        if !self.monitors.is_empty() {
            let mut copy = (*m).clone();
            if let Some(s) = reply {
                copy.props.user.push(kv(prop::SERIAL, &s.to_string()));
            }
            self.copy_to_monitors(&Arc::new(copy), Kind::Call, Some(from), Some(callee));
        }
    }

    /// Monitors' copy of a call the bus answers itself.
    #[allow(clippy::too_many_arguments)]
    fn copy_call_to_monitors(
        &mut self,
        from: ConnId,
        msg: &Message,
        dest: &str,
        path: &str,
        interface: Option<&str>,
        member: &str,
        serial: Option<u64>,
    ) {
        if self.monitors.is_empty() {
            return;
        }
        let Some(sender) = self.peers.get(&from).map(|p| p.unique.clone()) else {
            return;
        };
        let mut up = vec![
            kv(prop::TYPE, Kind::Call.as_str()),
            (Arc::from(prop::SENDER), sender),
            kv(prop::DESTINATION, dest),
            kv(prop::PATH, path),
        ];
        if let Some(i) = interface {
            up.push(kv(prop::INTERFACE, i));
        }
        up.push(kv(prop::MEMBER, member));
        if let Some(s) = serial {
            up.push(kv(prop::SERIAL, &s.to_string()));
        }
        let m = build(
            msg.topic.clone(),
            msg.payload.clone(),
            msg.qos as u8,
            up,
            None,
            None,
            Some(&msg.props),
        );
        self.copy_to_monitors(&m, Kind::Call, Some(from), None);
    }

    fn on_reply(&mut self, from: ConnId, msg: &Message) {
        let serial = msg
            .props
            .correlation
            .as_ref()
            .and_then(|c| <[u8; 8]>::try_from(&c[..]).ok())
            .map(u64::from_be_bytes);
        let Some(serial) = serial else {
            tracing::info!("reply without the 8-byte correlation data of a call: dropped");
            return;
        };
        match self.calls.get(&serial) {
            Some(c) if c.callee == from => {}
            Some(_) => {
                tracing::info!(
                    serial,
                    "reply from a connection the call was not routed to: dropped"
                );
                return;
            }
            None => {
                tracing::debug!(serial, "reply to a call that is no longer waiting: dropped");
                return;
            }
        }
        let c = self.calls.remove(&serial).expect("checked");
        self.deadlines.remove(&(c.deadline, serial));
        if let Some(p) = self.peers.get_mut(&c.caller) {
            p.calling.remove(&serial);
        }
        let sender = match self.peers.get_mut(&from) {
            Some(p) => {
                p.serving.remove(&serial);
                p.unique.clone()
            }
            None => return,
        };
        let err = user(msg, prop::ERROR).filter(|e| !e.is_empty());
        let kind = if err.is_some() {
            Kind::Error
        } else {
            Kind::Return
        };
        let mut up = vec![
            kv(prop::TYPE, kind.as_str()),
            (Arc::from(prop::SENDER), sender),
        ];
        if let Some(e) = err {
            up.push(kv(prop::ERROR, e));
        }
        passed_on(msg, &mut up);
        let m = build(
            c.reply_to.clone(),
            msg.payload.clone(),
            c.qos,
            up,
            None,
            c.correlation.clone(),
            Some(&msg.props),
        );
        self.send(c.caller, m.clone(), c.qos);
        if !self.monitors.is_empty() {
            let mut copy = (*m).clone();
            copy.props
                .user
                .push(kv(prop::REPLY_SERIAL, &serial.to_string()));
            if let Some(u) = self.peers.get(&c.caller).map(|p| p.unique.clone()) {
                copy.props.user.push((Arc::from(prop::DESTINATION), u));
            }
            self.copy_to_monitors(&Arc::new(copy), kind, Some(from), Some(c.caller));
        }
    }

    /// Fail a waiting call with an error from the bus.
    fn fail(&mut self, serial: u64, name: &str, text: &str) {
        let Some(c) = self.calls.remove(&serial) else {
            return;
        };
        self.deadlines.remove(&(c.deadline, serial));
        if let Some(p) = self.peers.get_mut(&c.callee) {
            p.serving.remove(&serial);
        }
        let Some(p) = self.peers.get_mut(&c.caller) else {
            return;
        };
        p.calling.remove(&serial);
        let user = vec![
            kv(prop::TYPE, Kind::Error.as_str()),
            kv(prop::SENDER, DRIVER),
            kv(prop::ERROR, name),
        ];
        let m = build(
            c.reply_to.clone(),
            payload(&[json!(text)]),
            c.qos,
            user,
            None,
            c.correlation.clone(),
            None,
        );
        self.send(c.caller, m.clone(), c.qos);
        self.copy_to_monitors(&m, Kind::Error, None, Some(c.caller));
    }

    fn on_signal(&mut self, from: ConnId, rest: &str, msg: &Message) {
        let Some((interface, member)) = rest.rsplit_once('/') else {
            tracing::info!(topic = %msg.topic, "a signal's topic is $bus/signal/INTERFACE/MEMBER: dropped");
            return;
        };
        if interface.is_empty() || member.is_empty() || interface.contains('/') {
            tracing::info!(topic = %msg.topic, "a signal's topic is $bus/signal/INTERFACE/MEMBER: dropped");
            return;
        }
        let path = user(msg, prop::PATH).unwrap_or("/");
        let dest = user(msg, prop::DESTINATION).filter(|d| !d.is_empty());
        let Some(sender) = self.peers.get(&from).map(|p| p.unique.clone()) else {
            return;
        };
        let mut up = vec![
            kv(prop::TYPE, Kind::Signal.as_str()),
            (Arc::from(prop::SENDER), sender.clone()),
            kv(prop::PATH, path),
            kv(prop::INTERFACE, interface),
            kv(prop::MEMBER, member),
        ];
        if let Some(d) = dest {
            up.push(kv(prop::DESTINATION, d));
        }
        passed_on(msg, &mut up);
        let m = build(
            msg.topic.clone(),
            msg.payload.clone(),
            msg.qos as u8,
            up,
            None,
            None,
            Some(&msg.props),
        );
        self.signal(m, Some(from), &sender);
    }

    /// Deliver a signal: to its destination if it has one, else to every connection with a
    /// rule that selects it; and to monitors.
    fn signal(&mut self, m: Arc<Message>, from: Option<ConnId>, sender: &str) {
        let qos = m.qos as u8;
        let direct = user(&m, prop::DESTINATION).and_then(|d| self.resolve(d));
        if user(&m, prop::DESTINATION).is_some() {
            if let Some(to) = direct {
                self.send(to, m.clone(), qos);
            }
        } else if !self.listeners.is_empty() {
            let names = self.sender_names(from);
            let needs_args = self.listeners.iter().any(|l| {
                self.peers
                    .get(l)
                    .is_some_and(|p| p.rules.iter().any(Rule::needs_args))
            });
            let args = if needs_args {
                args_of(&m.payload)
            } else {
                None
            };
            let f = Fields {
                kind: Kind::Signal,
                sender,
                sender_names: &names,
                path: user(&m, prop::PATH),
                interface: user(&m, prop::INTERFACE),
                member: user(&m, prop::MEMBER),
                destination: None,
                args: args.as_deref(),
            };
            let mut to = Vec::new();
            for &l in &self.listeners {
                if self
                    .peers
                    .get(&l)
                    .is_some_and(|p| p.rules.iter().any(|r| r.matches(&f)))
                {
                    to.push(l);
                }
            }
            for l in to {
                self.send(l, m.clone(), qos);
            }
        }
        self.copy_to_monitors(&m, Kind::Signal, from, direct);
    }

    /// A signal from the bus itself (`NameOwnerChanged`, `NameAcquired`, `NameLost`).
    fn driver_signal(&mut self, to: Option<ConnId>, member: &str, args: &[Value]) {
        let mut up = vec![
            kv(prop::TYPE, Kind::Signal.as_str()),
            kv(prop::SENDER, DRIVER),
            kv(prop::PATH, DRIVER_PATH),
            kv(prop::INTERFACE, DRIVER),
            kv(prop::MEMBER, member),
        ];
        if let Some(u) = to
            .and_then(|c| self.peers.get(&c))
            .map(|p| p.unique.clone())
        {
            up.push((Arc::from(prop::DESTINATION), u));
        } else if to.is_some() {
            return;
        }
        let m = build(
            format!("{SIGNAL_TOPIC}{DRIVER}/{member}").into(),
            payload(args),
            0,
            up,
            None,
            None,
            None,
        );
        self.signal(m, None, DRIVER);
    }

    fn name_owner_changed(&mut self, name: &str, old: &str, new: &str) {
        self.driver_signal(
            None,
            "NameOwnerChanged",
            &[json!(name), json!(old), json!(new)],
        );
    }

    fn name_events(&mut self, events: Vec<NameEvent>) {
        for e in events {
            match e {
                NameEvent::Lost { owner, name } => {
                    // Calls to this name that its old owner has not answered fail now.
                    let serials: Vec<u64> = self
                        .peers
                        .get(&owner)
                        .map(|p| {
                            let mut v: Vec<u64> = p
                                .serving
                                .iter()
                                .copied()
                                .filter(|s| self.calls.get(s).is_some_and(|c| c.name == name))
                                .collect();
                            v.sort_unstable();
                            v
                        })
                        .unwrap_or_default();
                    for s in serials {
                        self.fail(
                            s,
                            error::NO_REPLY,
                            &format!("the recipient gave up the name {name} without replying"),
                        );
                    }
                    self.driver_signal(Some(owner), "NameLost", &[json!(&*name)]);
                }
                NameEvent::OwnerChanged { name, old, new } => {
                    let u = |c: Option<ConnId>| {
                        c.and_then(|c| self.peers.get(&c))
                            .map_or(String::new(), |p| p.unique.to_string())
                    };
                    let (old, new) = (u(old), u(new));
                    self.name_owner_changed(&name, &old, &new);
                }
                NameEvent::Acquired { owner, name } => {
                    self.driver_signal(Some(owner), "NameAcquired", &[json!(&*name)]);
                }
            }
        }
    }

    /// The bus driver's methods.
    fn driver(
        &mut self,
        from: ConnId,
        who: &Identity,
        interface: Option<&str>,
        member: &str,
        body: &[u8],
    ) -> DriverResult {
        let Some(args) = args_of(body) else {
            return Err((
                error::INVALID_ARGS,
                "the arguments must be a JSON array".into(),
            ));
        };
        match (interface, member) {
            (None | Some(PEER), "Ping") => return Ok(vec![]),
            (None | Some(INTROSPECTABLE), "Introspect") => {
                return Ok(vec![json!(driver_introspection())])
            }
            (None | Some(MONITORING), "BecomeMonitor") => {
                let mut rules = Vec::new();
                if let Some(list) = args.first() {
                    let Some(list) = list.as_array() else {
                        return Err((
                            error::INVALID_ARGS,
                            "argument 0 must be an array of match rules".into(),
                        ));
                    };
                    let mine = self.peers.get(&from).map_or(0, |p| p.rules.len());
                    if list.len() > self.cfg.max_rules
                        || self.rules_total - mine + list.len() > self.cfg.max_rules_total
                    {
                        return Err((
                            error::LIMITS_EXCEEDED,
                            format!(
                                "at most {} match rules per connection, {} on the bus",
                                self.cfg.max_rules, self.cfg.max_rules_total
                            ),
                        ));
                    }
                    for r in list {
                        let Some(text) = r.as_str() else {
                            return Err((
                                error::INVALID_ARGS,
                                "argument 0 must be an array of match rules (strings)".into(),
                            ));
                        };
                        rules.push(
                            Rule::parse(text)
                                .map_err(|e| (error::MATCH_RULE_INVALID, e.to_string()))?,
                        );
                    }
                }
                // A monitor is passive: it gives up its names and its match rules.
                let mut events = Vec::new();
                self.names.remove_owner(from, &mut events);
                self.name_events(events);
                if let Some(p) = self.peers.get_mut(&from) {
                    let old = p.rules.len() + p.monitor.as_ref().map_or(0, Vec::len);
                    self.rules_total = self.rules_total - old + rules.len();
                    p.rules.clear();
                    p.monitor = Some(rules);
                }
                self.listeners.retain(|c| *c != from);
                if !self.monitors.contains(&from) {
                    self.monitors.push(from);
                }
                return Ok(vec![]);
            }
            (None | Some(SOCKLAB), "SetIntrospection") => {
                let doc = str_arg(&args, 0)?;
                if doc.len() > self.cfg.max_introspect {
                    return Err((
                        error::LIMITS_EXCEEDED,
                        format!("introspection data over {} bytes", self.cfg.max_introspect),
                    ));
                }
                if let Some(p) = self.peers.get_mut(&from) {
                    p.introspect = (!doc.is_empty()).then(|| Arc::from(doc));
                }
                return Ok(vec![]);
            }
            (None | Some(DRIVER), _) => {}
            (Some(i), m) => {
                return Err((
                    error::UNKNOWN_METHOD,
                    format!("the bus has no method {m} in interface {i}"),
                ))
            }
        }
        match member {
            "Hello" | "GetUniqueName" => {
                let u = self.peers.get(&from).map(|p| p.unique.to_string());
                Ok(vec![json!(u.unwrap_or_default())])
            }
            "RequestName" => {
                let name = str_arg(&args, 0)?;
                let flags = match args.get(1) {
                    None => 0,
                    Some(v) => v.as_u64().filter(|f| *f <= u32::MAX as u64).ok_or((
                        error::INVALID_ARGS,
                        "argument 1 (flags) must be an unsigned number".to_string(),
                    ))? as u32,
                };
                if names::valid_well_known(name) && !self.auth.own(who, name) {
                    tracing::info!(client = %who.client_id, name, "name ownership denied");
                    return Err((
                        error::ACCESS_DENIED,
                        format!("not allowed to own the name {name}"),
                    ));
                }
                if self.names.owner(name).is_none() && self.names.len() >= self.cfg.max_names_total
                {
                    return Err((
                        error::LIMITS_EXCEEDED,
                        format!(
                            "the bus holds {} names, its limit",
                            self.cfg.max_names_total
                        ),
                    ));
                }
                let mut events = Vec::new();
                let r = self.names.request(name, from, flags, &mut events);
                match r {
                    Ok(reply) => {
                        self.name_events(events);
                        Ok(vec![json!(reply as u32)])
                    }
                    Err(names::NameError::TooMany(n)) => Err((
                        error::LIMITS_EXCEEDED,
                        format!("a connection may own or wait for at most {n} names"),
                    )),
                    Err(e) => Err((error::INVALID_ARGS, e.to_string())),
                }
            }
            "ReleaseName" => {
                let name = str_arg(&args, 0)?;
                if !names::valid_well_known(name) {
                    return Err((
                        error::INVALID_ARGS,
                        format!("{name:?} is not a valid well-known name"),
                    ));
                }
                let mut events = Vec::new();
                let r = self.names.release(name, from, &mut events);
                self.name_events(events);
                Ok(vec![json!(r as u32)])
            }
            "ListNames" => {
                let mut v = vec![json!(DRIVER)];
                v.extend(self.names.names().iter().map(|n| json!(&**n)));
                let mut uniques: Vec<(u64, &Arc<str>)> = self
                    .by_unique
                    .keys()
                    .map(|u| (u[3..].parse().unwrap_or(0), u))
                    .collect();
                uniques.sort();
                v.extend(uniques.iter().map(|(_, u)| json!(&***u)));
                Ok(vec![Value::Array(v)])
            }
            "ListActivatableNames" => Ok(vec![json!([DRIVER])]),
            "NameHasOwner" => {
                let name = str_arg(&args, 0)?;
                Ok(vec![json!(name == DRIVER || self.resolve(name).is_some())])
            }
            "GetNameOwner" => {
                let name = str_arg(&args, 0)?;
                if name == DRIVER {
                    return Ok(vec![json!(DRIVER)]);
                }
                match self.resolve(name).and_then(|c| self.peers.get(&c)) {
                    Some(p) => Ok(vec![json!(&*p.unique)]),
                    None => Err((
                        error::NAME_HAS_NO_OWNER,
                        format!("the name {name} has no owner"),
                    )),
                }
            }
            "ListQueuedOwners" => {
                let name = str_arg(&args, 0)?;
                let q: Vec<Value> = if name.starts_with(':') {
                    self.resolve(name)
                        .map(|_| json!(name))
                        .into_iter()
                        .collect()
                } else {
                    self.names
                        .queue(name)
                        .iter()
                        .filter_map(|c| self.peers.get(c))
                        .map(|p| json!(&*p.unique))
                        .collect()
                };
                if q.is_empty() {
                    return Err((
                        error::NAME_HAS_NO_OWNER,
                        format!("the name {name} has no owner"),
                    ));
                }
                Ok(vec![Value::Array(q)])
            }
            "AddMatch" => {
                let rule = Rule::parse(str_arg(&args, 0)?)
                    .map_err(|e| (error::MATCH_RULE_INVALID, e.to_string()))?;
                let max = self.cfg.max_rules;
                let Some(p) = self.peers.get_mut(&from) else {
                    return Ok(vec![]);
                };
                if p.rules.len() >= max {
                    return Err((
                        error::LIMITS_EXCEEDED,
                        format!("a connection may add at most {max} match rules"),
                    ));
                }
                if self.rules_total >= self.cfg.max_rules_total {
                    return Err((
                        error::LIMITS_EXCEEDED,
                        format!(
                            "the bus holds {} match rules, its limit",
                            self.cfg.max_rules_total
                        ),
                    ));
                }
                p.rules.push(rule);
                self.rules_total += 1;
                if !self.listeners.contains(&from) {
                    self.listeners.push(from);
                }
                Ok(vec![])
            }
            "RemoveMatch" => {
                let rule = Rule::parse(str_arg(&args, 0)?)
                    .map_err(|e| (error::MATCH_RULE_INVALID, e.to_string()))?;
                let Some(p) = self.peers.get_mut(&from) else {
                    return Ok(vec![]);
                };
                let Some(i) = p.rules.iter().position(|r| r.same(&rule)) else {
                    return Err((
                        error::MATCH_RULE_NOT_FOUND,
                        format!("no rule {:?} was added", rule.text),
                    ));
                };
                p.rules.remove(i);
                self.rules_total -= 1;
                if p.rules.is_empty() {
                    self.listeners.retain(|c| *c != from);
                }
                Ok(vec![])
            }
            "GetId" => Ok(vec![json!(self.id)]),
            m => Err((error::UNKNOWN_METHOD, format!("the bus has no method {m}"))),
        }
    }
}

/// `ReleaseName`'s reply as a number (for clients).
pub fn release_reply(n: u64) -> Option<ReleaseReply> {
    Some(match n {
        1 => ReleaseReply::Released,
        2 => ReleaseReply::NonExistent,
        3 => ReleaseReply::NotOwner,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::broker::{AllowAll, Broker, BrokerConfig, Out};
    use crate::bus::codec::Version;
    use mqtt_proto::v5;
    use mqtt_proto::{QosPid, TopicName};

    fn broker() -> Broker {
        Broker::new(BrokerConfig::default(), Arc::new(AllowAll), Instant::now())
    }

    fn connect(b: &mut Broker, conn: ConnId) {
        let c = v5::Connect::new(format!("c{conn}").into(), 60);
        b.connect(conn, Version::V5, c, Identity::default(), Instant::now());
    }

    fn publish(
        b: &mut Broker,
        conn: ConnId,
        topic: &str,
        props: &[(&str, &str)],
        args: Value,
        reply: Option<&[u8]>,
        now: Instant,
    ) {
        let mut p = v5::Publish::new(
            QosPid::Level0,
            TopicName::try_from(topic).unwrap(),
            Bytes::from(serde_json::to_vec(&args).unwrap()),
        );
        p.properties.user_properties = props
            .iter()
            .map(|(k, v)| v5::UserProperty {
                name: (*k).into(),
                value: (*v).into(),
            })
            .collect();
        if let Some(c) = reply {
            p.properties.response_topic =
                Some(TopicName::try_from(format!("r/{conn}").as_str()).unwrap());
            p.properties.correlation_data = Some(Bytes::copy_from_slice(c));
        }
        b.packet(conn, v5::Packet::Publish(p), now);
    }

    fn call(b: &mut Broker, conn: ConnId, dest: &str, member: &str, args: Value, corr: &[u8]) {
        publish(
            b,
            conn,
            &format!("{CALL_TOPIC}{dest}"),
            &[(prop::MEMBER, member)],
            args,
            Some(corr),
            Instant::now(),
        );
    }

    /// Messages delivered since the last look, as (connection, message).
    fn taken(b: &mut Broker) -> Vec<(ConnId, Arc<Message>)> {
        b.out
            .drain(..)
            .filter_map(|(c, o)| match o {
                Out::Publish(d) => Some((c, d.msg)),
                _ => None,
            })
            .collect()
    }

    fn args(m: &Message) -> Vec<Value> {
        args_of(&m.payload).unwrap()
    }

    /// (connection, kind, member or error, args) of each delivery: what a party "sees".
    fn seen(b: &mut Broker) -> Vec<(ConnId, String, String, Vec<Value>)> {
        taken(b)
            .into_iter()
            .map(|(c, m)| {
                let kind = user(&m, prop::TYPE).unwrap_or("").to_string();
                let what = user(&m, prop::MEMBER)
                    .or(user(&m, prop::ERROR))
                    .unwrap_or("")
                    .to_string();
                (c, kind, what, args(&m))
            })
            .collect()
    }

    #[test]
    fn unique_names_are_in_connack_and_resolvable() {
        let mut b = broker();
        connect(&mut b, 7);
        let unique = b.out.iter().find_map(|(_, o)| match o {
            Out::Packet(p) => match &**p {
                v5::Packet::Connack(c) => c
                    .properties
                    .user_properties
                    .iter()
                    .find(|u| &*u.name == prop::UNIQUE_NAME)
                    .map(|u| u.value.to_string()),
                _ => None,
            },
            _ => None,
        });
        assert_eq!(unique.as_deref(), Some(":1.1"));
        assert_eq!(b.bus().resolve(":1.1"), Some(7));
    }

    #[test]
    fn request_name_events_come_before_the_reply_and_handover_on_disconnect() {
        let mut b = broker();
        for c in [1, 2, 3] {
            connect(&mut b, c);
        }
        call(
            &mut b,
            3,
            DRIVER,
            "AddMatch",
            json!(["type='signal',member='NameOwnerChanged',arg0='a.b'"]),
            b"m",
        );
        taken(&mut b);
        call(&mut b, 1, DRIVER, "RequestName", json!(["a.b", 0]), b"x");
        let s = |c: ConnId, k: &str, w: &str, a: Value| {
            (
                c,
                k.to_string(),
                w.to_string(),
                a.as_array().unwrap().clone(),
            )
        };
        assert_eq!(
            seen(&mut b),
            vec![
                s(3, "signal", "NameOwnerChanged", json!(["a.b", "", ":1.1"])),
                s(1, "signal", "NameAcquired", json!(["a.b"])),
                s(1, "method_return", "", json!([1])),
            ]
        );
        call(&mut b, 2, DRIVER, "RequestName", json!(["a.b", 0]), b"y");
        assert_eq!(seen(&mut b), vec![s(2, "method_return", "", json!([2]))]);
        b.closed(1, true, Instant::now());
        assert_eq!(
            seen(&mut b),
            vec![
                s(
                    3,
                    "signal",
                    "NameOwnerChanged",
                    json!(["a.b", ":1.1", ":1.2"])
                ),
                s(2, "signal", "NameAcquired", json!(["a.b"])),
            ]
        );
    }

    #[test]
    fn calls_reach_the_owner_only_and_replies_the_caller_only() {
        let mut b = broker();
        for c in [1, 2, 3] {
            connect(&mut b, c);
        }
        call(&mut b, 1, DRIVER, "RequestName", json!(["svc.x", 4]), b"o");
        // 3 listens to everything: it still sees no call or reply.
        call(&mut b, 3, DRIVER, "AddMatch", json!([""]), b"m");
        taken(&mut b);
        call(&mut b, 2, "svc.x", "Add", json!([2, 3]), b"corr-2");
        let got = taken(&mut b);
        assert_eq!(got.len(), 1);
        let (to, m) = &got[0];
        assert_eq!(*to, 1);
        assert_eq!(user(m, prop::SENDER), Some(":1.2"));
        assert_eq!(user(m, prop::MEMBER), Some("Add"));
        assert_eq!(m.props.response_topic.as_deref(), Some(REPLY_TOPIC));
        let corr = m.props.correlation.clone().unwrap();
        assert_eq!(corr.len(), 8);
        // A reply from someone else is dropped.
        let reply = |b: &mut Broker, from: ConnId, props: &[(&str, &str)], a: Value| {
            let mut p = v5::Publish::new(
                QosPid::Level0,
                TopicName::try_from(REPLY_TOPIC).unwrap(),
                payload(a.as_array().unwrap()),
            );
            p.properties.correlation_data = Some(corr.clone());
            p.properties.user_properties = props
                .iter()
                .map(|(k, v)| v5::UserProperty {
                    name: (*k).into(),
                    value: (*v).into(),
                })
                .collect();
            b.packet(from, v5::Packet::Publish(p), Instant::now());
        };
        reply(&mut b, 3, &[], json!([0]));
        assert!(taken(&mut b).is_empty());
        reply(&mut b, 1, &[], json!([5]));
        let got = taken(&mut b);
        assert_eq!(got.len(), 1);
        let (to, m) = &got[0];
        assert_eq!((*to, args(m)), (2, vec![json!(5)]));
        assert_eq!(&*m.topic, "r/2");
        assert_eq!(m.props.correlation.as_deref(), Some(&b"corr-2"[..]));
        assert_eq!(user(m, prop::TYPE), Some("method_return"));
        // Answered once: a second reply goes nowhere.
        reply(&mut b, 1, &[], json!([6]));
        assert!(taken(&mut b).is_empty());
        // An error reply.
        call(&mut b, 2, "svc.x", "Div", json!([1, 0]), b"c3");
        let corr2 = taken(&mut b)[0].1.props.correlation.clone().unwrap();
        let mut p = v5::Publish::new(
            QosPid::Level0,
            TopicName::try_from(REPLY_TOPIC).unwrap(),
            payload(&[json!("division by zero")]),
        );
        p.properties.correlation_data = Some(corr2);
        p.properties.user_properties = vec![v5::UserProperty {
            name: prop::ERROR.into(),
            value: "x.DivByZero".into(),
        }];
        b.packet(1, v5::Packet::Publish(p), Instant::now());
        let got = seen(&mut b);
        assert_eq!(
            got,
            vec![(
                2,
                "error".into(),
                "x.DivByZero".into(),
                vec![json!("division by zero")]
            )]
        );
        assert_eq!(b.bus().pending_calls(), 0);
    }

    #[test]
    fn no_reply_on_disconnect_release_and_timeout_and_service_unknown() {
        let mut b = broker();
        for c in [1, 2] {
            connect(&mut b, c);
        }
        call(&mut b, 2, "nobody.here", "M", json!([]), b"a");
        assert_eq!(
            seen(&mut b)[0],
            (
                2,
                "error".into(),
                error::SERVICE_UNKNOWN.into(),
                vec![json!("the name nobody.here is not owned by any connection")]
            )
        );
        call(&mut b, 1, DRIVER, "RequestName", json!(["svc.y", 0]), b"o");
        call(&mut b, 2, "svc.y", "Slow", json!([]), b"b");
        taken(&mut b);
        call(&mut b, 1, DRIVER, "ReleaseName", json!(["svc.y"]), b"r");
        let got = seen(&mut b);
        assert_eq!(got[0].0, 2);
        assert_eq!(got[0].2, error::NO_REPLY);
        // The releaser sees NameLost, then its reply.
        assert_eq!(got[1].2, "NameLost");
        assert_eq!((got[2].0, got[2].3.clone()), (1, vec![json!(1)]));
        // Owner disconnects mid-call.
        call(&mut b, 1, DRIVER, "RequestName", json!(["svc.y", 0]), b"o");
        call(&mut b, 2, "svc.y", "Slow", json!([]), b"c");
        taken(&mut b);
        b.closed(1, true, Instant::now());
        let got = seen(&mut b);
        assert_eq!(got[0].0, 2);
        assert_eq!(got[0].2, error::NO_REPLY);
        assert_eq!(
            got[0].3,
            vec![json!("the recipient disconnected without replying")]
        );
        // A timeout: the owner never answers.
        connect(&mut b, 3);
        call(&mut b, 3, DRIVER, "RequestName", json!(["svc.z", 0]), b"o");
        let t0 = Instant::now();
        publish(
            &mut b,
            2,
            &format!("{CALL_TOPIC}svc.z"),
            &[(prop::MEMBER, "Slow"), (prop::TIMEOUT, "300")],
            json!([]),
            Some(b"d"),
            t0,
        );
        taken(&mut b);
        assert_eq!(
            b.next_call_deadline(),
            Some(t0 + Duration::from_millis(300))
        );
        b.expire_calls(t0 + Duration::from_millis(299));
        assert!(taken(&mut b).is_empty());
        b.expire_calls(t0 + Duration::from_millis(300));
        let got = seen(&mut b);
        assert_eq!((got[0].0, got[0].2.as_str()), (2, error::NO_REPLY));
        assert_eq!(b.bus().pending_calls(), 0);
        assert_eq!(b.next_call_deadline(), None);
    }

    #[test]
    fn calls_waiting_for_replies_are_capped_per_connection_and_in_all() {
        let cfg = BrokerConfig {
            bus: BusConfig {
                max_pending: 3,
                max_pending_total: 5,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut b = Broker::new(cfg, Arc::new(AllowAll), Instant::now());
        for c in [1, 2, 3] {
            connect(&mut b, c);
        }
        call(
            &mut b,
            1,
            DRIVER,
            "RequestName",
            json!(["svc.never", 0]),
            b"o",
        );
        taken(&mut b);
        let refused = |b: &mut Broker, from: ConnId| {
            call(b, from, "svc.never", "Wait", json!([]), b"w");
            seen(b)
                .into_iter()
                .filter(|(c, _, w, _)| *c == from && w == error::LIMITS_EXCEEDED)
                .count()
        };
        // Three from connection 2 reach the owner; its fourth is refused.
        assert_eq!((0..3).map(|_| refused(&mut b, 2)).sum::<usize>(), 0);
        assert_eq!(refused(&mut b, 2), 1);
        // Two more from connection 3 fill the bus's cap; the next is refused.
        assert_eq!((0..2).map(|_| refused(&mut b, 3)).sum::<usize>(), 0);
        assert_eq!(refused(&mut b, 3), 1);
        assert_eq!(b.bus().pending_calls(), 5);
        // The owner leaves: every waiting call is answered NoReply, and room is free again.
        b.closed(1, true, Instant::now());
        let no_reply = seen(&mut b)
            .into_iter()
            .filter(|(_, _, w, _)| w == error::NO_REPLY)
            .count();
        assert_eq!(no_reply, 5);
        assert_eq!(b.bus().pending_calls(), 0);
    }

    #[test]
    fn rules_and_names_are_capped_per_connection_and_on_the_bus() {
        let cfg = BrokerConfig {
            bus: BusConfig {
                max_rules: 3,
                max_rules_total: 4,
                max_names_total: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut b = Broker::new(cfg, Arc::new(AllowAll), Instant::now());
        for c in [1, 2, 3] {
            connect(&mut b, c);
        }
        let add = |b: &mut Broker, c: ConnId, rule: &str| {
            call(b, c, DRIVER, "AddMatch", json!([rule]), b"m");
            seen(b).pop().map(|s| s.2).unwrap_or_default()
        };
        for r in ["member='A'", "member='B'", "member='C'"] {
            assert_eq!(add(&mut b, 1, r), "");
        }
        assert_eq!(add(&mut b, 1, "member='D'"), error::LIMITS_EXCEEDED);
        assert_eq!(add(&mut b, 2, "member='A'"), "");
        assert_eq!(add(&mut b, 2, "member='B'"), error::LIMITS_EXCEEDED);
        // A monitor's rules count too, and a list longer than the per-connection cap fails.
        call(
            &mut b,
            3,
            DRIVER,
            "BecomeMonitor",
            json!([["", "", "", ""], 0]),
            b"m",
        );
        assert_eq!(seen(&mut b)[0].2, error::LIMITS_EXCEEDED);
        // Rules come back when they are removed or their connection goes.
        call(
            &mut b,
            1,
            DRIVER,
            "RemoveMatch",
            json!(["member='A'"]),
            b"m",
        );
        taken(&mut b);
        assert_eq!(add(&mut b, 2, "member='B'"), "");
        b.closed(1, true, Instant::now());
        taken(&mut b);
        call(&mut b, 3, DRIVER, "BecomeMonitor", json!([[1], 0]), b"m");
        assert_eq!(seen(&mut b)[0].2, error::INVALID_ARGS);
        call(
            &mut b,
            3,
            DRIVER,
            "BecomeMonitor",
            json!([["", ""], 0]),
            b"m",
        );
        assert_eq!(seen(&mut b).pop().unwrap().1, "method_return");
        // Names: two on the bus; queueing for an existing one is still possible. (Connection
        // 3 monitors: only what the requester itself gets is looked at.)
        let ask = |b: &mut Broker, c: ConnId, n: &str| {
            call(b, c, DRIVER, "RequestName", json!([n, 0]), b"o");
            let mine: Vec<_> = seen(b).into_iter().filter(|s| s.0 == c).collect();
            let last = mine.last().cloned().unwrap();
            (last.2, last.3)
        };
        assert_eq!(ask(&mut b, 2, "a.a"), (String::new(), vec![json!(1)]));
        assert_eq!(ask(&mut b, 2, "b.b"), (String::new(), vec![json!(1)]));
        connect(&mut b, 4);
        taken(&mut b);
        assert_eq!(ask(&mut b, 4, "c.c").0, error::LIMITS_EXCEEDED);
        assert_eq!(ask(&mut b, 4, "a.a"), (String::new(), vec![json!(2)]));
    }

    /// Refuses the name `no.own` and calls of `Wipe` on anything.
    #[derive(Debug)]
    struct Picky;

    impl Authorizer for Picky {
        fn connect(&self, _: &Identity, _: Option<&[u8]>) -> Result<(), v5::ConnectReasonCode> {
            Ok(())
        }
        fn publish(&self, _: &Identity, _: &str) -> bool {
            true
        }
        fn subscribe(&self, _: &Identity, _: &str) -> bool {
            true
        }
        fn own(&self, _: &Identity, name: &str) -> bool {
            name != "no.own"
        }
        fn call(&self, _: &Identity, _: &str, _: Option<&str>, member: &str) -> bool {
            member != "Wipe"
        }
    }

    #[test]
    fn the_authorizer_decides_who_owns_and_who_calls() {
        let mut b = Broker::new(BrokerConfig::default(), Arc::new(Picky), Instant::now());
        for c in [1, 2] {
            connect(&mut b, c);
        }
        call(&mut b, 1, DRIVER, "RequestName", json!(["no.own", 0]), b"o");
        assert_eq!(seen(&mut b)[0].2, error::ACCESS_DENIED);
        assert_eq!(b.bus().resolve("no.own"), None);
        call(
            &mut b,
            1,
            DRIVER,
            "RequestName",
            json!(["yes.own", 0]),
            b"o",
        );
        taken(&mut b);
        call(&mut b, 2, "yes.own", "Wipe", json!([]), b"w");
        let got = seen(&mut b);
        assert_eq!(
            (got.len(), got[0].0, got[0].2.as_str()),
            (1, 2, error::ACCESS_DENIED)
        );
        assert_eq!(b.bus().pending_calls(), 0);
        // Ping is answered whatever the rules; other calls reach the owner.
        call(&mut b, 2, "yes.own", "Ping", json!([]), b"p");
        assert_eq!(seen(&mut b)[0].1, "method_return");
        call(&mut b, 2, "yes.own", "Read", json!([]), b"r");
        assert_eq!(seen(&mut b)[0].0, 1);
    }

    #[test]
    fn ping_introspect_and_queries() {
        let mut b = broker();
        for c in [1, 2] {
            connect(&mut b, c);
        }
        call(&mut b, 2, ":1.1", "Ping", json!([]), b"p");
        let got = seen(&mut b);
        assert_eq!(got, vec![(2, "method_return".into(), "".into(), vec![])]);
        call(
            &mut b,
            1,
            DRIVER,
            "SetIntrospection",
            json!(["<node/>"]),
            b"s",
        );
        call(&mut b, 1, DRIVER, "RequestName", json!(["a.b", 0]), b"o");
        call(&mut b, 2, DRIVER, "RequestName", json!(["a.b", 0]), b"o");
        taken(&mut b);
        publish(
            &mut b,
            2,
            &format!("{CALL_TOPIC}a.b"),
            &[
                (prop::MEMBER, "Introspect"),
                (prop::INTERFACE, INTROSPECTABLE),
            ],
            json!([]),
            Some(b"i"),
            Instant::now(),
        );
        assert_eq!(seen(&mut b)[0].3, vec![json!("<node/>")]);
        for (m, a, want) in [
            (
                "ListNames",
                json!([]),
                json!([[DRIVER, "a.b", ":1.1", ":1.2"]]),
            ),
            ("GetNameOwner", json!(["a.b"]), json!([":1.1"])),
            ("NameHasOwner", json!(["a.b"]), json!([true])),
            ("NameHasOwner", json!(["c.d"]), json!([false])),
            (
                "ListQueuedOwners",
                json!(["a.b"]),
                json!([[":1.1", ":1.2"]]),
            ),
        ] {
            call(&mut b, 2, DRIVER, m, a, b"q");
            assert_eq!(seen(&mut b)[0].3, want.as_array().unwrap().clone(), "{m}");
        }
        call(&mut b, 2, DRIVER, "GetNameOwner", json!(["c.d"]), b"q");
        assert_eq!(seen(&mut b)[0].2, error::NAME_HAS_NO_OWNER);
        call(&mut b, 2, DRIVER, "RequestName", json!([":1.5", 0]), b"q");
        assert_eq!(seen(&mut b)[0].2, error::INVALID_ARGS);
        call(&mut b, 2, DRIVER, "Frobnicate", json!([]), b"q");
        assert_eq!(seen(&mut b)[0].2, error::UNKNOWN_METHOD);
        call(&mut b, 2, DRIVER, "AddMatch", json!(["bogus"]), b"q");
        assert_eq!(seen(&mut b)[0].2, error::MATCH_RULE_INVALID);
    }

    #[test]
    fn signals_go_by_match_rules_or_to_their_destination() {
        let mut b = broker();
        for c in [1, 2, 3, 4] {
            connect(&mut b, c);
        }
        call(
            &mut b,
            2,
            DRIVER,
            "AddMatch",
            json!(["member='Changed'"]),
            b"m",
        );
        call(&mut b, 3, DRIVER, "AddMatch", json!(["arg0='eth1'"]), b"m");
        call(
            &mut b,
            3,
            DRIVER,
            "AddMatch",
            json!(["path_namespace='/net'"]),
            b"m",
        );
        taken(&mut b);
        let sig = |b: &mut Broker, path: &str, member: &str, a: Value, dest: Option<&str>| {
            let mut props = vec![(prop::PATH, path)];
            if let Some(d) = dest {
                props.push((prop::DESTINATION, d));
            }
            publish(
                b,
                1,
                &format!("{SIGNAL_TOPIC}net.Link/{member}"),
                &props,
                a,
                None,
                Instant::now(),
            );
            let mut to: Vec<ConnId> = taken(b).into_iter().map(|(c, _)| c).collect();
            to.sort();
            to
        };
        assert_eq!(sig(&mut b, "/x", "Changed", json!(["eth0"]), None), vec![2]);
        assert_eq!(sig(&mut b, "/x", "Added", json!(["eth1"]), None), vec![3]);
        assert_eq!(
            sig(&mut b, "/net/a", "Changed", json!([]), None),
            vec![2, 3]
        );
        assert_eq!(
            sig(&mut b, "/x", "Other", json!([]), None),
            Vec::<ConnId>::new()
        );
        assert_eq!(sig(&mut b, "/x", "Other", json!([]), Some(":1.4")), vec![4]);
        // A monitor sees everything.
        call(&mut b, 4, DRIVER, "BecomeMonitor", json!([[], 0]), b"m");
        taken(&mut b);
        assert_eq!(sig(&mut b, "/x", "Other", json!([]), None), vec![4]);
        call(
            &mut b,
            2,
            DRIVER,
            "RemoveMatch",
            json!(["member='Changed'"]),
            b"m",
        );
        taken(&mut b);
        assert_eq!(sig(&mut b, "/x", "Changed", json!([]), None), vec![4]);
    }
}
