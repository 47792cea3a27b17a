//! `socklab bus`: the course's software bus as an MQTT 3.1.1 / 5.0 broker, its clients and
//! its load generator, and on top of it D-Bus's ideas for any MQTT 5 client: well-known
//! names, method calls routed to a name's owner, signals selected by match rules, monitors.
//!
//! | file | part |
//! | --- | --- |
//! | [`codec`] | framing, the `mqtt-proto` crate's decoders, 3.1.1 ↔ 5.0 mapping, PUBLISH encoding |
//! | [`topic`] | the subscription trie (`+`, `#`, `$` topics, `$share/GROUP/FILTER`) |
//! | [`session`] | one connection's protocol state, sans-IO: bytes in, packets out |
//! | [`broker`] | the routing core, sans-IO: sessions, retained messages, wills, `$SYS` |
//! | [`dbus`] | the D-Bus half, sans-IO: unique names, the bus driver, calls routed to a name's owner, replies, signals, monitors |
//! | [`names`] | the well-known name registry: owners, queues, D-Bus's ownership rules |
//! | [`rules`] | D-Bus match rules: parsing and matching |
//! | [`store`] | persistence behind the core (redb), group-committed |
//! | [`server`] | `bus serve`: the epoll reactors driving the core |
//! | [`client`] | a blocking client, `bus pub` and `bus sub` |
//! | [`peer`] | the Rust API of the D-Bus half: call, own and serve names, signals, monitor |
//! | [`tools`] | `bus names`, `bus call`, `bus own -- COMMAND`, `bus emit`, `bus listen`, `bus monitor` |
//! | [`bench`](mod@bench) | `bus bench`: verified load against any broker |
//! | [`auth`] | who may join and what they may do: password files, ACLs, login limits, TLS |
//!
//! See `docs/bus.md` for the protocol notes and the design.

pub mod auth;
pub mod bench;
pub mod broker;
pub mod client;
pub mod codec;
pub mod dbus;
pub mod names;
pub mod peer;
pub mod rules;
pub mod server;
pub mod session;
pub mod store;
pub mod tools;
pub mod topic;

use crate::units::{parse_duration, parse_size};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `socklab bus`.
#[derive(Debug, clap::Args)]
pub struct BusArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: BusCommand,
}

/// The bus subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum BusCommand {
    /// Run the broker (MQTT 3.1.1 and 5.0). The first stdout line is the bound address.
    ///
    /// Example: `socklab bus serve --listen 127.0.0.1:0`, `socklab bus serve --data /var/lib/bus`
    Serve(ServeArgs),
    /// Publish a message (like mosquitto_pub): `socklab bus pub TOPIC MESSAGE [-q 1] [-r]`,
    /// `... | socklab bus pub TOPIC -l` (a message per line).
    Pub(client::PubArgs),
    /// Subscribe and print messages (like mosquitto_sub; `-v` prints topics): `socklab bus sub 'a/#' -v -C 10`.
    Sub(client::SubArgs),
    /// Load any MQTT broker, verify every message: `socklab bus bench 127.0.0.1:1883
    /// --scenario fanout -n 100 -q 1 -d 10s`.
    Bench(bench::BenchArgs),
    /// List every name on the bus with its owner and queue (like D-Bus's ListNames).
    Names(tools::NamesArgs),
    /// Call a method on a name's owner and print the reply:
    /// `socklab bus call com.example.Calc Add 2 3 -j --timeout 5s`.
    Call(tools::CallArgs),
    /// Own a name and answer its calls by running a command (arguments in, stdout the reply,
    /// non-zero exit an error): `socklab bus own com.example.Date -- date`.
    Own(tools::OwnArgs),
    /// Emit a signal: `socklab bus emit /net/eth0 net.Link Changed eth0 up`.
    Emit(tools::EmitArgs),
    /// Print signals selected by match rules: `socklab bus listen "interface='net.Link'"`.
    Listen(tools::ListenArgs),
    /// Print every message crossing the bus, like dbus-monitor: `socklab bus monitor`.
    Monitor(tools::ListenArgs),
    /// Add or update a user in a password file (the password is read from the terminal
    /// without echo, or the first line of stdin): `socklab bus passwd bus.passwd alice`.
    Passwd(auth::passwd::PasswdArgs),
}

