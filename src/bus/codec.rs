//! MQTT on the wire: framing (the fixed header and its remaining length, checked against the
//! size limit before anything is buffered), decoding through the `mqtt-proto` crate's
//! slice decoders, and encoding.
//!
//! Inside the broker every packet is an MQTT 5.0 packet (`mqtt_proto::v5`): 3.1.1 and 3.1
//! packets are lifted to 5.0 here on the way in (no properties, reason codes mapped) and
//! lowered on the way out, so the session and broker know one protocol and a `version`.
//! Outgoing PUBLISH packets are written by hand ([`encode_publish`]) straight into the
//! connection's output buffer: it is the hot path of a broker (once per delivery), it may carry
//! several subscription identifiers (the crate's type holds one), and it avoids building a
//! packet value per subscriber (`benches/bus-codec/` measures it).

use bytes::Bytes;
/// The codec crate the bus is built on, for code that decodes beside it (the fuzz target
/// checks that everything the broker sends decodes again).
pub use mqtt_proto;
use mqtt_proto::v5::{self, DisconnectReasonCode as Drc};
use mqtt_proto::{v3, Pid, Protocol, QoS, QosPid};
use std::sync::Arc;
use std::time::Instant;

/// The protocol version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5.0 (level 5).
    V5,
}

impl Version {
    /// Whether this is MQTT 5.0 (properties and reason codes on the wire).
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// Why bytes from a client could not be taken as a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The remaining length used more than four bytes.
    #[error("malformed remaining length")]
    RemainingLength,
    /// The declared packet size is over the limit (checked before buffering it).
    #[error("packet of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// Declared size of the whole packet.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// An unknown packet type, or reserved flag bits not as the specification fixes them.
    #[error("unknown packet type or reserved flags in fixed header byte {0:#04x}")]
    Header(u8),
    /// A protocol name or level this broker does not speak.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// The protocol name sent.
        name: String,
        /// The level sent.
        level: u8,
    },
    /// The packet's content does not follow the specification's encoding.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A well-formed packet that is not allowed here (a server-only packet, a reserved value).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl DecodeError {
    /// The MQTT 5.0 reason code a DISCONNECT for this error carries.
    pub fn reason(&self) -> Drc {
        match self {
            DecodeError::TooLarge { .. } => Drc::PacketTooLarge,
            DecodeError::Protocol(_) | DecodeError::UnsupportedProtocol { .. } => {
                Drc::ProtocolError
            }
            _ => Drc::MalformedPacket,
        }
    }
}

/// Find the first complete packet in `buf`: `Ok(Some((header_len, total_len)))` when all of
/// it is there, `Ok(None)` when more bytes are needed. The declared size is checked against
/// `limit` as soon as the remaining length is known, so an oversize packet is refused before
/// a byte of it is stored.
///
/// # Errors
/// [`DecodeError::RemainingLength`] for a length field of more than four bytes,
/// [`DecodeError::TooLarge`] over `limit`.
pub fn frame(buf: &[u8], limit: usize) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            let total = header + value;
            if total > limit {
                return Err(DecodeError::TooLarge { size: total, limit });
            }
            return Ok((buf.len() >= total).then_some((header, total)));
        }
    }
    Err(DecodeError::RemainingLength)
}

fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

fn v5_err(e: v5::ErrorV5) -> DecodeError {
    match e {
        v5::ErrorV5::Common(c) => common_err(c),
        // "It is a Protocol Error to include X more than once" (5.0 3.x, for every property
        // but User Property), and to give a byte property a value other than 0 or 1.
        v5::ErrorV5::DuplicatedProperty(_) | v5::ErrorV5::InvalidByteProperty(..) => {
            DecodeError::Protocol(e.to_string())
        }
        other => malformed(other),
    }
}

fn common_err(e: mqtt_proto::Error) -> DecodeError {
    match e {
        mqtt_proto::Error::InvalidHeader => DecodeError::Malformed("invalid fixed header".into()),
        mqtt_proto::Error::IoError(_) => {
            DecodeError::Malformed("a field runs past the end of the packet".into())
        }
        other => malformed(other),
    }
}

