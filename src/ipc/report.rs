//! The report of one run: text for people, JSON for machines. The machine it ran on (CPU
//! model, kernel, CPUs used) is part of every report: figures mean nothing without it.

use super::channel::Between;
use super::measure::{Mode, Usage};
use super::mech::Mechanism;
use super::side::{Pin, RunResult};
use serde::Serialize;
use std::fmt::Write as _;

/// The machine a run was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: usize,
    /// The kernel release (`uname -r`).
    pub kernel: String,
}

impl Machine {
    /// Read this machine's description.
    pub fn here() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name")?
                        .split_once(':')
                        .map(|x| x.1.trim().to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpu_model,
            cpus: crate::server::cores(),
            kernel,
        }
    }

    /// One line: model, CPUs, kernel.
    pub fn line(&self) -> String {
        format!(
            "{}, {} CPUs, Linux {}",
            self.cpu_model, self.cpus, self.kernel
        )
    }
}

/// Where the two sides ran.
#[derive(Debug, Clone, Serialize)]
pub struct Pinning {
    /// cross, same or none.
    pub mode: Pin,
    /// The measuring side's CPU, if pinned.
    pub measurer_cpu: Option<usize>,
    /// The peer's CPU, if pinned.
    pub peer_cpu: Option<usize>,
}

impl Pinning {
    /// How a report says it.
    pub fn describe(&self) -> String {
        match (self.mode, self.measurer_cpu, self.peer_cpu) {
            (Pin::None, _, _) => "not pinned".into(),
            (Pin::Same, Some(a), _) => format!("both on CPU {a} (same)"),
            (_, Some(a), Some(b)) => format!("on CPUs {a} and {b} (cross)"),
            _ => "pinned".into(),
        }
    }
}

/// Round-trip percentiles, microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// The slowest.
    pub max: f64,
    /// The mean.
    pub mean: f64,
}

/// One-way throughput.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Throughput {
    /// Payload megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Messages per second.
    pub msgs_per_s: f64,
}

/// CPU time per message, microseconds (user + system).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct CpuPerMessage {
    /// The measuring side.
    pub measurer: f64,
    /// The peer.
    pub peer: f64,
    /// Both.
    pub total: f64,
}

/// Context switches per message, both sides together.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SwitchesPerMessage {
    /// The thread slept (blocked) and was woken.
    pub voluntary: f64,
    /// The thread was preempted.
    pub involuntary: f64,
}

/// The report of one run, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// Processes or threads.
    pub between: Between,
    /// rtt or stream.
    pub mode: Mode,
    /// Payload bytes per message.
    pub size: usize,
    /// Header bytes added to every message (sequence, length, CRC-32).
    pub header_bytes: usize,
    /// Messages in the measured part.
    pub messages: u64,
    /// Messages before it.
    pub warmup: u64,
    /// Duration of the measured part, seconds.
    pub seconds: f64,
    /// Messages verified (sequence and checksum), warm-up included, both directions.
    pub verified: u64,
    /// Round trip (rtt mode).
    pub rtt_us: Option<Percentiles>,
    /// Throughput (stream mode).
    pub throughput: Option<Throughput>,
    /// CPU time per message.
    pub cpu_us_per_msg: CpuPerMessage,
    /// Context switches per message.
    pub switches_per_msg: SwitchesPerMessage,
    /// Where the sides ran.
    pub pinning: Pinning,
    /// What it ran on.
    pub machine: Machine,
    /// How the mechanism was set up.
    pub setup: String,
}

fn cpu(u: &Usage) -> f64 {
    (u.user_us + u.sys_us) as f64
}

impl Report {
    /// Build the report of a finished run.
    pub fn new(
        mechanism: Mechanism,
        between: Between,
        mode: Mode,
        size: usize,
        warmup: u64,
        r: &RunResult,
        machine: &Machine,
    ) -> Report {
        let m = &r.measured;
        let n = m.messages.max(1) as f64;
        let secs = m.elapsed.as_secs_f64();
        let rtt_us = m.rtt_ns.as_ref().filter(|h| !h.is_empty()).map(|h| {
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            Percentiles {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p99_9: q(0.999),
                max: h.max() as f64 / 1000.0,
                mean: h.mean() / 1000.0,
            }
        });
        let throughput = (mode == Mode::Stream).then(|| Throughput {
            mb_per_s: m.messages as f64 * size as f64 / secs.max(1e-9) / 1e6,
            msgs_per_s: m.messages as f64 / secs.max(1e-9),
        });
        let (mu, pu) = (&m.usage, &r.peer.usage);
        Report {
            mechanism,
            between,
            mode,
            size,
            header_bytes: super::message::HEADER,
            messages: m.messages,
            warmup,
            seconds: secs,
            verified: m.verified + r.peer.verified,
            rtt_us,
            throughput,
            cpu_us_per_msg: CpuPerMessage {
                measurer: cpu(mu) / n,
                peer: cpu(pu) / n,
                total: (cpu(mu) + cpu(pu)) / n,
            },
            switches_per_msg: SwitchesPerMessage {
                voluntary: (mu.voluntary + pu.voluntary) as f64 / n,
                involuntary: (mu.involuntary + pu.involuntary) as f64 / n,
            },
            pinning: Pinning {
                mode: r.pin,
                measurer_cpu: r.cpus.map(|c| c.0),
                peer_cpu: r.cpus.map(|c| c.1),
            },
            machine: machine.clone(),
            setup: r.note.clone(),
        }
    }

    /// The text a person reads.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let what = match self.mode {
            Mode::Rtt => "round trip",
            Mode::Stream => "one-way stream",
        };
        let between = match self.between {
            Between::Processes => "between processes",
            Between::Threads => "between threads",
        };
        let _ = writeln!(
            s,
            "socklab ipc {}: {what}, {} B payload (+{} B header), {between}, {}",
            self.mechanism,
            self.size,
            self.header_bytes,
            self.pinning.describe()
        );
        let _ = writeln!(s, "machine: {}", self.machine.line());
        let _ = writeln!(s, "setup: {}", self.setup);
        let _ = writeln!(
            s,
            "messages: {} measured in {:.3} s after {} warm-up; {} verified (sequence + CRC-32), none failed",
            self.messages, self.seconds, self.warmup, self.verified
        );
        if let Some(p) = &self.rtt_us {
            let _ = writeln!(
                s,
                "round trip (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
                us(p.p50),
                us(p.p90),
                us(p.p99),
                us(p.p99_9),
                us(p.max),
                us(p.mean)
            );
        }
        if let Some(t) = &self.throughput {
            let _ = writeln!(
                s,
                "throughput: {:.1} MB/s, {} messages/s",
                t.mb_per_s,
                count(t.msgs_per_s)
            );
        }
        let c = &self.cpu_us_per_msg;
        let _ = writeln!(
            s,
            "CPU per message: {} µs measuring side + {} µs peer = {} µs",
            us(c.measurer),
            us(c.peer),
            us(c.total)
        );
        let _ = writeln!(
            s,
            "context switches per message: {:.2} voluntary, {:.2} involuntary",
            self.switches_per_msg.voluntary, self.switches_per_msg.involuntary
        );
        s
    }
}

/// Microseconds with sensible precision.
pub fn us(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A count with k/M suffix.
pub fn count(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
