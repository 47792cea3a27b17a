//! The results of a run: the human table, the JSON object (field names are part of the
//! interface, documented in `docs/bench.md`), and the progress line.

use crate::bench::gen::{Ended, Errors, Interval, LoadSpec, Outcome, Stop};
use crate::bench::proto::BenchService;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// One run's report. Serialized as the `--json` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// The server's address or Unix path.
    pub target: String,
    /// The protocol.
    pub service: BenchService,
    /// Active connections.
    pub connections: usize,
    /// Idle connections requested with `--idle`.
    pub idle: usize,
    /// Idle connections actually established.
    pub idle_established: u64,
    /// Generator threads.
    pub threads: usize,
    /// Payload bytes per echo/reverse request.
    pub size: usize,
    /// `closed` or `open` (with `--rate`).
    pub mode: &'static str,
    /// The requested total rate (open loop), else null.
    pub rate: Option<f64>,
    /// Whether each request had its own connection.
    pub connect_per_request: bool,
    /// Seconds from the start line to the end.
    pub duration_s: f64,
    /// Requests answered and verified.
    pub requests: u64,
    /// `requests` per second.
    pub req_per_s: f64,
    /// Answer bytes per second, in MB (10^6 bytes).
    pub mb_per_s: f64,
    /// Latency of verified answers, microseconds.
    pub latency_us: Latency,
    /// Failures by kind.
    pub errors: Errors,
    /// All failures.
    pub errors_total: u64,
    /// Connections opened again after the first (after errors, or per request).
    pub reconnects: u64,
    /// Active connections that got no answer at all during the run.
    pub starved: u64,
    /// Why the run ended: `completed`, `gave_up` (stopped early: as many failures as
    /// connections and nothing verified) or `interrupted` (SIGINT/SIGTERM).
    pub ended: Ended,
    /// The `--interval` series (empty without `--interval`).
    pub intervals: Vec<Interval>,
}

impl Report {
    /// Build the report of `outcome` for `spec`, naming the target as `shown`.
    pub fn new(spec: &LoadSpec, shown: &str, outcome: &Outcome) -> Report {
        let secs = outcome.elapsed.as_secs_f64().max(1e-9);
        let h = &outcome.latency;
        let latency = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: h.value_at_quantile(0.50),
                p90: h.value_at_quantile(0.90),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                max: h.max(),
                mean: h.mean(),
            }
        };
        Report {
            target: shown.to_string(),
            service: spec.service,
            connections: spec.connections,
            idle: spec.idle,
            idle_established: outcome.idle_established,
            threads: spec.threads.clamp(1, spec.connections.max(1)),
            size: spec.size,
            mode: if spec.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            rate: spec.rate,
            connect_per_request: spec.connect_per_request,
            duration_s: secs,
            requests: outcome.ok,
            req_per_s: outcome.ok as f64 / secs,
            mb_per_s: outcome.bytes as f64 / secs / 1e6,
            latency_us: latency,
            errors: outcome.errors,
            errors_total: outcome.errors.total(),
            reconnects: outcome.reconnects,
            starved: outcome.starved,
            ended: outcome.ended,
            intervals: outcome.intervals.clone(),
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let size = if self.service == BenchService::Http {
            String::new()
        } else {
            format!(", {} B", self.size)
        };
        let mode = match self.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(
            s,
            "target      {} ({}{size}, {} {}{}, {} {}, {mode}{})",
            self.target,
            self.service,
            self.connections,
            plural(self.connections as u64, "connection", "connections"),
            if self.idle > 0 {
                format!(" + {} idle", self.idle_established)
            } else {
                String::new()
            },
            self.threads,
            plural(self.threads as u64, "thread", "threads"),
            if self.connect_per_request {
                ", a connection per request"
            } else {
                ""
            },
        );
        let _ = writeln!(
            s,
            "requests    {} verified in {:.2} s: {:.0} req/s, {:.2} MB/s",
            self.requests, self.duration_s, self.req_per_s, self.mb_per_s
        );
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency     p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max)
        );
        let e = &self.errors;
        let _ = writeln!(
            s,
            "errors      {} (refused {}, reset {}, timeout {}, short {}, wrong {}, bad status {}, other {})",
            self.errors_total, e.refused, e.reset, e.timeout, e.short, e.wrong, e.bad_status, e.other
        );
        let _ = writeln!(s, "reconnects  {}", self.reconnects);
        if self.starved > 0 {
            let _ = writeln!(
                s,
                "starved     {} of {} {} got no answer at all",
                self.starved,
                self.connections,
                plural(self.connections as u64, "connection", "connections")
            );
        }
        if self.size == 0 && self.service == BenchService::Reverse {
            let _ = writeln!(
                s,
                "note        a 0-byte reverse request has an empty answer: each counts once sent, \
                 and its latency is the time to send it"
            );
        }
        match self.ended {
            Ended::Completed => {}
            Ended::GaveUp => {
                let _ = writeln!(
                    s,
                    "stopped     early: the first {} requests failed and none was verified",
                    self.errors_total
                );
            }
            Ended::Interrupted => {
                let _ = writeln!(s, "stopped     by a signal after {:.2} s", self.duration_s);
            }
        }
        s
    }
}

