//! One client connection's MQTT state machine, without I/O: bytes in, packets for the broker
//! out; the broker's answers and deliveries in, bytes to send out.
//!
//! What belongs to the *connection* lives here (what the *session* in MQTT's sense, which
//! outlives connections, keeps is in [`super::broker`]): the input buffer and framing, the
//! first packet being CONNECT and the only CONNECT, the protocol version, keep-alive
//! (1.5 × the interval), topic aliases in both directions, the client's maximum packet size,
//! and the count of unacknowledged QoS 1/2 publications against our receive maximum.

use super::codec::{self, DecodeError, Message, PublishHeader, Version};
use mqtt_proto::v5::{self, DisconnectReasonCode as Drc};
use mqtt_proto::QoS;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits a session enforces on its client.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Largest packet accepted from the client (`--max-packet`).
    pub max_packet: usize,
    /// Topic aliases the client may use towards us.
    pub topic_alias_max: u16,
    /// QoS 1/2 publications the client may have unacknowledged (our receive maximum).
    pub receive_max: u16,
    /// How long a connection may take to send its CONNECT.
    pub connect_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_packet: 1 << 20,
            topic_alias_max: 64,
            receive_max: 1024,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What a session hands the broker. (Not boxed: nearly every value is a packet, and boxing
/// would cost an allocation per PUBLISH.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Inbound {
    /// The client's CONNECT (lifted to 5.0), with the version it spoke.
    Connect(Version, Box<v5::Connect>),
    /// Any later packet, with topic aliases resolved (the topic of a PUBLISH is always set).
    Packet(v5::Packet),
}

/// The client broke the protocol: the connection is to be closed (after a DISCONNECT with
/// `reason` for a 5.0 client that got as far as CONNECT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The 5.0 reason code.
    pub reason: Drc,
    /// What happened, for the log.
    pub message: String,
}

impl Violation {
    fn new(reason: Drc, message: impl Into<String>) -> Violation {
        Violation {
            reason,
            message: message.into(),
        }
    }
}

impl From<DecodeError> for Violation {
    fn from(e: DecodeError) -> Self {
        Violation::new(e.reason(), e.to_string())
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for CONNECT.
    AwaitConnect,
    /// CONNECT received.
    Connected,
    /// Finished: no more input is taken.
    Closed,
}

/// One connection's protocol state. Kept small (an idle connection costs this, its socket
/// and its broker session): the limits are copied in as the few numbers they are, and what
/// only some connections use (topic aliases, QoS 2 in progress) is allocated when first
/// used.
#[derive(Debug)]
pub struct Session {
    /// Largest packet accepted from the client.
    max_packet: u32,
    topic_alias_max: u16,
    receive_max: u16,
    phase: Phase,
    version: Version,
    /// Keep-alive in seconds (0: none).
    keep_alive: u16,
    /// Topic aliases the client accepts from us.
    alias_out_max: u16,
    /// The client's maximum packet size.
    client_max_packet: u32,
    qos1_unacked: u32,
    /// Awaiting CONNECT: when it must have arrived; connected: when the client last spoke.
    clock: Instant,
    buf: Vec<u8>,
    /// Encoded bytes waiting to be sent.
    pub out: Vec<u8>,
    extra: Option<Box<Extra>>,
}

/// What only some connections need.
#[derive(Debug, Default)]
struct Extra {
    alias_in: HashMap<u16, Arc<str>>,
    alias_out: HashMap<Arc<str>, u16>,
    qos2_unacked: HashSet<u16>,
}

impl Session {
    /// A new connection, opened at `now`.
    pub fn new(cfg: SessionConfig, now: Instant) -> Session {
        Session {
            max_packet: cfg.max_packet.min(u32::MAX as usize) as u32,
            topic_alias_max: cfg.topic_alias_max,
            receive_max: cfg.receive_max,
            phase: Phase::AwaitConnect,
            version: Version::V311,
            keep_alive: 0,
            alias_out_max: 0,
            client_max_packet: u32::MAX,
            qos1_unacked: 0,
            clock: now + cfg.connect_timeout,
            buf: Vec::new(),
            out: Vec::new(),
            extra: None,
        }
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Default::default)
    }

    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The version the client spoke in CONNECT (3.1.1 until then).
    pub fn version(&self) -> Version {
        self.version
    }

