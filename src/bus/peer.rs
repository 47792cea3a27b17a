//! A small blocking Rust API for the D-Bus half of the bus: call names, own names and serve
//! their calls, emit and listen to signals, monitor. The command line (`bus call`, `bus own`,
//! `bus names`, `bus emit`, `bus listen`, `bus monitor`) is built on it.
//!
//! ```no_run
//! use socklab::bus::peer::{BusConnection, BusMessage};
//! use socklab::net::Endpoint;
//! use serde_json::json;
//! use std::time::Duration;
//!
//! # fn main() -> anyhow::Result<()> {
//! let ep = Endpoint::Inet("127.0.0.1:1883".into());
//! let mut service = BusConnection::connect(&ep)?;
//! service.request_name("com.example.Calc", 0)?;
//! let mut caller = BusConnection::connect(&ep)?;
//! // (in another thread: caller.call("com.example.Calc", "/", None, "Add", &[json!(2), json!(3)], ...))
//! if let Some(BusMessage::Call(call)) = service.next_message(Some(Duration::from_secs(1)))? {
//!     let sum = call.args.iter().filter_map(|a| a.as_i64()).sum::<i64>();
//!     service.writer()?.reply(&call, &[json!(sum)])?;
//! }
//! # Ok(()) }
//! ```
//!
//! Every message this API sends is QoS 0: the bus runs over one TCP or Unix stream per
//! connection, which loses nothing, and a lost message (the broker drops QoS 0 only for a
//! connection with 4 MiB of unsent output) shows as the call's timeout.

use super::client::{Client, ConnectOptions, Writer};
use super::dbus::{self, error, prop, DRIVER};
use super::names::{ReleaseReply, RequestReply};
use crate::net::Endpoint;
use bytes::Bytes;
use mqtt_proto::v5;
use mqtt_proto::{QosPid, TopicName};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

/// A call's outcome other than a reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// An error reply (from the callee, or from the bus: `NoReply`, `ServiceUnknown`...).
    #[error("{name}: {message}")]
    Error {
        /// The error name (`org.freedesktop.DBus.Error.NoReply`...).
        name: String,
        /// Its message (the first argument, if a string).
        message: String,
    },
    /// The connection failed, or nothing came back (not even the bus's `NoReply`) within
    /// the timeout and a grace of 5 s.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl CallError {
    /// The error name, for an error reply.
    pub fn name(&self) -> Option<&str> {
        match self {
            CallError::Error { name, .. } => Some(name),
            CallError::Io(_) => None,
        }
    }
}

/// A method call routed to this connection.
#[derive(Debug, Clone)]
pub struct Call {
    /// The caller's unique name.
    pub sender: String,
    /// The destination as the caller addressed it.
    pub destination: String,
    /// Object path.
    pub path: String,
    /// Interface, if the caller gave one.
    pub interface: Option<String>,
    /// Method name.
    pub member: String,
    /// Arguments (the payload's JSON array; a payload that is not one is a single string).
    pub args: Vec<Value>,
    /// Where the reply goes (none: the caller expects no reply).
    reply: Option<(TopicName, Bytes)>,
}

impl Call {
    /// Whether the caller waits for a reply.
    pub fn expects_reply(&self) -> bool {
        self.reply.is_some()
    }
}

/// A signal received.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    /// The sender's unique name (`org.freedesktop.DBus` for the bus's own).
    pub sender: String,
    /// Object path.
    pub path: String,
    /// Interface.
    pub interface: String,
    /// Member.
    pub member: String,
    /// The destination, for a signal sent to one connection.
    pub destination: Option<String>,
    /// Arguments.
    pub args: Vec<Value>,
}

/// Something that arrived on the connection.
#[derive(Debug, Clone)]
pub enum BusMessage {
    /// A method call for a name this connection owns (or its unique name).
    Call(Call),
    /// A signal selected by a match rule, or sent to this connection.
    Signal(Signal),
    /// Anything else (for a monitor: every message on the bus), with its topic.
    Other(Box<v5::Publish>),
}

fn user_prop<'a>(p: &'a v5::Publish, key: &str) -> Option<&'a str> {
    p.properties
        .user_properties
        .iter()
        .find(|u| &*u.name == key)
        .map(|u| &*u.value)
}

