//! The bus clients: a small blocking MQTT client over the same codec, and `socklab bus pub`
//! and `socklab bus sub` on top of it (mosquitto_pub/sub's conventions).
//!
//! The broker is found with `--bus ADDR` (HOST:PORT, or a path for a Unix socket), else
//! `$SOCKLAB_BUS`, else 127.0.0.1:1883 -- as D-Bus clients use `DBUS_SESSION_BUS_ADDRESS`.

use super::auth::tls::{self, Stream, TlsConn};
use super::codec::{self, Version};
use crate::client::UsageError;
use crate::net::Endpoint;
use bytes::Bytes;
use mqtt_proto::{v3, v5, Pid, QoS, QosPid, TopicFilter, TopicName};
use socket2::Socket;
use std::io::{self, BufRead, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where the bus is: `--bus`, else `$SOCKLAB_BUS`, else 127.0.0.1:1883.
pub fn bus_endpoint(arg: Option<&str>) -> Endpoint {
    let addr = arg
        .map(str::to_string)
        .or_else(|| std::env::var("SOCKLAB_BUS").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "127.0.0.1:1883".into());
    if addr.contains('/') {
        Endpoint::Unix(addr.into())
    } else {
        Endpoint::Inet(addr)
    }
}

/// Parse `-V 5|311|31`.
pub fn parse_version(s: &str) -> Result<Version, String> {
    match s {
        "5" | "mqttv5" => Ok(Version::V5),
        "311" | "mqttv311" => Ok(Version::V311),
        "31" | "mqttv31" => Ok(Version::V31),
        _ => Err(format!("unknown protocol version {s:?} (5, 311 or 31)")),
    }
}

/// What a connection is opened with.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Protocol version.
    pub version: Version,
    /// Client identifier (empty: the broker assigns one).
    pub client_id: String,
    /// Clean session / clean start.
    pub clean: bool,
    /// Keep-alive in seconds.
    pub keep_alive: u16,
    /// 5.0 session expiry interval.
    pub session_expiry: Option<u32>,
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Bytes>,
    /// TLS, with this configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            version: Version::V5,
            client_id: String::new(),
            clean: true,
            keep_alive: 60,
            session_expiry: None,
            username: None,
            password: None,
            tls: None,
        }
    }
}

/// A blocking MQTT connection.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    /// Serializes writes with the [`Writer`]s of other threads.
    wlock: Arc<Mutex<()>>,
    version: Version,
    buf: Vec<u8>,
    next_pid: u16,
    /// Packets received while waiting for something else (publications, mostly).
    pending: std::collections::VecDeque<v5::Packet>,
    /// What each read lands in (allocated once).
    rbuf: Box<[u8]>,
}

