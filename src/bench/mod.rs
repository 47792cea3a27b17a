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

use crate::cli::Exit;
use crate::client::UsageError;
use crate::model::ModelKind;
use crate::signals::Signals;
use crate::units::{parse_duration, parse_size};
use anyhow::Context as _;
use gen::{Ended, LoadSpec, Outcome, Stop};
use proto::BenchService;
use socket2::SockAddr;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::Duration;

/// The exit statuses of `socklab bench`, as `--help` and `docs/bench.md` show them.
pub const EXIT_CODES: &str = "\
Exit status:
  0    every request was verified (no error, no starved connection)
  1    socklab itself failed (e.g. a server of --compare did not start)
  2    a usage mistake (bad option, unresolvable address, descriptor limit too low)
  3    the run finished, but some requests failed or some connections got no answer
  4    no answer was verified (a run stops early once as many requests failed as there
       are connections and none passed: nothing listening, every answer an error)
  130  interrupted by SIGINT (143: SIGTERM); the summary of what ran is printed first
With --compare: 0 once every point is measured (errors in a point are part of the result).";

/// Arguments of `socklab bench`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = EXIT_CODES, after_long_help = format!("{}\n\n{EXIT_CODES}", compare::TABLE_KEY))]
pub struct BenchArgs {
    /// The server's HOST:PORT (not with --unix or --compare).
    pub addr: Option<String>,
    /// The protocol to drive.
    #[arg(long, value_enum, default_value_t = BenchService::Reverse)]
    pub service: BenchService,
    /// Active connections.
    #[arg(short, long, default_value_t = 64)]
    pub connections: usize,
    /// How long to run (more than 0).
    #[arg(short, long, value_parser = parse_duration, default_value = "10s", conflicts_with = "requests")]
    pub duration: Duration,
    /// Stop after exactly this many requests (at least 1) instead of after a duration.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,
    /// Payload bytes of each echo/reverse request (the answer has as many). Reverse accepts
    /// 0 (the 4-byte header alone, an empty answer); echo needs at least 1.
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
    /// Print a line per interval of this length (req/s, p99, errors), as iperf3 does; with
    /// --json the series is the `intervals` field.
    #[arg(short, long, value_parser = parse_duration, conflicts_with = "compare")]
    pub interval: Option<Duration>,
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
    /// With --compare: the connection counts (c10k: the idle counts), comma-separated
    /// [default: 1,16,128,1024; c10k: 0,1000,5000].
    #[arg(long, value_delimiter = ',', requires = "compare")]
    pub levels: Vec<usize>,
    /// With --compare: `--workers` for the servers [default: each model's].
    #[arg(long, requires = "compare")]
    pub workers: Option<usize>,
    /// With --compare: where to write the SVG chart [default: socklab-bench-SCENARIO.svg].
    #[arg(long, requires = "compare")]
    pub chart: Option<PathBuf>,
    /// With --compare --service http: the directory the servers serve.
    #[arg(long, requires = "compare")]
    pub root: Option<PathBuf>,
}

/// Check what every run needs, before anything starts.
fn validate(args: &BenchArgs) -> Result<(), UsageError> {
    let fail = |m: &str| Err(UsageError(m.into()));
    if args.connections == 0 {
        return fail("--connections must be at least 1");
    }
    if args.duration.is_zero() && args.requests.is_none() {
        return fail("--duration must be more than 0 (e.g. -d 10s)");
    }
    if args.requests == Some(0) {
        return fail("--requests must be at least 1");
    }
    if args.interval.is_some_and(|i| i < Duration::from_millis(10)) {
        return fail("--interval must be at least 10ms");
    }
    if args.threads == Some(0) {
        return fail("--threads must be at least 1");
    }
    if args.timeout.is_zero() {
        return fail("--timeout must be more than 0");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return fail("--rate must be a positive number of requests per second");
    }
    if args.service == BenchService::Reverse && args.size > u32::MAX as usize {
        return fail("--size is at most 4 GiB - 1 for reverse");
    }
    if args.service == BenchService::Echo
        && args.size == 0
        && args.scenario != compare::Scenario::Stevens
    {
        return fail(
            "echo has no framing: a 0-byte echo request sends nothing and gets nothing back, \
             so there is nothing to time; use -s 1 or more (reverse -s 0 sends its 4-byte header)",
        );
    }
    Ok(())
}

