//! `socklab bench --compare`: every server design under the same load, side by side.
//!
//! For each model a `socklab serve` process is started on `127.0.0.1:0` (process-based
//! models bring their own children), then driven at each concurrency level in turn. For
//! each model × level: verified req/s, p50/p99 latency, errors, the CPU seconds the server's
//! whole process tree used during that level (user + system from `/proc/PID/stat`, reaped
//! children included), and its peak resident memory (the tree's `VmRSS` sampled every
//! 50 ms).
//!
//! The servers never outlive the comparison: each runs in a process group of its own (so
//! its forked workers can be stopped with it) and gets SIGKILL from the kernel when the
//! comparison dies, however that happens (`PR_SET_PDEATHSIG`); SIGINT/SIGTERM end the run
//! with the table of the points measured so far; an error drops the server, which stops it.
//! The chart's path is checked before the first server starts, and the table is printed
//! before any file is written.

use crate::bench::gen::{self, Ended, LoadSpec, Stop};
use crate::bench::proto::BenchService;
use crate::bench::{chart, BenchArgs};
use crate::cli::Exit;
use crate::client::UsageError;
use crate::model::ModelKind;
use crate::signals::Signals;
use anyhow::{bail, Context as _};
use socket2::SockAddr;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the columns of the comparison table mean (printed under it, and in `--help`).
pub const TABLE_KEY: &str = "\
Key to the --compare table:
  conns    active connections, each sending its next request when the answer is in
  idle     extra connections held open without traffic beside them (c10k)
  req/s    verified answers per second; p50, p99: their latency percentiles
  errors   failed requests (refused, reset, timeout, short, wrong, bad status)
  starved  active connections that got no answer at all: the design serves fewer clients
           at once (iterative; prefork or pool with fewer workers); its latency covers
           only the clients it served
  cpu s    the server's CPU seconds (user + system, all its processes) during the point
  ms/kreq  server CPU milliseconds per 1,000 verified requests
  rss MiB  the server's peak resident memory (all its processes)";

/// Which comparison to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Persistent connections at several concurrency levels.
    Levels,
    /// Stevens' UNP ch. 30 setup: a connection per request, 4,000-byte answers.
    Stevens,
    /// 16 active connections beside 0, 1,000 and 5,000 idle ones: select, poll, epoll,
    /// reactors and uring.
    C10k,
}

/// One model at one level.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    /// The server design.
    pub model: String,
    /// Active connections.
    pub connections: usize,
    /// Idle connections held open beside them.
    pub idle: usize,
    /// Verified requests per second.
    pub req_per_s: f64,
    /// Median latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile latency, microseconds.
    pub p99_us: u64,
    /// Failed requests (all kinds).
    pub errors: u64,
    /// Active connections that got no answer at all (the design served fewer at once).
    pub starved: u64,
    /// Server CPU seconds (user + system, all its processes) during this level.
    pub cpu_s: f64,
    /// Server CPU seconds per 1,000 verified requests.
    pub cpu_ms_per_kreq: f64,
    /// Peak resident memory of the server's processes, MiB.
    pub rss_mib: f64,
}

/// The whole comparison, as `--json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// Which scenario.
    pub scenario: Scenario,
    /// The protocol.
    pub service: BenchService,
    /// Payload bytes per request (echo, reverse).
    pub size: usize,
    /// The path fetched (http).
    pub path: String,
    /// Seconds per point.
    pub seconds_per_point: f64,
    /// Whether each request had its own connection.
    pub connect_per_request: bool,
    /// Generator threads.
    pub threads: usize,
    /// Cores on this machine (the generator and the servers share them).
    pub cores: usize,
    /// Every model × level.
    pub points: Vec<Point>,
}

impl Scenario {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Levels => "levels",
            Scenario::Stevens => "stevens",
            Scenario::C10k => "c10k",
        }
    }
}

/// The chart's file, opened (and created if missing) before the comparison starts, so a
/// path that cannot be written is refused at once. A file it created is removed again if
/// nothing is written to it.
struct ChartFile {
    path: PathBuf,
    file: Option<File>,
    created: bool,
}