/// Strings that must not contain U+0000 (the codec checks topic names itself).
fn check_nul(what: &str, s: &str) -> Result<(), DecodeError> {
    if s.contains('\0') {
        Err(DecodeError::Malformed(format!("U+0000 in the {what}")))
    } else {
        Ok(())
    }
}

fn check_user_props(props: &[v5::UserProperty]) -> Result<(), DecodeError> {
    for p in props {
        check_nul("user property name", &p.name)?;
        check_nul("user property value", &p.value)?;
    }
    Ok(())
}

fn done(off: usize, len: usize) -> Result<(), DecodeError> {
    if off == len {
        Ok(())
    } else {
        Err(DecodeError::Malformed(format!(
            "{} bytes left over after the packet's fields",
            len - off
        )))
    }
}

/// Decode the first packet of a connection, which must be CONNECT: its protocol name and
/// level choose the version, and the rest is lifted to 5.0.
///
/// # Errors
/// [`DecodeError::Protocol`] if it is not a CONNECT, [`DecodeError::UnsupportedProtocol`]
/// for a level other than 3 (`MQIsdp`), 4 or 5 (`MQTT`), others for malformed content.
pub fn decode_connect(frame: &[u8], header: usize) -> Result<(Version, v5::Connect), DecodeError> {
    if frame[0] != 0x10 {
        return Err(if frame[0] >> 4 == 1 {
            DecodeError::Header(frame[0])
        } else {
            DecodeError::Protocol(format!(
                "the first packet must be CONNECT, not type {}",
                frame[0] >> 4
            ))
        });
    }
    let body = &frame[header..];
    let name_len = body
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
        .ok_or_else(|| malformed("CONNECT too short"))?;
    let name = body
        .get(2..2 + name_len)
        .ok_or_else(|| malformed("CONNECT too short"))?;
    let level = *body
        .get(2 + name_len)
        .ok_or_else(|| malformed("CONNECT too short"))?;
    let version = match (name, level) {
        (b"MQTT", 5) => Version::V5,
        (b"MQTT", 4) => Version::V311,
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT" | b"MQIsdp", _) => {
            return Err(DecodeError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            })
        }
        _ => {
            return Err(DecodeError::Protocol(format!(
                "unknown protocol name {:?}",
                String::from_utf8_lossy(name)
            )))
        }
    };
    let mut off = header;
    let connect = match version {
        Version::V5 => {
            let h =
                v5::Header::new_with(frame[0], (frame.len() - header) as u32, frame.len() as u32)
                    .map_err(v5_err)?;
            let c = v5::Connect::decode(frame, &mut off, h).map_err(v5_err)?;
            check_user_props(&c.properties.user_properties)?;
            if c.properties.auth_data.is_some() && c.properties.auth_method.is_none() {
                return Err(DecodeError::Protocol(
                    "Authentication Data without an Authentication Method".into(),
                ));
            }
            if let Some(w) = &c.last_will {
                check_user_props(&w.properties.user_properties)?;
            }
            c
        }
        Version::V311 | Version::V31 => {
            off = header;
            let c = v3::Connect::decode(frame, &mut off).map_err(common_err)?;
            v5::Connect {
                protocol: Protocol::V500,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                properties: Default::default(),
                client_id: c.client_id,
                last_will: c.last_will.map(|w| v5::LastWill {
                    qos: w.qos,
                    retain: w.retain,
                    topic_name: w.topic_name,
                    payload: w.message,
                    properties: Default::default(),
                }),
                username: c.username,
                password: c.password,
            }
        }
    };
    done(off, frame.len())?;
    check_nul("client identifier", &connect.client_id)?;
    if let Some(u) = &connect.username {
        check_nul("user name", u)?;
    }
    Ok((version, connect))
}