    /// Bytes of input held waiting for the rest of a packet.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// QoS 1/2 publications received and not yet acknowledged.
    pub fn unacked_in(&self) -> usize {
        self.qos1_unacked as usize + self.extra.as_ref().map_or(0, |e| e.qos2_unacked.len())
    }

    /// When the connection is to be dropped for silence: CONNECT not received within the
    /// connect timeout, or nothing received for 1.5 × the keep-alive.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitConnect => Some(self.clock),
            Phase::Connected => (self.keep_alive > 0)
                .then(|| self.clock + Duration::from_millis(self.keep_alive as u64 * 1500)),
            Phase::Closed => None,
        }
    }

    /// Take the bytes that arrived at `now`, pushing every complete packet to `events`.
    ///
    /// # Errors
    /// A [`Violation`]: the connection must be closed (see [`Session::violation`]).
    pub fn receive(
        &mut self,
        data: &[u8],
        now: Instant,
        events: &mut Vec<Inbound>,
    ) -> Result<(), Violation> {
        if self.phase == Phase::Closed {
            return Ok(());
        }
        if self.phase == Phase::Connected {
            self.clock = now;
        }
        let r = if self.buf.is_empty() {
            let r = self.parse(data, now, events);
            if let Ok(used) = r {
                self.buf.extend_from_slice(&data[used..]);
            }
            r
        } else {
            self.buf.extend_from_slice(data);
            let buf = std::mem::take(&mut self.buf);
            let r = self.parse(&buf, now, events);
            self.buf = buf;
            if let Ok(used) = r {
                self.buf.drain(..used);
            }
            r
        };
        match r {
            Ok(_) => Ok(()),
            Err(v) => {
                self.buf = Vec::new();
                Err(v)
            }
        }
    }

    fn parse(
        &mut self,
        data: &[u8],
        now: Instant,
        events: &mut Vec<Inbound>,
    ) -> Result<usize, Violation> {
        let mut used = 0;
        while self.phase != Phase::Closed {
            let rest = &data[used..];
            let Some((header, total)) = codec::frame(rest, self.max_packet as usize)? else {
                break;
            };
            let frame = &rest[..total];
            used += total;
            if self.phase == Phase::AwaitConnect {
                let (version, connect) = match codec::decode_connect(frame, header) {
                    Ok(x) => x,
                    Err(DecodeError::UnsupportedProtocol { name, level }) => {
                        self.out
                            .extend_from_slice(&codec::unsupported_version_connack(level));
                        self.phase = Phase::Closed;
                        return Err(Violation::new(
                            Drc::ProtocolError,
                            format!("unsupported protocol {name:?} level {level}"),
                        ));
                    }
                    Err(e) => {
                        self.phase = Phase::Closed;
                        return Err(e.into());
                    }
                };
                self.version = version;
                self.phase = Phase::Connected;
                self.keep_alive = connect.keep_alive;
                self.clock = now;
                let p = &connect.properties;
                self.alias_out_max = p.topic_alias_max.unwrap_or(0);
                self.client_max_packet = p.max_packet_size.unwrap_or(u32::MAX);
                if p.receive_max == Some(0) || p.max_packet_size == Some(0) {
                    return Err(Violation::new(
                        Drc::ProtocolError,
                        "receive maximum or maximum packet size of 0",
                    ));
                }
                events.push(Inbound::Connect(version, Box::new(connect)));
                continue;
            }
            let mut packet = codec::decode(self.version, frame, header)?;
            match &mut packet {
                v5::Packet::Pingreq => {
                    codec::encode(self.version, &v5::Packet::Pingresp, &mut self.out);
                    continue;
                }
                v5::Packet::Publish(p) => {
                    self.resolve_alias(p)?;
                    match p.qos_pid.qos() {
                        QoS::Level0 => {}
                        QoS::Level1 => self.qos1_unacked += 1,
                        QoS::Level2 => {
                            let pid = codec::pid_of(p.qos_pid);
                            self.extra().qos2_unacked.insert(pid);
                        }
                    }
                    if self.version.is_v5() && self.unacked_in() > self.receive_max as usize {
                        return Err(Violation::new(
                            Drc::ReceiveMaximumExceeded,
                            format!(
                                "more than {} unacknowledged QoS 1/2 publications",
                                self.receive_max
                            ),
                        ));
                    }
                }
                v5::Packet::Disconnect(_) => {
                    self.phase = Phase::Closed;
                }
                v5::Packet::Auth(_) => {
                    return Err(Violation::new(
                        Drc::ProtocolError,
                        "AUTH without an authentication method in CONNECT",
                    ));
                }
                _ => {}
            }
            let _ = now;
            events.push(Inbound::Packet(packet));
        }
        Ok(used)
    }

    fn resolve_alias(&mut self, p: &mut v5::Publish) -> Result<(), Violation> {
        let alias = p.properties.topic_alias.take();
        match alias {
            Some(a) if a == 0 || a > self.topic_alias_max => Err(Violation::new(
                Drc::TopicAliasInvalid,
                format!("topic alias {a} outside 1..={}", self.topic_alias_max),
            )),
            Some(a) if p.topic_name.is_empty() => match self.extra().alias_in.get(&a) {
                Some(t) => {
                    p.topic_name = mqtt_proto::TopicName::try_from(t.clone())
                        .map_err(|e| Violation::new(Drc::TopicNameInvalid, e.to_string()))?;
                    Ok(())
                }
                None => Err(Violation::new(
                    Drc::ProtocolError,
                    format!("topic alias {a} used before it was set"),
                )),
            },
            Some(a) => {
                let topic = Arc::from(&*p.topic_name);
                self.extra().alias_in.insert(a, topic);
                Ok(())
            }
            None if p.topic_name.is_empty() => Err(Violation::new(
                Drc::TopicNameInvalid,
                "empty topic name without a topic alias",
            )),
            None => Ok(()),
        }
    }

    /// Encode a control packet from the broker. Acknowledgements of the client's QoS 1/2
    /// publications free room under our receive maximum; a CONNACK's server keep-alive
    /// replaces the client's.
    pub fn send(&mut self, packet: &v5::Packet) {
        match packet {
            v5::Packet::Puback(_) => self.qos1_unacked = self.qos1_unacked.saturating_sub(1),
            v5::Packet::Pubrec(r) if r.reason_code as u8 >= 0x80 => {
                if let Some(e) = &mut self.extra {
                    e.qos2_unacked.remove(&r.pid.value());
                }
            }
            v5::Packet::Pubcomp(c) => {
                if let Some(e) = &mut self.extra {
                    e.qos2_unacked.remove(&c.pid.value());
                }
            }
            v5::Packet::Connack(c) => {
                if let Some(k) = c.properties.server_keep_alive {
                    self.keep_alive = k;
                }
            }
            _ => {}
        }
        let start = self.out.len();
        codec::encode(self.version, packet, &mut self.out);
        // A Reason String must not take a packet over the client's maximum size: without it.
        if self.out.len() - start > self.client_max_packet as usize {
            self.out.truncate(start);
            match packet {
                v5::Packet::Disconnect(d) if d.properties.reason_string.is_some() => {
                    let mut d = d.clone();
                    d.properties.reason_string = None;
                    codec::encode(self.version, &v5::Packet::Disconnect(d), &mut self.out);
                }
                v5::Packet::Connack(c) if c.properties.reason_string.is_some() => {
                    let mut c = c.clone();
                    c.properties.reason_string = None;
                    codec::encode(self.version, &v5::Packet::Connack(c), &mut self.out);
                }
                _ => codec::encode(self.version, packet, &mut self.out),
            }
        }
    }

    /// Encode a delivery, choosing an outgoing topic alias when the client allows them.
    /// Returns `false` if the packet is over the client's maximum packet size (then it is
    /// not sent, and counts as delivered, as 5.0 says).
    pub fn deliver(&mut self, msg: &Message, mut h: PublishHeader<'_>) -> bool {
        if self.version.is_v5() && self.alias_out_max > 0 {
            let max = self.alias_out_max as usize;
            let aliases = &mut self.extra().alias_out;
            h.alias = match aliases.get(&msg.topic) {
                Some(&a) => Some((a, false)),
                None if aliases.len() < max => {
                    let a = aliases.len() as u16 + 1;
                    aliases.insert(msg.topic.clone(), a);
                    Some((a, true))
                }
                None => None,
            };
        }
        let max = self.client_max_packet as usize;
        let ok = codec::encode_publish(self.version, msg, &h, max, &mut self.out);
        if !ok {
            if let (Some((_, true)), Some(e)) = (h.alias, &mut self.extra) {
                e.alias_out.remove(&msg.topic);
            }
        }
        ok
    }

    /// Close for a violation: a 5.0 client past CONNECT is told why with a DISCONNECT (its
    /// reason code, and what happened as the Reason String).
    pub fn violation(&mut self, v: &Violation) {
        if self.phase != Phase::AwaitConnect && self.version.is_v5() && self.out.len() < (1 << 20) {
            self.disconnect_because(v.reason, &v.message);
        }
        self.phase = Phase::Closed;
    }

    /// Close with a DISCONNECT carrying `reason` (5.0 only; 3.1.1 servers just close), and a
    /// Reason String saying it in words.
    pub fn disconnect(&mut self, reason: Drc) {
        let why = match reason {
            Drc::KeepAliveTimeout => "nothing received for 1.5 times the keep-alive",
            Drc::ServerShuttingDown => "the server is shutting down",
            Drc::SessionTakenOver => "another connection took the session over",
            Drc::ProtocolError => "protocol error",
            _ => "",
        };
        self.disconnect_because(reason, why);
    }

    fn disconnect_because(&mut self, reason: Drc, why: &str) {
        if self.phase != Phase::AwaitConnect && self.version.is_v5() {
            let mut d = v5::Disconnect::new(reason);
            if !why.is_empty() {
                d.properties.reason_string = Some(truncate(why, 200).into());
            }
            self.send(&v5::Packet::Disconnect(d));
        }
        self.phase = Phase::Closed;
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn connect_v5(props: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10];
        body.push(props.len() as u8);
        body.extend_from_slice(props);
        body.extend_from_slice(&[0, 1, b'c']);
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    fn feed(s: &mut Session, bytes: &[u8]) -> Result<Vec<Inbound>, Violation> {
        let mut ev = Vec::new();
        s.receive(bytes, Instant::now(), &mut ev)?;
        Ok(ev)
    }

    #[test]
    fn connect_split_at_every_byte_gives_one_event() {
        let c = connect_v5(&[]);
        for cut in 0..c.len() {
            let mut s = Session::new(SessionConfig::default(), Instant::now());
            let mut ev = feed(&mut s, &c[..cut]).unwrap();
            ev.extend(feed(&mut s, &c[cut..]).unwrap());
            assert_eq!(ev.len(), 1, "cut at {cut}");
            assert!(matches!(&ev[0], Inbound::Connect(Version::V5, _)));
            assert_eq!(s.buffered(), 0);
        }
    }

    #[test]
    fn packet_before_connect_and_second_connect_are_violations() {
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        assert!(feed(&mut s, &[0xc0, 0]).is_err());
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        let c = connect_v5(&[]);
        let mut two = c.clone();
        two.extend_from_slice(&c);
        let e = feed(&mut s, &two).unwrap_err();
        assert_eq!(e.reason, Drc::ProtocolError);
        s.violation(&e);
        assert_eq!(&s.out[..3], &[0xe0, s.out[1], 0x82], "DISCONNECT 0x82");
        let v5::Packet::Disconnect(d) = v5::Packet::decode(&s.out).unwrap().unwrap() else {
            panic!("{:x?}", s.out)
        };
        assert_eq!(
            d.properties.reason_string.as_deref(),
            Some("protocol error: a second CONNECT"),
            "the reason in words"
        );
        // A client whose maximum packet size leaves no room gets the DISCONNECT without it.
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        feed(&mut s, &connect_v5(&[0x27, 0, 0, 0, 3])).unwrap();
        s.disconnect(Drc::KeepAliveTimeout);
        assert_eq!(&s.out[..], &[0xe0, 1, 0x8d]);
    }

    #[test]
    fn pingreq_is_answered_here_and_keep_alive_is_one_and_a_half_times() {
        let t0 = Instant::now();
        let mut s = Session::new(SessionConfig::default(), t0);
        let mut ev = Vec::new();
        s.receive(&connect_v5(&[]), t0, &mut ev).unwrap();
        s.receive(&[0xc0, 0], t0, &mut ev).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(&s.out[..], &[0xd0, 0]);
        assert_eq!(s.deadline(), Some(t0 + Duration::from_secs(15)));
    }

    #[test]
    fn topic_aliases_resolve_and_unknown_ones_are_refused() {
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        feed(&mut s, &connect_v5(&[])).unwrap();
        // PUBLISH a/b with alias 3, then alias 3 with an empty topic.
        let first = [0x30, 9, 0, 3, b'a', b'/', b'b', 3, 0x23, 0, 3];
        let second = [0x30, 6, 0, 0, 3, 0x23, 0, 3];
        let ev = feed(&mut s, &[&first[..], &second[..]].concat()).unwrap();
        for e in &ev {
            let Inbound::Packet(v5::Packet::Publish(p)) = e else {
                panic!()
            };
            assert_eq!(&*p.topic_name, "a/b");
        }
        let unknown = [0x30, 6, 0, 0, 3, 0x23, 0, 4];
        assert!(feed(&mut s, &unknown).is_err());
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        feed(&mut s, &connect_v5(&[])).unwrap();
        let too_big = [0x30, 9, 0, 3, b'a', b'/', b'b', 3, 0x23, 0xff, 0xff];
        assert_eq!(
            feed(&mut s, &too_big).unwrap_err().reason,
            Drc::TopicAliasInvalid
        );
    }

    #[test]
    fn outgoing_aliases_are_used_when_the_client_allows_them() {
        let mut s = Session::new(SessionConfig::default(), Instant::now());
        // CONNECT with Topic Alias Maximum 1 (0x22).
        feed(&mut s, &connect_v5(&[0x22, 0, 1])).unwrap();
        let msg = Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::Level0,
            retain: false,
            props: Default::default(),
            expires: None,
        };
        assert!(s.deliver(&msg, PublishHeader::default()));
        let first = s.out.len();
        assert!(s.deliver(&msg, PublishHeader::default()));
        assert!(
            s.out.len() - first < first,
            "the second copy omits the topic"
        );
    }

    #[test]
    fn receive_maximum_is_enforced_for_v5() {
        let cfg = SessionConfig {
            receive_max: 2,
            ..Default::default()
        };
        let mut s = Session::new(cfg, Instant::now());
        feed(&mut s, &connect_v5(&[])).unwrap();
        let p = |pid: u8| vec![0x32, 6, 0, 1, b't', 0, pid, 0];
        feed(&mut s, &p(1)).unwrap();
        feed(&mut s, &p(2)).unwrap();
        assert_eq!(
            feed(&mut s, &p(3)).unwrap_err().reason,
            Drc::ReceiveMaximumExceeded
        );
    }
}