fn proto_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Client {
    /// Connect and wait for CONNACK.
    ///
    /// # Errors
    /// Connection errors, or a refusal (the CONNACK's reason in the message).
    pub fn connect(
        endpoint: &Endpoint,
        o: &ConnectOptions,
    ) -> anyhow::Result<(Client, v5::Connack)> {
        let sock = crate::net::connect(endpoint)?;
        let stream = match &o.tls {
            Some(cfg) => {
                let host = match endpoint {
                    Endpoint::Inet(a) => a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h),
                    Endpoint::Unix(_) => "localhost",
                };
                Stream::tls(sock, cfg.clone(), host)?
            }
            None => Stream::Plain(sock),
        };
        let mut c = Client {
            stream,
            wlock: Arc::new(Mutex::new(())),
            version: o.version,
            buf: Vec::new(),
            next_pid: 0,
            pending: Default::default(),
            rbuf: vec![0; 65536].into_boxed_slice(),
        };
        let mut connect = v5::Connect::new(o.client_id.as_str().into(), o.keep_alive);
        connect.clean_start = o.clean;
        connect.properties.session_expiry_interval = o.session_expiry;
        connect.username = o.username.as_deref().map(Into::into);
        connect.password = o.password.clone();
        let bytes = match o.version {
            Version::V5 => v5::Packet::Connect(connect).encode().map_err(proto_err)?,
            Version::V311 | Version::V31 => {
                let mut c3 = v3::Connect::new(o.client_id.as_str().into(), o.keep_alive);
                c3.clean_session = o.clean;
                c3.username = o.username.as_deref().map(Into::into);
                c3.password = o.password.clone();
                if o.version == Version::V31 {
                    c3.protocol = mqtt_proto::Protocol::V310;
                }
                v3::Packet::Connect(c3).encode().map_err(proto_err)?
            }
        };
        c.write(bytes.as_ref())?;
        match c.read_packet()? {
            v5::Packet::Connack(ack) if ack.reason_code == v5::ConnectReasonCode::Success => {
                Ok((c, ack))
            }
            v5::Packet::Connack(ack) => {
                anyhow::bail!("the broker refused the connection: {:?}", ack.reason_code)
            }
            other => anyhow::bail!("expected CONNACK, got {:?}", other.get_type()),
        }
    }

    /// The socket (for timeouts).
    pub fn socket(&self) -> &Socket {
        self.stream.socket()
    }

    /// Hand the connection over to another driver (the load generator's event loops): the
    /// socket, the bytes received but not yet decoded, and the packets decoded while waiting
    /// for something else (publications that arrived before a SUBACK); over TLS, the TLS
    /// state too (it may hold received plaintext not yet read).
    pub fn into_parts(self) -> (Socket, Option<TlsConn>, Vec<u8>, Vec<v5::Packet>) {
        let (sock, tls) = self.stream.into_parts();
        (sock, tls, self.buf, self.pending.into_iter().collect())
    }

    fn write(&mut self, b: &[u8]) -> io::Result<()> {
        let _g = self.wlock.lock().unwrap_or_else(|e| e.into_inner());
        self.stream.write_all(b)
    }

    /// A handle that sends on this connection from another thread (5.0 only), its writes
    /// never interleaved with this client's.
    ///
    /// # Errors
    /// The socket could not be duplicated, or the connection is over TLS.
    pub fn writer(&self) -> io::Result<Writer> {
        match &self.stream {
            Stream::Plain(sock) => Ok(Writer {
                sock: sock.try_clone()?,
                wlock: self.wlock.clone(),
            }),
            // One TLS state per connection, owned by the reader: it cannot be shared.
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "sending from another thread is not possible over TLS (use a plain or Unix connection)",
            )),
        }
    }

    /// Encode and send one packet.
    ///
    /// # Errors
    /// I/O errors.
    pub fn send(&mut self, p: &v5::Packet) -> io::Result<()> {
        let mut out = Vec::new();
        match (self.version, p) {
            (Version::V5, _) => out.extend_from_slice(p.encode().map_err(proto_err)?.as_ref()),
            (_, v5::Packet::Subscribe(s)) => {
                let s3 = v3::Subscribe::new(
                    s.pid,
                    s.topics
                        .iter()
                        .map(|(f, o)| (f.clone(), o.max_qos))
                        .collect(),
                );
                out.extend_from_slice(
                    v3::Packet::Subscribe(s3)
                        .encode()
                        .map_err(proto_err)?
                        .as_ref(),
                );
            }
            (_, v5::Packet::Pingreq) => out.extend_from_slice(&[0xc0, 0]),
            (_, v5::Packet::Disconnect(_)) => out.extend_from_slice(&[0xe0, 0]),
            // Acknowledgements and PUBLISH encode the same way in 3.1.1 (the codec lowers them).
            _ => codec::encode(self.version, p, &mut out),
        }
        self.write(&out)
    }

    fn next_pid(&mut self) -> Pid {
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        Pid::try_from(self.next_pid).expect("nonzero")
    }

    /// Read one packet from the broker (publications are acknowledged by the caller).
    ///
    /// # Errors
    /// The connection closed, or a malformed packet.
    pub fn read_packet(&mut self) -> io::Result<v5::Packet> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(p);
        }
        loop {
            if let Some((h, total)) = codec::frame(&self.buf, usize::MAX >> 4).map_err(proto_err)? {
                let frame: Vec<u8> = self.buf.drain(..total).collect();
                return self.decode(&frame, h);
            }
            // One read buffer for the connection's life: no 64 KiB zeroed per read.
            let n = self.stream.read(&mut self.rbuf)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the broker closed the connection",
                ));
            }
            self.buf.extend_from_slice(&self.rbuf[..n]);
        }
    }

    fn decode(&self, frame: &[u8], _h: usize) -> io::Result<v5::Packet> {
        if self.version.is_v5() {
            return v5::Packet::decode(frame)
                .map_err(proto_err)?
                .ok_or_else(|| proto_err("short packet"));
        }
        let p = v3::Packet::decode(frame)
            .map_err(proto_err)?
            .ok_or_else(|| proto_err("short packet"))?;
        Ok(match p {
            v3::Packet::Connack(c) => {
                let code = match c.code {
                    v3::ConnectReturnCode::Accepted => v5::ConnectReasonCode::Success,
                    v3::ConnectReturnCode::UnacceptableProtocolVersion => {
                        v5::ConnectReasonCode::UnsupportedProtocolVersion
                    }
                    v3::ConnectReturnCode::IdentifierRejected => {
                        v5::ConnectReasonCode::ClientIdentifierNotValid
                    }
                    v3::ConnectReturnCode::BadUserNameOrPassword => {
                        v5::ConnectReasonCode::BadUserNameOrPassword
                    }
                    v3::ConnectReturnCode::NotAuthorized => v5::ConnectReasonCode::NotAuthorized,
                    v3::ConnectReturnCode::ServerUnavailable => {
                        v5::ConnectReasonCode::ServerUnavailable
                    }
                };
                v5::Packet::Connack(v5::Connack::new(c.session_present, code))
            }
            v3::Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
                dup: p.dup,
                retain: p.retain,
                qos_pid: p.qos_pid,
                topic_name: p.topic_name,
                payload: p.payload,
                properties: Default::default(),
            }),
            v3::Packet::Puback(p) => v5::Packet::Puback(v5::Puback::new_success(p)),
            v3::Packet::Pubrec(p) => v5::Packet::Pubrec(v5::Pubrec::new_success(p)),
            v3::Packet::Pubrel(p) => v5::Packet::Pubrel(v5::Pubrel::new_success(p)),
            v3::Packet::Pubcomp(p) => v5::Packet::Pubcomp(v5::Pubcomp::new_success(p)),
            v3::Packet::Suback(s) => v5::Packet::Suback(v5::Suback::new(
                s.pid,
                s.topics
                    .iter()
                    .map(|c| match c {
                        v3::SubscribeReturnCode::MaxLevel0 => v5::SubscribeReasonCode::GrantedQoS0,
                        v3::SubscribeReturnCode::MaxLevel1 => v5::SubscribeReasonCode::GrantedQoS1,
                        v3::SubscribeReturnCode::MaxLevel2 => v5::SubscribeReasonCode::GrantedQoS2,
                        v3::SubscribeReturnCode::Failure => {
                            v5::SubscribeReasonCode::UnspecifiedError
                        }
                    })
                    .collect(),
            )),
            v3::Packet::Unsuback(p) => v5::Packet::Unsuback(v5::Unsuback::new(p, vec![])),
            v3::Packet::Pingresp => v5::Packet::Pingresp,
            other => {
                return Err(proto_err(format!(
                    "unexpected {:?} from the broker",
                    other.get_type()
                )))
            }
        })
    }

    /// Wait for a packet `want` accepts, keeping others (publications) for later.
    fn wait_for(&mut self, mut want: impl FnMut(&v5::Packet) -> bool) -> io::Result<v5::Packet> {
        let mut kept = Vec::new();
        let r = loop {
            let p = match self.read_packet() {
                Ok(p) => p,
                Err(e) => break Err(e),
            };
            if want(&p) {
                break Ok(p);
            }
            kept.push(p);
        };
        self.pending.extend(kept);
        r
    }

    /// Subscribe to `filters` with QoS `qos`; returns the granted codes.
    ///
    /// # Errors
    /// I/O errors or an invalid filter.
    pub fn subscribe(
        &mut self,
        filters: &[String],
        qos: QoS,
    ) -> anyhow::Result<Vec<v5::SubscribeReasonCode>> {
        let pid = self.next_pid();
        let mut topics = Vec::new();
        for f in filters {
            let tf = TopicFilter::try_from(f.as_str())
                .map_err(|e| UsageError(format!("invalid topic filter {f:?}: {e}")))?;
            topics.push((tf, v5::SubscriptionOptions::new(qos)));
        }
        self.send(&v5::Packet::Subscribe(v5::Subscribe::new(pid, topics)))?;
        match self.wait_for(|p| matches!(p, v5::Packet::Suback(s) if s.pid == pid))? {
            v5::Packet::Suback(s) => Ok(s.topics),
            _ => unreachable!("wait_for returned a SUBACK"),
        }
    }

    /// Publish and complete the QoS flow (PUBACK, or PUBREC/PUBREL/PUBCOMP).
    ///
    /// # Errors
    /// I/O errors, an invalid topic, or a refusal by the broker (5.0 reason code).
    pub fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> anyhow::Result<()> {
        let name = TopicName::try_from(topic)
            .map_err(|e| UsageError(format!("invalid topic {topic:?}: {e}")))?;
        if name.is_empty() {
            return Err(UsageError("the topic must not be empty".into()).into());
        }
        let qos_pid = match qos {
            QoS::Level0 => QosPid::Level0,
            QoS::Level1 => QosPid::Level1(self.next_pid()),
            QoS::Level2 => QosPid::Level2(self.next_pid()),
        };
        let mut p = v5::Publish::new(qos_pid, name, payload);
        p.retain = retain;
        self.send(&v5::Packet::Publish(p))?;
        match qos_pid {
            QosPid::Level0 => {}
            QosPid::Level1(pid) => {
                if let v5::Packet::Puback(a) =
                    self.wait_for(|p| matches!(p, v5::Packet::Puback(a) if a.pid == pid))?
                {
                    if a.reason_code as u8 >= 0x80 {
                        anyhow::bail!("the broker refused the message: {:?}", a.reason_code);
                    }
                }
            }
            QosPid::Level2(pid) => {
                if let v5::Packet::Pubrec(r) =
                    self.wait_for(|p| matches!(p, v5::Packet::Pubrec(r) if r.pid == pid))?
                {
                    if r.reason_code as u8 >= 0x80 {
                        anyhow::bail!("the broker refused the message: {:?}", r.reason_code);
                    }
                }
                self.send(&v5::Packet::Pubrel(v5::Pubrel::new_success(pid)))?;
                self.wait_for(|p| matches!(p, v5::Packet::Pubcomp(c) if c.pid == pid))?;
            }
        }
        Ok(())
    }

    /// Wait for the next publication, acknowledging it as its QoS requires.
    ///
    /// # Errors
    /// I/O errors (a timeout set on the socket shows as `WouldBlock`).
    pub fn next_message(&mut self) -> io::Result<v5::Publish> {
        loop {
            match self.read_packet()? {
                v5::Packet::Publish(p) => {
                    match p.qos_pid {
                        QosPid::Level0 => {}
                        QosPid::Level1(pid) => {
                            self.send(&v5::Packet::Puback(v5::Puback::new_success(pid)))?
                        }
                        QosPid::Level2(pid) => {
                            self.send(&v5::Packet::Pubrec(v5::Pubrec::new_success(pid)))?
                        }
                    }
                    return Ok(p);
                }
                v5::Packet::Pubrel(r) => {
                    self.send(&v5::Packet::Pubcomp(v5::Pubcomp::new_success(r.pid)))?
                }
                v5::Packet::Disconnect(d) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!("the broker disconnected: {:?}", d.reason_code),
                    ))
                }
                _ => {}
            }
        }
    }

    /// Send DISCONNECT and close.
    ///
    /// # Errors
    /// I/O errors.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(&v5::Packet::Disconnect(v5::Disconnect::new_normal()))?;
        self.stream.shutdown();
        Ok(())
    }
}