/// The arguments carried by a payload: a JSON array; anything else is one string argument
/// (so a plain MQTT client's text is still readable).
pub fn decode_args(payload: &[u8]) -> Vec<Value> {
    if payload.is_empty() {
        return Vec::new();
    }
    serde_json::from_slice::<Vec<Value>>(payload)
        .unwrap_or_else(|_| vec![json!(String::from_utf8_lossy(payload))])
}

fn props(pairs: &[(&str, &str)]) -> Vec<v5::UserProperty> {
    pairs
        .iter()
        .map(|(k, v)| v5::UserProperty {
            name: (*k).into(),
            value: (*v).into(),
        })
        .collect()
}

fn topic(s: &str) -> io::Result<TopicName> {
    TopicName::try_from(s).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid name in topic {s:?}: {e}"),
        )
    })
}

fn publish(t: TopicName, args: &[Value], user: Vec<v5::UserProperty>) -> v5::Publish {
    let mut p = v5::Publish::new(QosPid::Level0, t, dbus::payload(args));
    p.properties.content_type = Some("application/json".into());
    p.properties.user_properties = user;
    p
}

/// The reply (or error reply) to `call`; `None` if the caller expects none.
fn answer_packet(call: &Call, args: &[Value], error: Option<&str>) -> Option<v5::Packet> {
    let (t, corr) = call.reply.as_ref()?;
    let user = match error {
        Some(e) => props(&[(prop::ERROR, e)]),
        None => Vec::new(),
    };
    let mut p = publish(t.clone(), args, user);
    p.properties.correlation_data = Some(corr.clone());
    Some(v5::Packet::Publish(p))
}

fn signal_packet(
    path: &str,
    interface: &str,
    member: &str,
    args: &[Value],
    destination: Option<&str>,
) -> io::Result<v5::Packet> {
    let mut user = vec![(prop::PATH, path)];
    if let Some(d) = destination {
        user.push((prop::DESTINATION, d));
    }
    let p = publish(
        topic(&format!("{}{interface}/{member}", dbus::SIGNAL_TOPIC))?,
        args,
        props(&user),
    );
    Ok(v5::Packet::Publish(p))
}

fn parse(p: v5::Publish) -> BusMessage {
    let kind = user_prop(&p, prop::TYPE);
    let s = |k: &str| user_prop(&p, k).unwrap_or("").to_string();
    if p.topic_name.starts_with(dbus::CALL_TOPIC) && kind == Some("method_call") {
        let reply = match (&p.properties.response_topic, &p.properties.correlation_data) {
            (Some(t), Some(c)) => Some((t.clone(), c.clone())),
            _ => None,
        };
        return BusMessage::Call(Call {
            sender: s(prop::SENDER),
            destination: s(prop::DESTINATION),
            path: s(prop::PATH),
            interface: user_prop(&p, prop::INTERFACE).map(str::to_string),
            member: s(prop::MEMBER),
            args: decode_args(&p.payload),
            reply,
        });
    }
    if p.topic_name.starts_with(dbus::SIGNAL_TOPIC) && kind == Some("signal") {
        return BusMessage::Signal(Signal {
            sender: s(prop::SENDER),
            path: s(prop::PATH),
            interface: s(prop::INTERFACE),
            member: s(prop::MEMBER),
            destination: user_prop(&p, prop::DESTINATION).map(str::to_string),
            args: decode_args(&p.payload),
        });
    }
    BusMessage::Other(Box::new(p))
}

/// One connection to the bus.
#[derive(Debug)]
pub struct BusConnection {
    client: Client,
    unique: String,
    reply_topic: TopicName,
    next: u64,
    queue: VecDeque<BusMessage>,
    /// After `BecomeMonitor`: every message is shown as it came ([`BusMessage::Other`]).
    monitoring: bool,
    /// Messages dropped from `queue` past [`MAX_QUEUED`].
    dropped: u64,
    /// The socket's read timeout as last set (`None`: not set yet).
    read_timeout: Option<Option<Duration>>,
}

/// Calls and signals kept while [`BusConnection::call`] waits for its reply; past it the
/// oldest are dropped (a connection flooded with signals must not grow without bound).
pub const MAX_QUEUED: usize = 65_536;

impl BusConnection {
    /// Connect (MQTT 5.0, clean session) and learn the unique name.
    ///
    /// # Errors
    /// Connection failures, or a broker that gives no unique name (not a socklab bus).
    pub fn connect(endpoint: &Endpoint) -> anyhow::Result<BusConnection> {
        Self::connect_with(endpoint, &ConnectOptions::default())
    }