/// Decode one complete packet (`frame` from [`frame`]) of a connected client.
///
/// # Errors
/// [`DecodeError`] for malformed content, reserved flags, or packets a client may not send
/// (CONNACK, SUBACK, UNSUBACK, PINGRESP).
pub fn decode(version: Version, frame: &[u8], header: usize) -> Result<v5::Packet, DecodeError> {
    let first = frame[0];
    let rem = (frame.len() - header) as u32;
    let total = frame.len() as u32;
    let mut off = header;
    let packet = if version.is_v5() {
        let h = v5::Header::new_with(first, rem, total).map_err(|_| DecodeError::Header(first))?;
        use v5::PacketType as T;
        match h.typ {
            T::Connect => return Err(DecodeError::Protocol("a second CONNECT".into())),
            T::Connack | T::Suback | T::Unsuback | T::Pingresp => {
                return Err(DecodeError::Protocol(format!(
                    "{:?} is sent by servers only",
                    h.typ
                )))
            }
            T::Publish => {
                if h.dup && h.qos == QoS::Level0 {
                    return Err(malformed("DUP set on a QoS 0 PUBLISH"));
                }
                let p = v5::Publish::decode(frame, &mut off, h).map_err(v5_err)?;
                check_user_props(&p.properties.user_properties)?;
                if p.properties.subscription_id.is_some() {
                    return Err(DecodeError::Protocol(
                        "a Subscription Identifier in a PUBLISH from a client".into(),
                    ));
                }
                v5::Packet::Publish(p)
            }
            T::Puback => {
                v5::Packet::Puback(v5::Puback::decode(frame, &mut off, h).map_err(v5_err)?)
            }
            T::Pubrec => {
                v5::Packet::Pubrec(v5::Pubrec::decode(frame, &mut off, h).map_err(v5_err)?)
            }
            T::Pubrel => {
                v5::Packet::Pubrel(v5::Pubrel::decode(frame, &mut off, h).map_err(v5_err)?)
            }
            T::Pubcomp => {
                v5::Packet::Pubcomp(v5::Pubcomp::decode(frame, &mut off, h).map_err(v5_err)?)
            }
            T::Subscribe => {
                let s = v5::Subscribe::decode(frame, &mut off, h).map_err(v5_err)?;
                check_user_props(&s.properties.user_properties)?;
                v5::Packet::Subscribe(s)
            }
            T::Unsubscribe => v5::Packet::Unsubscribe(
                v5::Unsubscribe::decode(frame, &mut off, h).map_err(v5_err)?,
            ),
            T::Pingreq => {
                if rem != 0 {
                    return Err(malformed("PINGREQ with a body"));
                }
                v5::Packet::Pingreq
            }
            T::Disconnect => {
                v5::Packet::Disconnect(v5::Disconnect::decode(frame, &mut off, h).map_err(v5_err)?)
            }
            T::Auth => v5::Packet::Auth(v5::Auth::decode(frame, &mut off, h).map_err(v5_err)?),
        }
    } else {
        let h = v3::Header::new_with(first, rem, total).map_err(|_| DecodeError::Header(first))?;
        use v3::PacketType as T;
        let pid = |off: &mut usize| -> Result<Pid, DecodeError> {
            if rem != 2 {
                return Err(malformed("an acknowledgement must be exactly 2 bytes"));
            }
            let v = u16::from_be_bytes([frame[*off], frame[*off + 1]]);
            *off += 2;
            Pid::try_from(v).map_err(common_err)
        };
        match h.typ {
            T::Connect => return Err(DecodeError::Protocol("a second CONNECT".into())),
            T::Connack | T::Suback | T::Unsuback | T::Pingresp => {
                return Err(DecodeError::Protocol(format!(
                    "{:?} is sent by servers only",
                    h.typ
                )))
            }
            T::Publish => {
                if h.dup && h.qos == QoS::Level0 {
                    return Err(malformed("DUP set on a QoS 0 PUBLISH"));
                }
                let p = v3::Publish::decode(frame, &mut off, h).map_err(common_err)?;
                v5::Packet::Publish(v5::Publish {
                    dup: p.dup,
                    retain: p.retain,
                    qos_pid: p.qos_pid,
                    topic_name: p.topic_name,
                    payload: p.payload,
                    properties: Default::default(),
                })
            }
            T::Puback => v5::Packet::Puback(v5::Puback::new_success(pid(&mut off)?)),
            T::Pubrec => v5::Packet::Pubrec(v5::Pubrec::new_success(pid(&mut off)?)),
            T::Pubrel => v5::Packet::Pubrel(v5::Pubrel::new_success(pid(&mut off)?)),
            T::Pubcomp => v5::Packet::Pubcomp(v5::Pubcomp::new_success(pid(&mut off)?)),
            T::Subscribe => {
                let s = v3::Subscribe::decode(frame, &mut off, h).map_err(common_err)?;
                v5::Packet::Subscribe(v5::Subscribe {
                    pid: s.pid,
                    properties: Default::default(),
                    topics: s
                        .topics
                        .into_iter()
                        .map(|(f, qos)| {
                            let mut o = v5::SubscriptionOptions::new(qos);
                            // 3.1.1: the RETAIN flag is cleared on messages that match an
                            // established subscription.
                            o.retain_as_published = false;
                            (f, o)
                        })
                        .collect(),
                })
            }
            T::Unsubscribe => {
                let u = v3::Unsubscribe::decode(frame, &mut off, h).map_err(common_err)?;
                v5::Packet::Unsubscribe(v5::Unsubscribe {
                    pid: u.pid,
                    properties: Default::default(),
                    topics: u.topics,
                })
            }
            T::Pingreq | T::Disconnect => {
                if rem != 0 {
                    return Err(malformed("PINGREQ/DISCONNECT with a body"));
                }
                if h.typ == T::Pingreq {
                    v5::Packet::Pingreq
                } else {
                    v5::Packet::Disconnect(v5::Disconnect::new_normal())
                }
            }
        }
    };
    done(off, frame.len())?;
    Ok(packet)
}

