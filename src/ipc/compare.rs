//! `socklab ipc --compare`: every mechanism at every size, round trips and a stream each, in
//! one run on one pinning; a table, `--json`, and an SVG chart ([`super::chart`]).
//!
//! A size a mechanism cannot carry is shown as `n/a (limit)` with the limit in the JSON; a run
//! that fails verification is shown as `FAILED`, the others go on, and the command exits 1.

use super::channel::{Between, LimitError, Setup};
use super::measure::{Mode, Plan, Stop};
use super::mech::Mechanism;
use super::report::{count, us, Machine, Pinning, Report};
use super::{chart, side, IpcArgs};
use anyhow::Context as _;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// One mechanism at one size.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Payload bytes.
    pub size: usize,
    /// `ok`, `limit` or `failed`.
    pub status: &'static str,
    /// Why not `ok`: the limit or the failure, in one line.
    pub reason: Option<String>,
    /// Round trip, median, µs.
    pub rtt_p50_us: Option<f64>,
    /// Round trip, 99th percentile, µs.
    pub rtt_p99_us: Option<f64>,
    /// Stream: payload MB/s.
    pub mb_per_s: Option<f64>,
    /// Stream: messages/s.
    pub msgs_per_s: Option<f64>,
    /// Stream: CPU µs per message, both sides.
    pub cpu_us_per_msg: Option<f64>,
    /// Stream: context switches per message, both sides.
    pub switches_per_msg: Option<f64>,
    /// The two full reports (rtt, stream).
    pub reports: Vec<Report>,
}

/// The whole comparison, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Processes or threads.
    pub between: Between,
    /// Where the sides ran.
    pub pinning: Pinning,
    /// The machine.
    pub machine: Machine,
    /// Seconds measured per run (each cell has an rtt and a stream run).
    pub seconds_per_run: f64,
    /// Warm-up messages per run.
    pub warmup: u64,
    /// The sizes.
    pub sizes: Vec<usize>,
    /// Every mechanism × size.
    pub cells: Vec<Cell>,
}

/// The default sizes: 64 B, 4 KiB, 64 KiB, 1 MiB.
pub const SIZES: [usize; 4] = [64, 4096, 65536, 1 << 20];