/// How a client logs in: user name and password, TLS (mosquitto_pub/sub's flags).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoginArgs {
    /// User name.
    #[arg(short = 'u', long = "username")]
    pub username: Option<String>,
    /// Password (other local users can see it in `ps`; a password file or certificate is
    /// better for scripts).
    #[arg(short = 'P', long = "pw")]
    pub password: Option<String>,
    /// Connect with TLS, trusting the system's CA certificates (or --cafile's).
    #[arg(long)]
    pub tls: bool,
    /// CA certificates to trust (PEM); implies --tls.
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM), shown to the broker; with --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
}

impl LoginArgs {
    /// Put the user name, password and TLS configuration into `o`.
    ///
    /// # Errors
    /// Unreadable certificate files.
    pub fn apply(&self, o: &mut ConnectOptions) -> anyhow::Result<()> {
        o.username.clone_from(&self.username);
        o.password = self.password.clone().map(Bytes::from);
        if self.tls || self.cafile.is_some() || self.cert.is_some() {
            o.tls = Some(tls::client_config(&tls::ClientTls {
                cafile: self.cafile.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            })?);
        }
        Ok(())
    }
}

/// Sends packets on a [`Client`]'s connection from another thread (MQTT 5.0).
#[derive(Debug)]
pub struct Writer {
    sock: Socket,
    wlock: Arc<Mutex<()>>,
}