    /// Connect with these options (user name and password, TLS; the version must be 5.0).
    ///
    /// # Errors
    /// As [`BusConnection::connect`]; MQTT 3.1.1 has no user properties for the D-Bus half.
    pub fn connect_with(endpoint: &Endpoint, o: &ConnectOptions) -> anyhow::Result<BusConnection> {
        anyhow::ensure!(
            o.version.is_v5(),
            "the D-Bus half needs MQTT 5.0 (user properties, response topics)"
        );
        let (client, ack) = Client::connect(endpoint, o)?;
        let unique = ack
            .properties
            .user_properties
            .iter()
            .find(|u| &*u.name == prop::UNIQUE_NAME)
            .map(|u| u.value.to_string())
            .ok_or_else(|| {
                anyhow::anyhow!("the broker gave no unique name: not a socklab bus (D-Bus half)")
            })?;
        let reply_topic = topic(&format!("socklab/reply/{unique}"))?;
        Ok(BusConnection {
            client,
            unique,
            reply_topic,
            next: 0,
            queue: VecDeque::new(),
            monitoring: false,
            dropped: 0,
            read_timeout: None,
        })
    }

    /// This connection's unique name (`:1.N`).
    pub fn unique_name(&self) -> &str {
        &self.unique
    }

    /// A handle to send replies and signals from other threads.
    ///
    /// # Errors
    /// The socket could not be duplicated.
    pub fn writer(&self) -> io::Result<BusWriter> {
        Ok(BusWriter {
            w: self.client.writer()?,
        })
    }