/// Arguments of `socklab bus serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TCP address (IPv4 or IPv6, port 0 = any) [default: 127.0.0.1:1883 unless --unix].
    #[arg(short, long)]
    pub listen: Option<String>,
    /// Also (or, without --listen, only) listen on this Unix socket path.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Event loops [default: cores].
    #[arg(short, long)]
    pub workers: Option<usize>,
    /// Keep sessions, queued and in-flight messages and retained messages in a database in
    /// this directory; QoS 1/2 is acknowledged only once durable.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Largest packet accepted (a larger declared length closes the connection).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub max_packet: usize,
    /// Messages queued per client beyond those in flight (past it: dropped and counted).
    #[arg(long, default_value_t = 1000)]
    pub max_queued: usize,
    /// Bytes queued per client.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    pub max_queued_bytes: usize,
    /// Bytes of queued and retained messages together (the global memory cap).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub max_memory: usize,
    /// Sessions kept, connected or offline (past it a new client is refused, 0x97).
    #[arg(long, default_value_t = 1_000_000)]
    pub max_sessions: usize,
    /// QoS 1/2 messages in flight to one client.
    #[arg(long, default_value_t = 20)]
    pub max_inflight: u16,
    /// Over this many open connections, new ones are closed at once.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Longest keep-alive accepted (longer or none: the server's keep-alive is imposed).
    #[arg(long)]
    pub max_keep_alive: Option<u16>,
    /// Method calls one connection may have waiting for replies (past it: LimitsExceeded).
    #[arg(long, default_value_t = 1024)]
    pub max_calls: usize,
    /// Method calls all connections together may have waiting for replies.
    #[arg(long, default_value_t = 100_000)]
    pub max_calls_total: usize,
    /// Subscriptions one client may hold (past it, SUBACK says quota exceeded).
    #[arg(long, default_value_t = 10_000)]
    pub max_subscriptions: usize,
    /// How often $SYS/broker/... is published.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub sys_interval: Duration,
    /// Password file (`socklab bus passwd`): CONNECT's user name and password are checked
    /// against it. SIGHUP rereads it.
    #[arg(long, value_name = "FILE")]
    pub passwords: Option<PathBuf>,
    /// ACL file (mosquitto's syntax, plus `own`/`call` rules for bus names): once given,
    /// what it does not grant is refused. SIGHUP rereads it.
    #[arg(long, value_name = "FILE")]
    pub acl: Option<PathBuf>,
    /// Let clients without a user name connect [default: true without --passwords, false
    /// with it].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_anonymous: Option<bool>,
    /// Over the Unix socket, a client that sends no user name is the peer's user
    /// (SO_PEERCRED), by login name.
    #[arg(long)]
    pub unix_peer_user: bool,
    /// Failed logins a source (IP address, IPv6 /64, or uid) may make at once; past them,
    /// one more per --login-interval.
    #[arg(long, default_value_t = 10)]
    pub login_burst: u32,
    /// See --login-burst.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub login_interval: Duration,
    /// Also listen for MQTT over TLS on this address (needs --tls-cert and --tls-key).
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    pub tls_listen: Option<String>,
    /// The TLS listener's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_listen")]
    pub tls_cert: Option<PathBuf>,
    /// The TLS listener's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_listen")]
    pub tls_key: Option<PathBuf>,
    /// Require TLS clients to show a certificate signed by these CAs (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_listen")]
    pub tls_client_ca: Option<PathBuf>,
    /// What a client certificate makes the user name: its common name, its whole subject,
    /// or nothing (the CONNECT's user name and password are checked as usual).
    #[arg(long, value_enum, default_value_t = auth::tls::CertIdentity::Cn)]
    pub tls_identity: auth::tls::CertIdentity,
}

/// The log level `-v` asks for: none in `bus sub`, where `-v` prints topics (as with
/// mosquitto_sub).
pub fn log_verbosity(args: &BusArgs, verbose: u8) -> u8 {
    match args.command {
        BusCommand::Sub(_) => 0,
        _ => verbose,
    }
}

/// Run `socklab bus ...`.
///
/// # Errors
/// User mistakes ([`crate::client::UsageError`], [`crate::net::NetError`]) and failures.
pub fn run(args: &BusArgs, verbose: u8) -> anyhow::Result<()> {
    // The log level was set from -v already (see `log_verbosity`); `bus sub` reads its own.
    let _ = verbose;
    match &args.command {
        BusCommand::Serve(a) => {
            let cfg = server::ServeConfig {
                listen: a.listen.clone(),
                unix: a.unix.clone(),
                workers: a.workers.unwrap_or_else(crate::server::cores),
                data: a.data.clone(),
                max_connections: a.max_connections,
                session: session::SessionConfig {
                    max_packet: a.max_packet,
                    ..Default::default()
                },
                broker: broker::BrokerConfig {
                    max_inflight: a.max_inflight.max(1),
                    max_queued: a.max_queued,
                    max_queued_bytes: a.max_queued_bytes,
                    max_total_bytes: a.max_memory,
                    max_sessions: a.max_sessions,
                    max_packet: a.max_packet.min(u32::MAX as usize) as u32,
                    max_keep_alive: a.max_keep_alive,
                    max_subscriptions: a.max_subscriptions,
                    sys_interval: a.sys_interval,
                    bus: dbus::BusConfig {
                        max_pending: a.max_calls.max(1),
                        max_pending_total: a.max_calls_total.max(1),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                auth: auth::AuthConfig {
                    passwords: a.passwords.clone(),
                    acl: a.acl.clone(),
                    allow_anonymous: a.allow_anonymous,
                    unix_peer_user: a.unix_peer_user,
                    cert_identity: if a.tls_client_ca.is_some() {
                        a.tls_identity
                    } else {
                        auth::tls::CertIdentity::None
                    },
                    limit: auth::ratelimit::LimitConfig {
                        burst: a.login_burst,
                        interval: a.login_interval,
                        ..Default::default()
                    },
                },
                tls_listen: a.tls_listen.clone(),
                tls: match (&a.tls_cert, &a.tls_key) {
                    (Some(c), Some(k)) => {
                        Some(auth::tls::server_config(c, k, a.tls_client_ca.as_deref())?)
                    }
                    _ => None,
                },
            };
            server::run(cfg)
        }
        BusCommand::Pub(a) => client::run_pub(a),
        BusCommand::Sub(a) => client::run_sub(a),
        BusCommand::Bench(a) => bench::run(a),
        BusCommand::Names(a) => tools::run_names(a),
        BusCommand::Call(a) => tools::run_call(a),
        BusCommand::Own(a) => tools::run_own(a),
        BusCommand::Emit(a) => tools::run_emit(a),
        BusCommand::Listen(a) => tools::run_listen(a),
        BusCommand::Monitor(a) => tools::run_monitor(a),
        BusCommand::Passwd(a) => auth::passwd::run(a),
    }
}