/// Append the encoding of a control packet (not PUBLISH: see [`encode_publish`]) for
/// `version` to `out`. 3.1.1 has no DISCONNECT from the server and no AUTH: those encode to
/// nothing.
pub fn encode(version: Version, packet: &v5::Packet, out: &mut Vec<u8>) {
    if version.is_v5() {
        match packet.encode() {
            Ok(b) => out.extend_from_slice(b.as_ref()),
            Err(e) => tracing::error!("cannot encode {:?}: {e}", packet.get_type()),
        }
        return;
    }
    let p3 = match packet {
        v5::Packet::Connack(c) => v3::Packet::Connack(v3::Connack::new(
            c.session_present,
            connack_code_v3(c.reason_code),
        )),
        v5::Packet::Puback(p) => v3::Packet::Puback(p.pid),
        v5::Packet::Pubrec(p) => v3::Packet::Pubrec(p.pid),
        v5::Packet::Pubrel(p) => v3::Packet::Pubrel(p.pid),
        v5::Packet::Pubcomp(p) => v3::Packet::Pubcomp(p.pid),
        v5::Packet::Suback(s) => {
            // Written here: mqtt-proto 0.4 encodes its 3.1.1 `Failure` as 3, not 0x80.
            let remaining = 2 + s.topics.len();
            out.push(0x90);
            put_var(out, remaining);
            out.extend_from_slice(&s.pid.value().to_be_bytes());
            out.extend(s.topics.iter().map(|c| match c {
                v5::SubscribeReasonCode::GrantedQoS0 => 0,
                v5::SubscribeReasonCode::GrantedQoS1 => 1,
                v5::SubscribeReasonCode::GrantedQoS2 => 2,
                _ => 0x80,
            }));
            return;
        }
        v5::Packet::Unsuback(u) => v3::Packet::Unsuback(u.pid),
        v5::Packet::Pingresp => v3::Packet::Pingresp,
        v5::Packet::Publish(p) => v3::Packet::Publish(v3::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name.clone(),
            payload: p.payload.clone(),
        }),
        v5::Packet::Connect(_)
        | v5::Packet::Subscribe(_)
        | v5::Packet::Unsubscribe(_)
        | v5::Packet::Pingreq
        | v5::Packet::Disconnect(_)
        | v5::Packet::Auth(_) => return,
    };
    match p3.encode() {
        Ok(b) => out.extend_from_slice(b.as_ref()),
        Err(e) => tracing::error!("cannot encode {:?}: {e}", p3.get_type()),
    }
}