/// Run the comparison.
///
/// # Errors
/// A usage error, the chart that cannot be written, or (after the table) verification
/// failures.
pub fn run(args: &IpcArgs) -> anyhow::Result<()> {
    let mut mechanisms = if args.mechanisms.is_empty() {
        Mechanism::available(args.between)
    } else {
        args.mechanisms.clone()
    };
    mechanisms.dedup();
    let sizes = if args.sizes.is_empty() {
        SIZES.to_vec()
    } else {
        args.sizes.clone()
    };
    if let Some(big) = sizes.iter().find(|&&s| s > super::MAX_SIZE) {
        anyhow::bail!(crate::client::UsageError(format!(
            "--sizes: {big} is above the largest payload, {} MiB",
            super::MAX_SIZE >> 20
        )));
    }
    let seconds = args.duration.unwrap_or(if args.quick {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(1)
    });
    let warmup = if args.quick {
        args.warmup.min(100)
    } else {
        args.warmup
    };
    let (pin, cpus) = side::placement(args.pin)?;
    let machine = Machine::here();
    let tty = std::io::stderr().is_terminal();
    let total = mechanisms.len() * sizes.len();
    let started = Instant::now();
    let mut cells = Vec::new();
    for (mi, &mechanism) in mechanisms.iter().enumerate() {
        for (si, &size) in sizes.iter().enumerate() {
            if tty {
                eprint!(
                    "\r\x1b[2K[{}/{total}] {mechanism} {size} B ({:.0} s)",
                    mi * sizes.len() + si + 1,
                    started.elapsed().as_secs_f64()
                );
            }
            cells.push(cell(mechanism, size, args, seconds, warmup, &machine));
        }
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    let comparison = Comparison {
        between: args.between,
        pinning: Pinning {
            mode: pin,
            measurer_cpu: cpus.map(|c| c.0),
            peer_cpu: cpus.map(|c| c.1),
        },
        machine,
        seconds_per_run: seconds.as_secs_f64(),
        warmup,
        sizes,
        cells,
    };
    let svg = chart::render(&comparison)?;
    std::fs::write(&args.chart, svg)
        .with_context(|| format!("writing {}", args.chart.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{}", table(&comparison));
        println!("chart: {}", args.chart.display());
    }
    let failed: Vec<String> = comparison
        .cells
        .iter()
        .filter(|c| c.status == "failed")
        .map(|c| {
            format!(
                "{} {} B: {}",
                c.mechanism,
                c.size,
                c.reason.as_deref().unwrap_or("")
            )
        })
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("{} runs failed: {}", failed.len(), failed.join("; "));
    }
    Ok(())
}

fn cell(
    mechanism: Mechanism,
    size: usize,
    args: &IpcArgs,
    seconds: Duration,
    warmup: u64,
    machine: &Machine,
) -> Cell {
    let mut c = Cell {
        mechanism,
        size,
        status: "ok",
        reason: None,
        rtt_p50_us: None,
        rtt_p99_us: None,
        mb_per_s: None,
        msgs_per_s: None,
        cpu_us_per_msg: None,
        switches_per_msg: None,
        reports: Vec::new(),
    };
    let setup = Setup {
        size,
        between: args.between,
    };
    for mode in [Mode::Rtt, Mode::Stream] {
        // Large messages take long: fewer warm-up messages, so a run stays near its time.
        let warm = if size >= 65536 {
            warmup.min(20)
        } else {
            warmup
        };
        let plan = Plan {
            mode,
            size,
            warmup: warm,
            stop: Stop::Time(seconds),
            window: None,
            fault: None,
        };
        match side::run(mechanism, &setup, &plan, args.pin) {
            Ok(r) => {
                let rep = Report::new(mechanism, args.between, mode, size, warm, &r, machine);
                if let Some(p) = &rep.rtt_us {
                    c.rtt_p50_us = Some(p.p50);
                    c.rtt_p99_us = Some(p.p99);
                }
                if let Some(t) = &rep.throughput {
                    c.mb_per_s = Some(t.mb_per_s);
                    c.msgs_per_s = Some(t.msgs_per_s);
                    c.cpu_us_per_msg = Some(rep.cpu_us_per_msg.total);
                    c.switches_per_msg =
                        Some(rep.switches_per_msg.voluntary + rep.switches_per_msg.involuntary);
                }
                c.reports.push(rep);
            }
            Err(e) => {
                let limit = e.downcast_ref::<LimitError>().is_some();
                c.status = if limit { "limit" } else { "failed" };
                c.reason = Some(format!("{e:#}"));
                return c;
            }
        }
    }
    c
}

/// A size for the table: 64, 4k, 64k, 1M.
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

/// The comparison as a text table.
pub fn table(c: &Comparison) -> String {
    let mut s = String::new();
    let between = match c.between {
        Between::Processes => "between processes",
        Between::Threads => "between threads",
    };
    let _ = writeln!(
        s,
        "socklab ipc --compare: {between}, {}; {:.1} s per run after {} warm-up messages; every message verified",
        c.pinning.describe(),
        c.seconds_per_run,
        c.warmup
    );
    let _ = writeln!(s, "machine: {}", c.machine.line());
    let _ = writeln!(
        s,
        "{:<21} {:>5} {:>10} {:>10} {:>10} {:>9} {:>11} {:>8}",
        "mechanism", "size", "rtt p50", "rtt p99", "MB/s", "msg/s", "CPU µs/msg", "csw/msg"
    );
    for cell in &c.cells {
        let head = format!("{:<21} {:>5}", cell.mechanism.name(), size_label(cell.size));
        match cell.status {
            "limit" => {
                let _ = writeln!(s, "{head} {:>10}", "n/a (limit)");
            }
            "failed" => {
                let _ = writeln!(s, "{head} {:>10}", "FAILED");
            }
            _ => {
                let t = |v: Option<f64>| v.map(|v| format!("{} µs", us(v))).unwrap_or_default();
                let _ = writeln!(
                    s,
                    "{head} {:>10} {:>10} {:>10} {:>9} {:>11} {:>8}",
                    t(cell.rtt_p50_us),
                    t(cell.rtt_p99_us),
                    cell.mb_per_s.map(|v| format!("{v:.1}")).unwrap_or_default(),
                    cell.msgs_per_s.map(count).unwrap_or_default(),
                    cell.cpu_us_per_msg.map(us).unwrap_or_default(),
                    cell.switches_per_msg
                        .map(|v| format!("{v:.2}"))
                        .unwrap_or_default(),
                );
            }
        }
    }
    let limits: Vec<&Cell> = c.cells.iter().filter(|x| x.status == "limit").collect();
    if !limits.is_empty() {
        let _ = writeln!(s, "\nlimits:");
        let mut seen = std::collections::BTreeSet::new();
        for l in limits {
            let reason = l.reason.clone().unwrap_or_default();
            let first = reason.lines().next().unwrap_or("").to_string();
            // One line per mechanism: its first limit explains the larger sizes too.
            if seen.insert(l.mechanism.name()) {
                let _ = writeln!(s, "  {} {}: {first}", l.mechanism, size_label(l.size));
            }
        }
    }
    s
}