    /// Call `member` on `destination` and wait for the reply (at most `timeout`, which the
    /// bus enforces: past it the answer is `NoReply`).
    ///
    /// # Errors
    /// [`CallError::Error`] for an error reply, [`CallError::Io`] if the connection failed.
    #[allow(clippy::too_many_arguments)]
    pub fn call(
        &mut self,
        destination: &str,
        path: &str,
        interface: Option<&str>,
        member: &str,
        args: &[Value],
        timeout: Duration,
    ) -> Result<Vec<Value>, CallError> {
        self.next += 1;
        let corr = self.next.to_be_bytes();
        let ms = timeout.as_millis().min(u32::MAX as u128).to_string();
        let mut user = vec![(prop::MEMBER, member), (prop::PATH, path)];
        if let Some(i) = interface {
            user.push((prop::INTERFACE, i));
        }
        user.push((prop::TIMEOUT, &ms));
        let mut p = publish(
            topic(&format!("{}{destination}", dbus::CALL_TOPIC))?,
            args,
            props(&user),
        );
        p.properties.response_topic = Some(self.reply_topic.clone());
        p.properties.correlation_data = Some(Bytes::copy_from_slice(&corr));
        self.client.send(&v5::Packet::Publish(p))?;
        let grace = timeout + Duration::from_secs(5);
        let give_up = Instant::now() + grace;
        let mut first = true;
        loop {
            // The first wait is the whole grace (the same for every call with this timeout,
            // so the socket option is not set again); later ones what is left of it.
            let left = if first {
                grace
            } else {
                give_up.saturating_duration_since(Instant::now())
            };
            first = false;
            if left.is_zero() {
                return Err(CallError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no reply, not even the bus's NoReply: is the bus alive?",
                )));
            }
            let Some(p) = self.read(Some(left))? else {
                continue;
            };
            if p.topic_name == self.reply_topic
                && p.properties.correlation_data.as_deref() == Some(&corr[..])
            {
                let args = decode_args(&p.payload);
                if let Some(name) = user_prop(&p, prop::ERROR) {
                    let message = args
                        .first()
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    return Err(CallError::Error {
                        name: name.to_string(),
                        message,
                    });
                }
                return Ok(args);
            }
            if p.topic_name == self.reply_topic {
                continue; // a late reply to an earlier call that timed out
            }
            if self.queue.len() >= MAX_QUEUED {
                // Signals keep coming while the reply does not: keep the newest.
                self.queue.pop_front();
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = self.dropped,
                        "over {MAX_QUEUED} messages arrived while waiting for a reply: oldest dropped"
                    );
                }
            }
            self.queue.push_back(parse(p));
        }
    }

    /// Read one publication (acknowledged), waiting at most `wait` (`None`: forever).
    fn read(&mut self, wait: Option<Duration>) -> io::Result<Option<v5::Publish>> {
        let wait = wait.map(|w| w.max(Duration::from_millis(1)));
        // One setsockopt less per message when the wait is the same as the last one (a
        // service's loop, a caller's calls with one timeout).
        if self.read_timeout != Some(wait) {
            self.client.socket().set_read_timeout(wait)?;
            self.read_timeout = Some(wait);
        }
        match self.client.next_message() {
            Ok(p) => Ok(Some(p)),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A call to the bus driver (`org.freedesktop.DBus`).
    ///
    /// # Errors
    /// As [`BusConnection::call`].
    pub fn call_driver(&mut self, member: &str, args: &[Value]) -> Result<Vec<Value>, CallError> {
        self.call(
            DRIVER,
            dbus::DRIVER_PATH,
            None,
            member,
            args,
            Duration::from_secs(25),
        )
    }

    fn invalid(what: &str) -> CallError {
        CallError::Error {
            name: error::INVALID_ARGS.into(),
            message: format!("unexpected reply to {what}"),
        }
    }

    /// `RequestName(name, flags)` ([`super::names::ALLOW_REPLACEMENT`],
    /// [`super::names::REPLACE_EXISTING`], [`super::names::DO_NOT_QUEUE`]).
    ///
    /// # Errors
    /// As [`BusConnection::call`] (`InvalidArgs` for a bad name, `AccessDenied`...).
    pub fn request_name(&mut self, name: &str, flags: u32) -> Result<RequestReply, CallError> {
        let r = self.call_driver("RequestName", &[json!(name), json!(flags)])?;
        Ok(match r.first().and_then(Value::as_u64) {
            Some(1) => RequestReply::PrimaryOwner,
            Some(2) => RequestReply::InQueue,
            Some(3) => RequestReply::Exists,
            Some(4) => RequestReply::AlreadyOwner,
            _ => return Err(Self::invalid("RequestName")),
        })
    }

    /// `ReleaseName(name)`.
    ///
    /// # Errors
    /// As [`BusConnection::call`].
    pub fn release_name(&mut self, name: &str) -> Result<ReleaseReply, CallError> {
        let r = self.call_driver("ReleaseName", &[json!(name)])?;
        r.first()
            .and_then(Value::as_u64)
            .and_then(dbus::release_reply)
            .ok_or_else(|| Self::invalid("ReleaseName"))
    }

    fn strings(v: Vec<Value>, what: &str) -> Result<Vec<String>, CallError> {
        v.first()
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .ok_or_else(|| Self::invalid(what))
    }

    /// `ListNames`: the bus, every well-known name, every unique name.
    ///
    /// # Errors
    /// As [`BusConnection::call`].
    pub fn list_names(&mut self) -> Result<Vec<String>, CallError> {
        let r = self.call_driver("ListNames", &[])?;
        Self::strings(r, "ListNames")
    }

    /// `GetNameOwner(name)`: its owner's unique name.
    ///
    /// # Errors
    /// `NameHasNoOwner`, or as [`BusConnection::call`].
    pub fn get_name_owner(&mut self, name: &str) -> Result<String, CallError> {
        let r = self.call_driver("GetNameOwner", &[json!(name)])?;
        r.first()
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| Self::invalid("GetNameOwner"))
    }

    /// `NameHasOwner(name)`.
    ///
    /// # Errors
    /// As [`BusConnection::call`].
    pub fn name_has_owner(&mut self, name: &str) -> Result<bool, CallError> {
        let r = self.call_driver("NameHasOwner", &[json!(name)])?;
        r.first()
            .and_then(Value::as_bool)
            .ok_or_else(|| Self::invalid("NameHasOwner"))
    }

    /// `ListQueuedOwners(name)`: the primary owner, then those waiting.
    ///
    /// # Errors
    /// `NameHasNoOwner`, or as [`BusConnection::call`].
    pub fn list_queued_owners(&mut self, name: &str) -> Result<Vec<String>, CallError> {
        let r = self.call_driver("ListQueuedOwners", &[json!(name)])?;
        Self::strings(r, "ListQueuedOwners")
    }

    /// `AddMatch(rule)`: receive the signals the rule selects.
    ///
    /// # Errors
    /// `MatchRuleInvalid`, `LimitsExceeded`, or as [`BusConnection::call`].
    pub fn add_match(&mut self, rule: &str) -> Result<(), CallError> {
        self.call_driver("AddMatch", &[json!(rule)]).map(drop)
    }

    /// `RemoveMatch(rule)`.
    ///
    /// # Errors
    /// `MatchRuleNotFound`, or as [`BusConnection::call`].
    pub fn remove_match(&mut self, rule: &str) -> Result<(), CallError> {
        self.call_driver("RemoveMatch", &[json!(rule)]).map(drop)
    }

    /// `BecomeMonitor(rules)`: from now on, receive a copy of every message on the bus that
    /// one of the rules selects (no rules: everything), as [`BusMessage::Other`].
    ///
    /// # Errors
    /// As [`BusConnection::call`].
    pub fn become_monitor(&mut self, rules: &[String]) -> Result<(), CallError> {
        self.call(
            DRIVER,
            dbus::DRIVER_PATH,
            Some(dbus::MONITORING),
            "BecomeMonitor",
            &[json!(rules), json!(0)],
            Duration::from_secs(25),
        )?;
        self.monitoring = true;
        Ok(())
    }

    /// Register the introspection XML returned for `Introspect` calls to this connection.
    ///
    /// # Errors
    /// `LimitsExceeded` past 64 KiB, or as [`BusConnection::call`].
    pub fn set_introspection(&mut self, xml: &str) -> Result<(), CallError> {
        self.call_driver("SetIntrospection", &[json!(xml)])
            .map(drop)
    }

    /// The next call or signal (or other publication), waiting at most `wait`.
    ///
    /// # Errors
    /// The connection failed.
    pub fn next_message(&mut self, wait: Option<Duration>) -> io::Result<Option<BusMessage>> {
        if let Some(m) = self.queue.pop_front() {
            return Ok(Some(m));
        }
        Ok(self.read(wait)?.map(|p| {
            if self.monitoring || p.topic_name == self.reply_topic {
                BusMessage::Other(Box::new(p))
            } else {
                parse(p)
            }
        }))
    }

    /// Emit a signal (to every matching rule, or to `destination` only).
    ///
    /// # Errors
    /// I/O errors, or names that do not fit a topic.
    pub fn emit(
        &mut self,
        path: &str,
        interface: &str,
        member: &str,
        args: &[Value],
        destination: Option<&str>,
    ) -> io::Result<()> {
        self.client
            .send(&signal_packet(path, interface, member, args, destination)?)
    }

    /// Reply to `call` on this connection (nothing is sent if the caller expects no reply);
    /// [`BusWriter::reply`] does the same from other threads.
    ///
    /// # Errors
    /// I/O errors.
    pub fn reply(&mut self, call: &Call, args: &[Value]) -> io::Result<()> {
        match answer_packet(call, args, None) {
            Some(p) => self.client.send(&p),
            None => Ok(()),
        }
    }

    /// Answer `call` with the error `name` and a message, on this connection.
    ///
    /// # Errors
    /// I/O errors.
    pub fn reply_error(&mut self, call: &Call, name: &str, message: &str) -> io::Result<()> {
        match answer_packet(call, &[json!(message)], Some(name)) {
            Some(p) => self.client.send(&p),
            None => Ok(()),
        }
    }

    /// Send DISCONNECT and close.
    ///
    /// # Errors
    /// I/O errors.
    pub fn close(self) -> io::Result<()> {
        self.client.disconnect()
    }
}