impl ChartFile {
    fn open(path: &Path) -> Result<ChartFile, UsageError> {
        let existed = path.exists();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| {
                UsageError(format!("cannot write the chart to {}: {e}", path.display()))
            })?;
        Ok(ChartFile {
            path: path.to_path_buf(),
            file: Some(file),
            created: !existed,
        })
    }

    fn write(mut self, svg: &str) -> anyhow::Result<()> {
        let mut f = self.file.take().expect("written once");
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(svg.as_bytes())
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for ChartFile {
    fn drop(&mut self) {
        if self.file.take().is_some() && self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Run the comparison described by `args`; SIGINT/SIGTERM (through `signals`) end it with
/// the points measured so far.
///
/// # Errors
/// A mistake in the arguments ([`UsageError`]), a server that cannot start, a generator
/// failure, or [`Exit`] 130/143 when interrupted.
pub fn run(args: &BenchArgs, signals: &Signals) -> anyhow::Result<()> {
    let scenario = args.scenario;
    let mut models = if args.models.is_empty() {
        match scenario {
            Scenario::C10k => vec![
                ModelKind::Select,
                ModelKind::Poll,
                ModelKind::Epoll,
                ModelKind::Reactors,
                ModelKind::Uring,
            ],
            _ => ModelKind::ALL.to_vec(),
        }
    } else {
        args.models.clone()
    };
    models.dedup();
    let (service, size, cpr) = match scenario {
        Scenario::Stevens => (BenchService::Reverse, 4000, true),
        _ => (args.service, args.size, args.connect_per_request),
    };
    // (active connections, idle connections) per point.
    let levels: Vec<(usize, usize)> = match scenario {
        Scenario::C10k => {
            let idle = if args.levels.is_empty() {
                if args.quick {
                    vec![0, 1000]
                } else {
                    vec![0, 1000, 5000]
                }
            } else {
                args.levels.clone()
            };
            idle.into_iter().map(|i| (16, i)).collect()
        }
        _ => {
            let l = if !args.levels.is_empty() {
                args.levels.clone()
            } else if args.quick {
                vec![1, 16, 128]
            } else {
                vec![1, 16, 128, 1024]
            };
            l.into_iter().map(|c| (c, 0)).collect()
        }
    };
    if levels.iter().any(|l| l.0 == 0) {
        bail!(UsageError(
            "--levels must be at least 1 connection each".into()
        ));
    }
    let seconds = if args.quick {
        Duration::from_secs(1)
    } else {
        args.duration.min(Duration::from_secs(60))
    };
    let threads = args.threads.unwrap_or_else(crate::server::cores).max(1);
    if service == BenchService::Http && args.root.is_none() {
        bail!(UsageError(
            "--compare --service http needs --root DIR for the servers".into()
        ));
    }
    let sockets = levels.iter().map(|l| l.0 + l.1).max().unwrap_or(0);
    let what = match scenario {
        Scenario::C10k => "--scenario c10k",
        _ => "this comparison",
    };
    crate::bench::check_fd_limit(sockets, what, "--levels with fewer connections")?;
    let chart_path = args
        .chart
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("socklab-bench-{}.svg", scenario.name())));
    let chart_file = ChartFile::open(&chart_path)?;
    let tty = std::io::stderr().is_terminal();
    let mut points = Vec::new();
    let mut interrupted = None;
    'models: for (mi, &model) in models.iter().enumerate() {
        if crate::signals::stop_requested() {
            interrupted = Some((model, 0, 0));
            break;
        }
        let server = Server::start(model, service, args)?;
        for &(conns, idle) in &levels {
            if tty {
                eprint!(
                    "\r[{}/{}] {model:<9} {conns:>5} connections {idle:>5} idle ...   ",
                    mi + 1,
                    models.len()
                );
            }
            let spec = LoadSpec {
                target: server.addr.clone(),
                host: "127.0.0.1".into(),
                service,
                connections: conns,
                threads,
                size,
                path: args.path.clone(),
                stop: Stop::After(seconds),
                rate: None,
                connect_per_request: cpr,
                idle,
                // Designs with a fixed number of workers cannot serve more clients at once:
                // the rest time out (and show up as errors) rather than stall the run.
                timeout: args.timeout.min(Duration::from_secs(2)),
                interval: None,
                give_up: false,
            };
            let cpu0 = server.cpu_seconds();
            let peak = AtomicU64::new(0);
            let stop = AtomicBool::new(false);
            let outcome = std::thread::scope(|scope| {
                scope.spawn(|| {
                    while !stop.load(Ordering::SeqCst) {
                        peak.fetch_max(server.rss_kib(), Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
                let control = gen::Control {
                    stop_fd: Some(signals.fd()),
                    on_interval: None,
                };
                let r = gen::run(&spec, &gen::Live::default(), control);
                stop.store(true, Ordering::SeqCst);
                r
            })
            .with_context(|| format!("driving the {model} server"))?;
            if outcome.ended == Ended::Interrupted {
                // A point cut short is not comparable with the others: leave it out.
                interrupted = Some((model, conns, idle));
                break 'models;
            }
            let cpu = server.cpu_seconds() - cpu0;
            let secs = outcome.elapsed.as_secs_f64().max(1e-9);
            let h = &outcome.latency;
            let q = |p| {
                if h.is_empty() {
                    0
                } else {
                    h.value_at_quantile(p)
                }
            };
            points.push(Point {
                model: model.name().to_string(),
                connections: conns,
                idle,
                req_per_s: outcome.ok as f64 / secs,
                p50_us: q(0.5),
                p99_us: q(0.99),
                errors: outcome.errors.total(),
                starved: outcome.starved,
                cpu_s: cpu,
                cpu_ms_per_kreq: if outcome.ok > 0 {
                    cpu * 1e6 / outcome.ok as f64
                } else {
                    0.0
                },
                rss_mib: peak.load(Ordering::SeqCst) as f64 / 1024.0,
            });
        }
        server.stop();
    }
    if tty {
        eprint!("\r{:70}\r", "");
    }
    let comparison = Comparison {
        scenario,
        service,
        size,
        path: args.path.clone(),
        seconds_per_point: seconds.as_secs_f64(),
        connect_per_request: cpr,
        threads,
        cores: crate::server::cores(),
        points,
    };
    // The table first: nothing that goes wrong with files can lose it.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{}", table(&comparison));
        println!("{TABLE_KEY}");
    }
    let _ = std::io::stdout().flush();
    if !comparison.points.is_empty() {
        chart_file.write(&chart::render(&comparison)?)?;
        if !args.json {
            println!("chart: {}", chart_path.display());
        }
    }
    if let Some((model, conns, idle)) = interrupted {
        let (code, name) = match crate::bench::received_signal(signals) {
            Some(libc::SIGTERM) => (143, "SIGTERM"),
            _ => (130, "SIGINT"),
        };
        return Err(Exit {
            code,
            message: format!(
                "interrupted by {name} at {model}, {conns} {}, {idle} idle: the table has the \
                 {} {} measured before",
                crate::bench::report::plural(conns as u64, "connection", "connections"),
                comparison.points.len(),
                crate::bench::report::plural(comparison.points.len() as u64, "point", "points"),
            ),
        }
        .into());
    }
    Ok(())
}

/// The comparison as a text table.
pub fn table(c: &Comparison) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let payload = if c.service == BenchService::Http {
        format!("GET {}", c.path)
    } else {
        format!("{} B", c.size)
    };
    let what = match c.scenario {
        Scenario::Levels => format!("{} {payload}", c.service),
        Scenario::Stevens => format!("{} {} B, a connection per request", c.service, c.size),
        Scenario::C10k => format!(
            "{} {} B, 16 active connections beside idle ones",
            c.service, c.size
        ),
    };
    let _ = writeln!(
        s,
        "{what}; {:.0} s per point; generator: {} threads; {} cores shared by generator and server",
        c.seconds_per_point, c.threads, c.cores
    );
    let _ = writeln!(
        s,
        "{:<10} {:>6} {:>6} {:>11} {:>10} {:>10} {:>7} {:>8} {:>8} {:>9} {:>8}",
        "model",
        "conns",
        "idle",
        "req/s",
        "p50",
        "p99",
        "errors",
        "starved",
        "cpu s",
        "ms/kreq",
        "rss MiB"
    );
    for p in &c.points {
        let _ = writeln!(
            s,
            "{:<10} {:>6} {:>6} {:>11.0} {:>10} {:>10} {:>7} {:>8} {:>8.2} {:>9.3} {:>8.1}",
            p.model,
            p.connections,
            p.idle,
            p.req_per_s,
            crate::bench::report::us(p.p50_us),
            crate::bench::report::us(p.p99_us),
            p.errors,
            p.starved,
            p.cpu_s,
            p.cpu_ms_per_kreq,
            p.rss_mib
        );
    }
    s
}

/// A `socklab serve` child process under test, leader of its own process group; dropping
/// it stops the whole group.
struct Server {
    child: Child,
    addr: SockAddr,
    stopped: bool,
}

impl Server {
    fn start(model: ModelKind, service: BenchService, args: &BenchArgs) -> anyhow::Result<Server> {
        let exe = std::env::current_exe().context("finding the socklab executable")?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", &service.to_string(), "--model", model.name()])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--grace",
                "1s",
                "--backlog",
                "4096",
            ]);
        if let Some(w) = args.workers {
            cmd.args(["--workers", &w.to_string()]);
        }
        if let Some(root) = &args.root {
            cmd.arg("--root").arg(root);
        }
        // A group of its own: the terminal's Ctrl-C reaches only the comparison, which
        // stops the servers itself, and a stop reaches forked workers too.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        crate::sys::kill_with_parent(&mut cmd, nix::sys::signal::Signal::SIGKILL);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting socklab serve")?;
        let mut server = Server {
            child,
            addr: SockAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            stopped: false,
        };
        let mut line = String::new();
        BufReader::new(server.child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .context("reading the server's address")?;
        let addr: std::net::SocketAddr = line
            .trim()
            .parse()
            .with_context(|| format!("the {model} server did not start (said {line:?})"))?;
        server.addr = addr.into();
        Ok(server)
    }

    /// The server and all its descendants.
    fn tree(&self) -> Vec<u32> {
        let root = self.child.id();
        let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if let Some(f) = stat_fields(pid) {
                    if let Some(ppid) = f.get(1).and_then(|p| p.parse::<u32>().ok()) {
                        parents.entry(ppid).or_default().push(pid);
                    }
                }
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            if let Some(kids) = parents.get(&out[i]) {
                out.extend(kids);
            }
            i += 1;
        }
        out
    }

    /// CPU seconds used so far by the tree (reaped children included through the parents'
    /// `cutime`/`cstime`).
    fn cpu_seconds(&self) -> f64 {
        let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        self.tree()
            .into_iter()
            .filter_map(stat_fields)
            .map(|f| {
                (11..15)
                    .filter_map(|i| f.get(i)?.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .sum::<u64>() as f64
            / tck
    }

    /// Resident memory of the tree, KiB.
    fn rss_kib(&self) -> u64 {
        self.tree()
            .into_iter()
            .filter_map(|p| {
                let s = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .sum()
    }

    fn stop(mut self) {
        self.terminate();
    }

    /// SIGTERM to the group, up to 5 s for the server to finish (its grace is 1 s), then
    /// SIGKILL to whatever is left of the group -- sent while the exited leader is not yet
    /// reaped, so its process-group id cannot have been reused -- and reap it.
    fn terminate(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        while Instant::now() < deadline {
            match waitid(Id::Pid(pid), flags) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(20)),
                _ => break,
            }
        }
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The fields of `/proc/PID/stat` after the command name: state, ppid, ... (utime is index
/// 11, stime 12, cutime 13, cstime 14).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}