/// Run `socklab bench`.
///
/// # Errors
/// User mistakes ([`UsageError`], exit 2), failures of the generator or servers (exit 1), and
/// runs whose requests did not all pass ([`Exit`]: 3, 4, or 130/143 when interrupted).
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    validate(args)?;
    raise_fd_limit();
    let signals = Signals::install().context("installing signal handlers")?;
    // Only SIGINT and SIGTERM may wake the self-pipe here: it is the generator's stop signal,
    // and the servers of --compare exiting must not look like one.
    crate::sys::set_handler(
        nix::sys::signal::Signal::SIGCHLD,
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
    )
    .context("installing signal handlers")?;
    if args.compare {
        if args.addr.is_some() || args.unix.is_some() {
            return Err(UsageError(
                "--compare starts its own servers: give no ADDR or --unix".into(),
            )
            .into());
        }
        return compare::run(args, &signals);
    }
    let (target, host, shown) = match (&args.addr, &args.unix) {
        (Some(a), None) => {
            let addrs = crate::net::resolve(a)?;
            (SockAddr::from(addrs[0]), a.clone(), a.clone())
        }
        (None, Some(p)) => (
            SockAddr::unix(p)
                .map_err(|e| UsageError(format!("bad Unix socket path {}: {e}", p.display())))?,
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
    check_fd_limit(args.connections + args.idle, "this run", "fewer -c/--idle")?;
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
        interval: args.interval,
        give_up: true,
    };
    let live = gen::Live::default();
    let lines = args.interval.is_some() && !args.json;
    if lines {
        println!("{}", report::interval_header());
    }
    let print_line = |i: &gen::Interval| {
        if lines {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", report::interval_line(i));
            let _ = out.flush();
        }
    };
    let control = gen::Control {
        stop_fd: Some(signals.fd()),
        on_interval: Some(&print_line),
    };
    let outcome = std::thread::scope(|scope| {
        if std::io::stderr().is_terminal() && !args.json && args.interval.is_none() {
            scope.spawn(|| report::progress(&live));
        }
        gen::run(&spec, &live, control)
    })
    .context("load generator")?;
    let report = report::Report::new(&spec, &shown, &outcome);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    verdict(&outcome, &shown, &signals)
}

/// The exit status of a finished run (see [`EXIT_CODES`]).
fn verdict(o: &Outcome, target: &str, signals: &Signals) -> anyhow::Result<()> {
    let failed = o.errors.total();
    if o.ended == Ended::Interrupted {
        let (code, name) = match received_signal(signals) {
            Some(libc::SIGTERM) => (143, "SIGTERM"),
            _ => (130, "SIGINT"),
        };
        return Err(Exit {
            code,
            message: format!(
                "interrupted by {name} after {:.2} s: the summary covers the run until then",
                o.elapsed.as_secs_f64()
            ),
        }
        .into());
    }
    if o.ok == 0 {
        let why = if failed > 0 && o.errors.refused == failed {
            format!("nothing is listening at {target}: every connection was refused")
        } else if failed > 0 {
            format!(
                "all {failed} requests failed ({})",
                report::error_kinds(&o.errors)
            )
        } else {
            format!("no answer arrived within {:.2} s", o.elapsed.as_secs_f64())
        };
        let early = if o.ended == Ended::GaveUp {
            ", stopped early"
        } else {
            ""
        };
        return Err(Exit {
            code: 4,
            message: format!("error: no answer was verified{early}: {why}"),
        }
        .into());
    }
    if failed > 0 || o.starved > 0 {
        let mut what = Vec::new();
        if failed > 0 {
            what.push(format!(
                "{failed} of {} requests failed ({})",
                o.ok + failed,
                report::error_kinds(&o.errors)
            ));
        }
        if o.starved > 0 {
            what.push(format!(
                "{} {} got no answer at all",
                o.starved,
                report::plural(o.starved, "connection", "connections")
            ));
        }
        return Err(Exit {
            code: 3,
            message: format!("error: {}", what.join("; ")),
        }
        .into());
    }
    Ok(())
}

/// Which signal woke the self-pipe (its handler writes the signal number), if any.
pub fn received_signal(signals: &Signals) -> Option<i32> {
    let mut b = [0u8; 16];
    let n = nix::unistd::read(signals.fd(), &mut b).ok()?;
    b[..n]
        .iter()
        .map(|&s| i32::from(s))
        .find(|&s| s == libc::SIGINT || s == libc::SIGTERM)
}

/// Raise the soft limit on open descriptors to the hard limit: 10,000 connections need it.
pub fn raise_fd_limit() {
    let _ = crate::sys::raise_fd_limit();
}

/// Descriptors a process needs besides its connections (epoll, pipes, logs, listeners).
const FD_MARGIN: usize = 64;

/// Refuse up front a run whose `sockets` connections cannot fit under the descriptor limit
/// (call after [`raise_fd_limit`]): it would otherwise fail midway with `EMFILE`. `what`
/// names the run, `fewer` how to ask for less.
///
/// # Errors
/// [`UsageError`] naming what is needed and the limit.
pub fn check_fd_limit(sockets: usize, what: &str, fewer: &str) -> Result<(), UsageError> {
    use nix::sys::resource::{getrlimit, Resource};
    let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let need = sockets.saturating_add(FD_MARGIN);
    if (need as u64) > soft {
        return Err(UsageError(format!(
            "{what} needs about {need} descriptors per process ({sockets} sockets + {FD_MARGIN}), \
             but the limit is {soft}: raise the hard limit (ulimit -Hn, as root) or ask for {fewer}"
        )));
    }
    Ok(())
}