/// The 3.1.1 CONNACK return code closest to a 5.0 reason code.
pub fn connack_code_v3(code: v5::ConnectReasonCode) -> v3::ConnectReturnCode {
    use v3::ConnectReturnCode as R;
    use v5::ConnectReasonCode as C;
    match code {
        C::Success => R::Accepted,
        C::UnsupportedProtocolVersion => R::UnacceptableProtocolVersion,
        C::ClientIdentifierNotValid => R::IdentifierRejected,
        C::BadUserNameOrPassword => R::BadUserNameOrPassword,
        C::NotAuthorized | C::Banned => R::NotAuthorized,
        _ => R::ServerUnavailable,
    }
}

/// A CONNACK refusing an unsupported protocol level, in the format the client can read:
/// 3.1.1's (return code 0x01) for levels below 5, 5.0's (reason 0x84) above.
pub fn unsupported_version_connack(level: u8) -> Vec<u8> {
    if level < 5 {
        vec![0x20, 2, 0, 1]
    } else {
        vec![0x20, 3, 0, 0x84, 0]
    }
}

/// The properties of an application message that travel with it (MQTT 5.0; empty for
/// messages published over 3.1.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    /// Payload format indicator: `Some(true)` for UTF-8 text.
    pub payload_utf8: Option<bool>,
    /// Message expiry interval as published, in seconds.
    pub expiry: Option<u32>,
    /// Content type.
    pub content_type: Option<Arc<str>>,
    /// Response topic (request/response).
    pub response_topic: Option<Arc<str>>,
    /// Correlation data (request/response).
    pub correlation: Option<Bytes>,
    /// User properties, in order.
    pub user: Vec<(Arc<str>, Arc<str>)>,
}

impl MessageProps {
    /// Whether no property is set (3.1.1 messages; most benchmarks).
    pub fn is_empty(&self) -> bool {
        self.payload_utf8.is_none()
            && self.expiry.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation.is_none()
            && self.user.is_empty()
    }
}

/// An application message as the broker keeps it: shared (`Arc`) by every subscriber it is
/// queued for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published to.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// Its 5.0 properties.
    pub props: MessageProps,
    /// When it expires (from the message expiry interval), if ever.
    pub expires: Option<Instant>,
}

impl Message {
    /// The message carried by a PUBLISH packet received at `now` (topic already resolved
    /// from an alias).
    pub fn from_publish(p: &v5::Publish, topic: Arc<str>, now: Instant) -> Message {
        let pr = &p.properties;
        Message {
            topic,
            payload: p.payload.clone(),
            qos: p.qos_pid.qos(),
            retain: p.retain,
            props: MessageProps {
                payload_utf8: pr.payload_is_utf8,
                expiry: pr.message_expiry_interval,
                content_type: pr.content_type.clone(),
                response_topic: pr.response_topic.as_ref().map(|t| Arc::from(&**t)),
                correlation: pr.correlation_data.clone(),
                user: pr
                    .user_properties
                    .iter()
                    .map(|u| (u.name.clone(), u.value.clone()))
                    .collect(),
            },
            expires: pr
                .message_expiry_interval
                .map(|s| now + std::time::Duration::from_secs(s as u64)),
        }
    }