impl Writer {
    /// Encode and send one packet.
    ///
    /// # Errors
    /// I/O errors.
    pub fn send(&self, p: &v5::Packet) -> io::Result<()> {
        let bytes = p.encode().map_err(proto_err)?;
        let _g = self.wlock.lock().unwrap_or_else(|e| e.into_inner());
        (&self.sock).write_all(bytes.as_ref())
    }
}

/// Arguments of `socklab bus pub`.
#[derive(Debug, Clone, clap::Args)]
pub struct PubArgs {
    /// The topic to publish to.
    pub topic: String,
    /// The message (default: all of stdin as one message; `-l`: one message per line).
    pub message: Option<String>,
    /// Send each line of stdin as a message.
    #[arg(short = 'l', long = "stdin-line", conflicts_with = "message")]
    pub lines: bool,
    /// QoS 0, 1 or 2.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Retain the message (an empty message clears the retained one).
    #[arg(short, long)]
    pub retain: bool,
    /// Protocol version: 5, 311 or 31.
    #[arg(short = 'V', long = "protocol-version", value_parser = parse_version, default_value = "311")]
    pub version: Version,
    /// Client identifier.
    #[arg(short = 'i', long = "id")]
    pub client_id: Option<String>,
    /// The broker: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Arguments of `socklab bus sub`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubArgs {
    /// Topic filters (`+` one level, `#` the rest, `$share/GROUP/FILTER`).
    #[arg(required = true)]
    pub filters: Vec<String>,
    /// Maximum QoS requested.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Exit after this many messages.
    #[arg(short = 'C', long = "count")]
    pub count: Option<u64>,
    /// Print each message's topic before it (mosquitto_sub's -v). Here -v does not raise the
    /// log level; RUST_LOG=socklab=debug does.
    // Same id as the global -v, so that it takes its place in this subcommand.
    #[arg(short = 'v', long = "verbose", id = "verbose", action = clap::ArgAction::Count)]
    pub print_topics: u8,
    /// Protocol version: 5, 311 or 31.
    #[arg(short = 'V', long = "protocol-version", value_parser = parse_version, default_value = "311")]
    pub version: Version,
    /// Client identifier.
    #[arg(short = 'i', long = "id")]
    pub client_id: Option<String>,
    /// Keep the session when disconnected (no clean session; 5.0: session expiry of a day).
    #[arg(short = 'c', long = "disable-clean-session")]
    pub persistent: bool,
    /// Exit if no message arrives for this long (mosquitto_sub's -W).
    #[arg(short = 'W', long = "timeout", value_parser = crate::units::parse_duration)]
    pub timeout: Option<Duration>,
    /// One JSON object per message (topic, payload, qos, retain).
    #[arg(long)]
    pub json: bool,
    /// The broker: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

fn qos_of(n: u8) -> QoS {
    codec::qos_from(n).unwrap_or(QoS::Level0)
}

/// `socklab bus pub`.
///
/// # Errors
/// Connection failures, refusals, bad topics.
pub fn run_pub(a: &PubArgs) -> anyhow::Result<()> {
    let ep = bus_endpoint(a.bus.as_deref());
    let mut o = ConnectOptions {
        version: a.version,
        client_id: a.client_id.clone().unwrap_or_default(),
        ..Default::default()
    };
    a.login.apply(&mut o)?;
    let o = if o.client_id.is_empty() && !a.version.is_v5() {
        ConnectOptions {
            client_id: format!("socklab-pub-{}", std::process::id()),
            ..o
        }
    } else {
        o
    };
    let (mut c, _) = Client::connect(&ep, &o)?;
    let qos = qos_of(a.qos);
    if a.lines {
        for line in io::stdin().lock().lines() {
            c.publish(&a.topic, Bytes::from(line?), qos, a.retain)?;
        }
    } else {
        let payload = match &a.message {
            Some(m) => Bytes::from(m.clone()),
            None => {
                let mut v = Vec::new();
                io::stdin().read_to_end(&mut v)?;
                Bytes::from(v)
            }
        };
        c.publish(&a.topic, payload, qos, a.retain)?;
    }
    c.disconnect()?;
    Ok(())
}

/// `socklab bus sub`.
///
/// # Errors
/// Connection failures, refusals, bad filters.
pub fn run_sub(a: &SubArgs) -> anyhow::Result<()> {
    let print_topic = a.print_topics > 0;
    let ep = bus_endpoint(a.bus.as_deref());
    let client_id = a.client_id.clone().unwrap_or_else(|| {
        if a.version.is_v5() && !a.persistent {
            String::new()
        } else {
            format!("socklab-sub-{}", std::process::id())
        }
    });
    let mut o = ConnectOptions {
        version: a.version,
        client_id,
        clean: !a.persistent,
        session_expiry: (a.persistent && a.version.is_v5()).then_some(86400),
        ..Default::default()
    };
    a.login.apply(&mut o)?;
    let (mut c, _) = Client::connect(&ep, &o)?;
    let codes = c.subscribe(&a.filters, qos_of(a.qos))?;
    for (f, code) in a.filters.iter().zip(&codes) {
        if *code as u8 >= 0x80 {
            anyhow::bail!("subscription to {f:?} refused: {code:?}");
        }
    }
    c.socket().set_read_timeout(a.timeout)?;
    let mut out = io::stdout().lock();
    let mut n = 0u64;
    while a.count.is_none_or(|max| n < max) {
        let p = match c.next_message() {
            Ok(p) => p,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                anyhow::bail!("timed out after {} messages", n)
            }
            Err(e) => return Err(e.into()),
        };
        n += 1;
        if a.json {
            let v = serde_json::json!({
                "topic": &*p.topic_name,
                "payload": String::from_utf8_lossy(&p.payload),
                "qos": p.qos_pid.qos() as u8,
                "retain": p.retain,
            });
            writeln!(out, "{v}")?;
        } else {
            if print_topic {
                write!(out, "{} ", &*p.topic_name)?;
            }
            out.write_all(&p.payload)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    c.disconnect()?;
    Ok(())
}