/// `one` for 1, else `many`: "1 connection", "2 connections".
pub fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// The kinds of failure that occurred, with counts: "refused 3, timeout 1".
pub fn error_kinds(e: &Errors) -> String {
    let kinds = [
        ("refused", e.refused),
        ("reset", e.reset),
        ("timeout", e.timeout),
        ("short", e.short),
        ("wrong", e.wrong),
        ("bad status", e.bad_status),
        ("other", e.other),
    ];
    let v: Vec<String> = kinds
        .iter()
        .filter(|k| k.1 > 0)
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    v.join(", ")
}

/// The header of the `--interval` lines.
pub fn interval_header() -> String {
    format!(
        "{:<17} {:>11} {:>10} {:>10} {:>8}",
        "interval", "req/s", "p50", "p99", "errors"
    )
}

/// One `--interval` line.
pub fn interval_line(i: &Interval) -> String {
    format!(
        "{:<17} {:>11.0} {:>10} {:>10} {:>8}",
        format!("{:.2}-{:.2} s", i.start_s, i.end_s),
        i.req_per_s,
        if i.requests > 0 {
            us(i.p50_us)
        } else {
            "-".into()
        },
        if i.requests > 0 {
            us(i.p99_us)
        } else {
            "-".into()
        },
        i.errors
    )
}

/// A latency in microseconds, shown with a fitting unit.
pub fn us(v: u64) -> String {
    if v >= 1_000_000 {
        format!("{:.2} s", v as f64 / 1e6)
    } else if v >= 1_000 {
        format!("{:.2} ms", v as f64 / 1e3)
    } else {
        format!("{v} us")
    }
}

/// Show a progress line on stderr every second until the run is done (terminals only).
pub fn progress(live: &crate::bench::gen::Live) {
    let start = Instant::now();
    let mut last = (start, 0u64);
    while !live.done.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        if now.duration_since(last.0) < Duration::from_secs(1) {
            continue;
        }
        let ok = live.ok.load(Ordering::Relaxed);
        let rate = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        eprint!(
            "\r{:6.1} s  {:>10} req/s  {:>8} errors ",
            start.elapsed().as_secs_f64(),
            format!("{rate:.0}"),
            live.errors.load(Ordering::Relaxed)
        );
        last = (now, ok);
    }
    eprint!("\r{:60}\r", "");
}

impl Stop {
    /// How the run ends, for humans.
    pub fn describe(&self) -> String {
        match self {
            Stop::After(d) => format!("{:.1} s", d.as_secs_f64()),
            Stop::Requests(n) => format!("{n} requests"),
        }
    }
}