    /// Whether the message has expired at `now` (it is then not delivered).
    pub fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|e| e <= now)
    }

    /// The expiry interval left at `now`, which a forwarded copy carries (5.0 3.3.2.3.3).
    pub fn expiry_left(&self, now: Instant) -> Option<u32> {
        self.expires.map(|e| {
            let left = e.saturating_duration_since(now);
            (left.as_secs() as u32).max(1)
        })
    }

    /// Rough bytes of memory this message holds (for the queue byte caps).
    pub fn cost(&self) -> usize {
        let p = &self.props;
        64 + self.topic.len()
            + self.payload.len()
            + p.content_type.as_ref().map_or(0, |s| s.len())
            + p.response_topic.as_ref().map_or(0, |s| s.len())
            + p.correlation.as_ref().map_or(0, |s| s.len())
            + p.user
                .iter()
                .map(|(a, b)| a.len() + b.len() + 16)
                .sum::<usize>()
    }
}

/// How one delivery of a message is to be written.
#[derive(Debug, Clone, Default)]
pub struct PublishHeader<'a> {
    /// QoS of this delivery (the lower of the message's and the subscription's).
    pub qos: u8,
    /// Packet identifier (QoS 1 and 2).
    pub pid: u16,
    /// The DUP flag (a redelivery).
    pub dup: bool,
    /// The RETAIN flag as sent.
    pub retain: bool,
    /// Subscription identifiers of the matching subscriptions (5.0).
    pub sub_ids: &'a [u32],
    /// Topic alias to send (5.0), and whether the topic itself is sent with it (the first
    /// use of the alias) or left empty.
    pub alias: Option<(u16, bool)>,
    /// Message expiry interval left, if the message has one (5.0).
    pub expiry: Option<u32>,
}

