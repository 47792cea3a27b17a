//! `socklab bench`: a load generator, and every server design compared side by side.
//!
//! - `socklab bench ADDR --service echo|reverse|http [...]`: drive one server and report
//!   requests, req/s, MB/s, latency percentiles from an HDR histogram, errors by kind and
//!   reconnects, as a table or `--json`. Every answer is checked ([`proto`]); a run never
//!   counts an answer it did not verify.
//! - `socklab bench --compare [--quick] [--scenario stevens|c10k]`: start every model of
//!   `socklab serve` on loopback, drive each with the same load at several concurrency
//!   levels, and report req/s, p50/p99, the server's CPU seconds and peak memory, with an
//!   SVG chart ([`compare`], [`chart`]).
//!
//! Layout: [`proto`] (requests and answer checks, sans-IO), [`gen`] (the epoll client
//! loops), [`report`] (table and JSON), [`compare`] (servers, levels, CPU and memory),
//! [`chart`] (the SVG).

pub mod chart;
pub mod compare;
pub mod gen;
pub mod proto;
pub mod report;

use crate::client::UsageError;
use crate::model::ModelKind;
use crate::units::{parse_duration, parse_size};
use anyhow::Context as _;
use gen::{LoadSpec, Stop};
use proto::BenchService;
use socket2::SockAddr;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `socklab bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The server's HOST:PORT (not with --unix or --compare).
    pub addr: Option<String>,
    /// The protocol to drive.
    #[arg(long, value_enum, default_value_t = BenchService::Reverse)]
    pub service: BenchService,
    /// Active connections.
    #[arg(short, long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run.
    #[arg(short, long, value_parser = parse_duration, default_value = "10s", conflicts_with = "requests")]
    pub duration: Duration,
    /// Stop after exactly this many requests instead of after a duration.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Payload bytes of each echo/reverse request (the answer has as many).
    #[arg(short, long, value_parser = parse_size, default_value = "64")]
    pub size: usize,
    /// HTTP: the path to GET (keep-alive).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Generator threads [default: cores].
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Connect to a Unix socket at this path.
    #[arg(long)]
    pub unix: Option<PathBuf>,
    /// Open a new connection for every request, closed by the client after the answer.
    #[arg(long)]
    pub connect_per_request: bool,
    /// Hold this many extra idle connections open during the run.
    #[arg(long, default_value_t = 0)]
    pub idle: usize,
    /// Open loop: this many requests per second in total, latency counted from when each
    /// request was due (coordinated-omission correction). Default: closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// A connect or request taking longer fails as a timeout.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,
    /// Print JSON (one object) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Compare every server design: start each on loopback and drive it at several levels.
    #[arg(long)]
    pub compare: bool,
    /// With --compare: a short run (under 2 minutes).
    #[arg(long, requires = "compare")]
    pub quick: bool,
    /// With --compare: `levels` (default), `stevens` (a connection per request, 4,000-byte
    /// answers), or `c10k` (16 active connections beside 0, 1k, 5k idle ones).
    #[arg(long, value_enum, default_value_t = compare::Scenario::Levels, requires = "compare")]
    pub scenario: compare::Scenario,
    /// With --compare: the models, comma-separated [default: all].
    #[arg(long, value_delimiter = ',', requires = "compare")]
    pub models: Vec<ModelKind>,
    /// With --compare: the connection counts, comma-separated [default: 1,16,128,1024].
    #[arg(long, value_delimiter = ',', requires = "compare")]
    pub levels: Vec<usize>,
    /// With --compare: `--workers` for the servers [default: each model's].
    #[arg(long, requires = "compare")]
    pub workers: Option<usize>,
    /// With --compare: where to write the SVG chart.
    #[arg(long, default_value = "socklab-bench.svg", requires = "compare")]
    pub chart: PathBuf,
    /// With --compare --service http: the directory the servers serve.
    #[arg(long, requires = "compare")]
    pub root: Option<PathBuf>,
}

/// Run `socklab bench`.
///
/// # Errors
/// User mistakes ([`UsageError`], exit 2) or failures of the generator or servers.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    if args.compare {
        if args.addr.is_some() || args.unix.is_some() {
            return Err(UsageError(
                "--compare starts its own servers: give no ADDR or --unix".into(),
            )
            .into());
        }
        return compare::run(args);
    }
    let (target, host, shown) = match (&args.addr, &args.unix) {
        (Some(a), None) => {
            let addrs = crate::net::resolve(a)?;
            (SockAddr::from(addrs[0]), a.clone(), a.clone())
        }
        (None, Some(p)) => (
            SockAddr::unix(p)?,
            "localhost".to_string(),
            p.display().to_string(),
        ),
        (Some(_), Some(_)) => {
            return Err(UsageError("give either ADDR or --unix PATH, not both".into()).into())
        }
        (None, None) => {
            return Err(UsageError(
                "missing the server's address (HOST:PORT or --unix PATH), or --compare".into(),
            )
            .into())
        }
    };
    if args.connections == 0 {
        return Err(UsageError("--connections must be at least 1".into()).into());
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(
            UsageError("--rate must be a positive number of requests per second".into()).into(),
        );
    }
    if args.service == BenchService::Reverse && args.size > u32::MAX as usize {
        return Err(UsageError("--size is at most 4 GiB - 1 for reverse".into()).into());
    }
    let spec = LoadSpec {
        target,
        host,
        service: args.service,
        connections: args.connections,
        threads: args.threads.unwrap_or_else(crate::server::cores).max(1),
        size: args.size,
        path: args.path.clone(),
        stop: args
            .requests
            .map_or(Stop::After(args.duration), Stop::Requests),
        rate: args.rate,
        connect_per_request: args.connect_per_request,
        idle: args.idle,
        timeout: args.timeout,
    };
    let live = gen::Live::default();
    let outcome = std::thread::scope(|scope| {
        if std::io::stderr().is_terminal() && !args.json {
            scope.spawn(|| report::progress(&live));
        }
        gen::run(&spec, &live)
    })
    .context("load generator")?;
    let report = report::Report::new(&spec, &shown, &outcome);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Raise the soft limit on open descriptors to the hard limit: 10,000 connections need it.
pub fn raise_fd_limit() {
    let _ = crate::sys::raise_fd_limit();
}
