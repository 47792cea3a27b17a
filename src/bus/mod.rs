//! `socklab bus`: the course's software bus as an MQTT 3.1.1 / 5.0 broker, its clients and
//! its load generator.
//!
//! | file | part |
//! | --- | --- |
//! | [`codec`] | framing, the `mqtt-proto` crate's decoders, 3.1.1 ↔ 5.0 mapping, PUBLISH encoding |
//! | [`topic`] | the subscription trie (`+`, `#`, `$` topics, `$share/GROUP/FILTER`) |
//! | [`session`] | one connection's protocol state, sans-IO: bytes in, packets out |
//! | [`broker`] | the routing core, sans-IO: sessions, retained messages, wills, `$SYS` |
//! | [`store`] | persistence behind the core (redb), group-committed |
//! | [`server`] | `bus serve`: the epoll reactors driving the core |
//! | [`client`] | a blocking client, `bus pub` and `bus sub` |
//! | [`bench`](mod@bench) | `bus bench`: verified load against any broker |
//!
//! See `docs/bus.md` for the protocol notes and the design.

pub mod bench;
pub mod broker;
pub mod client;
pub mod codec;
pub mod server;
pub mod session;
pub mod store;
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
    /// Bytes queued for all clients together (the global memory cap of queues).
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    pub max_memory: usize,
    /// QoS 1/2 messages in flight to one client.
    #[arg(long, default_value_t = 20)]
    pub max_inflight: u16,
    /// Over this many open connections, new ones are closed at once.
    #[arg(long, default_value_t = 100_000)]
    pub max_connections: usize,
    /// Longest keep-alive accepted (longer or none: the server's keep-alive is imposed).
    #[arg(long)]
    pub max_keep_alive: Option<u16>,
    /// How often $SYS/broker/... is published.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub sys_interval: Duration,
}

/// Run `socklab bus ...`.
///
/// # Errors
/// User mistakes ([`crate::client::UsageError`], [`crate::net::NetError`]) and failures.
pub fn run(args: &BusArgs, verbose: u8) -> anyhow::Result<()> {
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
                    max_packet: a.max_packet.min(u32::MAX as usize) as u32,
                    max_keep_alive: a.max_keep_alive,
                    sys_interval: a.sys_interval,
                    ..Default::default()
                },
            };
            server::run(cfg)
        }
        BusCommand::Pub(a) => client::run_pub(a),
        BusCommand::Sub(a) => client::run_sub(a, verbose > 0),
        BusCommand::Bench(a) => bench::run(a),
    }
}