/// Sends replies and signals on a [`BusConnection`] from any thread.
#[derive(Debug)]
pub struct BusWriter {
    w: Writer,
}

impl BusWriter {
    /// Reply to `call` (nothing is sent if the caller expects no reply).
    ///
    /// # Errors
    /// I/O errors.
    pub fn reply(&self, call: &Call, args: &[Value]) -> io::Result<()> {
        self.answer(call, args, None)
    }

    /// Answer `call` with the error `name` and a message.
    ///
    /// # Errors
    /// I/O errors.
    pub fn reply_error(&self, call: &Call, name: &str, message: &str) -> io::Result<()> {
        self.answer(call, &[json!(message)], Some(name))
    }

    fn answer(&self, call: &Call, args: &[Value], error: Option<&str>) -> io::Result<()> {
        match answer_packet(call, args, error) {
            Some(p) => self.w.send(&p),
            None => Ok(()),
        }
    }

    /// Emit a signal (see [`BusConnection::emit`]).
    ///
    /// # Errors
    /// I/O errors, or names that do not fit a topic.
    pub fn emit(
        &self,
        path: &str,
        interface: &str,
        member: &str,
        args: &[Value],
        destination: Option<&str>,
    ) -> io::Result<()> {
        self.w
            .send(&signal_packet(path, interface, member, args, destination)?)
    }
}