fn var_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 128 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_var(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let mut b = (v % 128) as u8;
        v /= 128;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Append the PUBLISH packet delivering `msg` as `h` says to `out`, unless it would be larger
/// than `max` (the client's maximum packet size): then nothing is written and `false`
/// returned (5.0 says to drop such a message as if it had been delivered).
pub fn encode_publish(
    version: Version,
    msg: &Message,
    h: &PublishHeader<'_>,
    max: usize,
    out: &mut Vec<u8>,
) -> bool {
    let topic: &[u8] = match h.alias {
        Some((_, false)) => b"",
        _ => msg.topic.as_bytes(),
    };
    let p = &msg.props;
    let mut props_len = 0usize;
    if version.is_v5() {
        if p.payload_utf8.is_some() {
            props_len += 2;
        }
        if h.expiry.is_some() {
            props_len += 5;
        }
        if let Some(c) = &p.content_type {
            props_len += 3 + c.len();
        }
        if let Some(r) = &p.response_topic {
            props_len += 3 + r.len();
        }
        if let Some(c) = &p.correlation {
            props_len += 3 + c.len();
        }
        for id in h.sub_ids {
            props_len += 1 + var_len(*id as usize);
        }
        if h.alias.is_some() {
            props_len += 3;
        }
        for (k, v) in &p.user {
            props_len += 5 + k.len() + v.len();
        }
    }
    let mut remaining = 2 + topic.len() + msg.payload.len();
    if h.qos > 0 {
        remaining += 2;
    }
    if version.is_v5() {
        remaining += var_len(props_len) + props_len;
    }
    let total = 1 + var_len(remaining) + remaining;
    if total > max {
        return false;
    }
    out.reserve(total);
    out.push(0x30 | (h.qos << 1) | ((h.dup as u8) << 3) | h.retain as u8);
    put_var(out, remaining);
    put_str(out, topic);
    if h.qos > 0 {
        out.extend_from_slice(&h.pid.to_be_bytes());
    }
    if version.is_v5() {
        put_var(out, props_len);
        if let Some(u) = p.payload_utf8 {
            out.extend_from_slice(&[0x01, u as u8]);
        }
        if let Some(e) = h.expiry {
            out.push(0x02);
            out.extend_from_slice(&e.to_be_bytes());
        }
        if let Some(c) = &p.content_type {
            out.push(0x03);
            put_str(out, c.as_bytes());
        }
        if let Some(r) = &p.response_topic {
            out.push(0x08);
            put_str(out, r.as_bytes());
        }
        if let Some(c) = &p.correlation {
            out.push(0x09);
            put_str(out, c);
        }
        for id in h.sub_ids {
            out.push(0x0B);
            put_var(out, *id as usize);
        }
        if let Some((a, _)) = h.alias {
            out.push(0x23);
            out.extend_from_slice(&a.to_be_bytes());
        }
        for (k, v) in &p.user {
            out.push(0x26);
            put_str(out, k.as_bytes());
            put_str(out, v.as_bytes());
        }
    }
    out.extend_from_slice(&msg.payload);
    true
}

/// The QoS with this number (0, 1, 2), or `None`.
pub fn qos_from(n: u8) -> Option<QoS> {
    QoS::from_u8(n).ok()
}

/// The packet identifier of a PUBLISH's `QosPid` (0 for QoS 0).
pub fn pid_of(q: QosPid) -> u16 {
    q.pid().map_or(0, |p| p.value())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8], version: Version) -> Result<v5::Packet, DecodeError> {
        let (h, t) = frame(bytes, 1 << 20)?.expect("complete");
        assert_eq!(t, bytes.len());
        decode(version, bytes, h)
    }

    #[test]
    fn frame_needs_more_then_finds_the_packet() {
        let pkt = [0x30, 0x05, 0, 1, b'a', b'h', b'i'];
        for cut in 0..pkt.len() {
            assert_eq!(frame(&pkt[..cut], 100).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(frame(&pkt, 100).unwrap(), Some((2, 7)));
    }

    #[test]
    fn frame_refuses_five_byte_lengths_and_oversize_before_buffering() {
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], 100),
            Err(DecodeError::RemainingLength)
        );
        // Only the header is here, but the declared size already says no.
        assert!(matches!(
            frame(&[0x30, 0xff, 0xff, 0x7f], 1 << 20),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn connect_levels_choose_the_version() {
        let v4 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 1, b'c',
        ];
        let (h, _) = frame(&v4, 100).unwrap().unwrap();
        let (v, c) = decode_connect(&v4, h).unwrap();
        assert_eq!(v, Version::V311);
        assert_eq!(&*c.client_id, "c");
        assert!(c.clean_start);
        let mut v9 = v4;
        v9[8] = 9;
        assert!(matches!(
            decode_connect(&v9, h),
            Err(DecodeError::UnsupportedProtocol { level: 9, .. })
        ));
        let mut nul = v4;
        nul[14] = 0;
        assert!(decode_connect(&nul, h).is_err(), "U+0000 in the client id");
    }

    #[test]
    fn v3_packets_lift_to_v5() {
        let p = one(&[0x40, 2, 0, 7], Version::V311).unwrap();
        assert!(matches!(p, v5::Packet::Puback(ref a) if a.pid.value() == 7));
        let s = one(&[0x82, 6, 0, 1, 0, 1, b'#', 1], Version::V311).unwrap();
        let v5::Packet::Subscribe(s) = s else {
            panic!()
        };
        assert_eq!(s.topics[0].1.max_qos, QoS::Level1);
        assert!(!s.topics[0].1.retain_as_published);
    }

    #[test]
    fn reserved_flags_wildcards_and_server_packets_are_refused() {
        assert!(matches!(
            one(&[0x82 ^ 0x02, 6, 0, 1, 0, 1, b'#', 1], Version::V311),
            Err(DecodeError::Header(_))
        ));
        assert!(one(&[0x30, 3, 0, 1, b'+'], Version::V5).is_err());
        assert!(matches!(
            one(&[0x20, 2, 0, 0], Version::V311),
            Err(DecodeError::Protocol(_))
        ));
        assert!(
            one(&[0x38, 3, 0, 1, b'a'], Version::V311).is_err(),
            "DUP on QoS 0"
        );
        assert!(
            one(&[0x40, 3, 0, 7, 0], Version::V311).is_err(),
            "trailing byte"
        );
    }

    #[test]
    fn publish_encoding_round_trips_through_the_crate_decoder() {
        let msg = Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hello"),
            qos: QoS::Level1,
            retain: false,
            props: MessageProps {
                payload_utf8: Some(true),
                response_topic: Some("r".into()),
                correlation: Some(Bytes::from_static(b"id")),
                user: vec![("k".into(), "v".into())],
                ..Default::default()
            },
            expires: None,
        };
        let h = PublishHeader {
            qos: 1,
            pid: 9,
            dup: true,
            sub_ids: &[3],
            alias: Some((2, true)),
            expiry: Some(30),
            ..Default::default()
        };
        let mut out = Vec::new();
        assert!(encode_publish(Version::V5, &msg, &h, 1 << 20, &mut out));
        let v5::Packet::Publish(p) = v5::Packet::decode(&out).unwrap().unwrap() else {
            panic!()
        };
        assert!(p.dup);
        assert_eq!(&*p.topic_name, "a/b");
        assert_eq!(p.properties.topic_alias, Some(2));
        assert_eq!(p.properties.message_expiry_interval, Some(30));
        assert_eq!(p.properties.subscription_id.map(|i| i.value()), Some(3));
        assert_eq!(&p.payload[..], b"hello");
        let mut small = Vec::new();
        assert!(!encode_publish(Version::V5, &msg, &h, 10, &mut small));
        assert!(small.is_empty());
        let mut v3 = Vec::new();
        assert!(encode_publish(Version::V311, &msg, &h, 1 << 20, &mut v3));
        assert!(matches!(
            v3::Packet::decode(&v3).unwrap().unwrap(),
            v3::Packet::Publish(_)
        ));
    }

    #[test]
    fn duplicated_properties_are_protocol_errors() {
        // PUBLISH "t" (5.0) with these properties, payload "x".
        let publish = |props: &[u8]| {
            let mut body = vec![0, 1, b't', props.len() as u8];
            body.extend_from_slice(props);
            body.push(b'x');
            let mut p = vec![0x30, body.len() as u8];
            p.extend(body);
            one(&p, Version::V5)
        };
        assert!(publish(&[0x01, 1]).is_ok());
        for (name, props) in [
            ("payload format", &[0x01, 1, 0x01, 0][..]),
            ("message expiry", &[0x02, 0, 0, 0, 5, 0x02, 0, 0, 0, 6]),
            ("content type", &[0x03, 0, 1, b'a', 0x03, 0, 1, b'b']),
            ("response topic", &[0x08, 0, 1, b'r', 0x08, 0, 1, b'r']),
            ("correlation data", &[0x09, 0, 1, 7, 0x09, 0, 1, 7]),
            ("topic alias", &[0x23, 0, 1, 0x23, 0, 2]),
            ("payload format 2", &[0x01, 2]),
            ("subscription id from a client", &[0x0b, 1]),
        ] {
            assert!(
                matches!(publish(props), Err(DecodeError::Protocol(_))),
                "{name}: {:?}",
                publish(props)
            );
        }
        // User properties may repeat.
        assert!(publish(&[0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'v']).is_ok());
        // CONNECT with two Session Expiry Intervals; SUBSCRIBE with two identifiers;
        // PUBACK with two reason strings; DISCONNECT with two session expiries.
        let connect = [
            0x10, 23, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 10, 10, 0x11, 0, 0, 0, 1, 0x11, 0, 0,
            0, 2, 0, 0,
        ];
        let (h, _) = frame(&connect, 100).unwrap().unwrap();
        assert!(matches!(
            decode_connect(&connect, h),
            Err(DecodeError::Protocol(_))
        ));
        for p in [
            &[0x82, 11, 0, 1, 4, 0x0b, 1, 0x0b, 2, 0, 1, b'a', 0][..],
            &[0x40, 12, 0, 1, 0, 8, 0x1f, 0, 1, b'a', 0x1f, 0, 1, b'b'],
            &[0xe0, 12, 0, 10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1],
        ] {
            assert!(
                matches!(one(p, Version::V5), Err(DecodeError::Protocol(_))),
                "{p:02x?}: {:?}",
                one(p, Version::V5)
            );
        }
    }
}
