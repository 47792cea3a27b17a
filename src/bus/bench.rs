//! `socklab bus bench`: publishers and subscribers against any MQTT broker, every message
//! verified.
//!
//! Each message carries its publisher's id, a sequence number and the time it was (or, in
//! open loop, should have been) sent; its payload bytes are derived from the sequence
//! number and checked. Per publisher and receiver the generator counts losses (sequence
//! numbers never seen), duplicates (seen twice) and reorderings (seen after a later one).
//! Latency is end to end, publisher to subscriber, on one clock.
//!
//! Closed loop: a publisher keeps at most `--inflight` messages unacknowledged (QoS 1/2)
//! and at most `--inflight` messages not yet received by its subscribers, so the broker is
//! measured at the rate it *delivers* rather than driven into dropping. Open loop (`--rate`): each publisher sends on a fixed schedule
//! and latency counts from the scheduled time (no coordinated omission).
//!
//! The generator runs a thread per connection (blocking sockets): simple and the same for
//! every broker, at the cost of context switches at thousands of connections.

use super::client::{bus_endpoint, parse_version, Client, ConnectOptions};
use super::codec::Version;
use bytes::Bytes;
use hdrhistogram::Histogram;
use mqtt_proto::{v5, Pid, QoS, QosPid, TopicName};
use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// The shapes of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// `-n` publisher/subscriber pairs, each on its own topic (`-n 1`: point to point).
    Pairs,
    /// One publisher, `-n` subscribers of its topic.
    Fanout,
    /// `-n` publishers, one subscriber of all their topics (`bench/+`).
    Fanin,
    /// `--pubs` publishers, `-n` subscribers sharing `$share/bench/bench/+`.
    Shared,
}

/// Arguments of `socklab bus bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The broker: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    pub bus: Option<String>,
    /// Traffic shape.
    #[arg(long, value_enum, default_value_t = Scenario::Pairs)]
    pub scenario: Scenario,
    /// The "many" side: pairs, fan-out subscribers, fan-in publishers, shared subscribers.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub count: usize,
    /// Publishers of the shared scenario.
    #[arg(long, default_value_t = 1)]
    pub pubs: usize,
    /// QoS of publications and subscriptions.
    #[arg(short, long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload bytes (at least 24: id, sequence, time).
    #[arg(short, long, value_parser = crate::units::parse_size, default_value = "64")]
    pub size: usize,
    /// How long publishers publish.
    #[arg(short, long, value_parser = crate::units::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Open loop: messages per second per publisher.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Closed loop: messages a publisher keeps unacknowledged (QoS 1/2) or undelivered (QoS 0).
    #[arg(long, default_value_t = 16)]
    pub inflight: u64,
    /// Protocol version: 5, 311 or 31.
    #[arg(short = 'V', long = "protocol-version", value_parser = parse_version, default_value = "311")]
    pub version: Version,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What one publisher's messages looked like at one receiver.
#[derive(Debug, Default)]
struct Tracker {
    next: u64,
    missing: HashSet<u64>,
    received: u64,
    dups: u64,
    reorders: u64,
}

impl Tracker {
    fn see(&mut self, seq: u64) {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            for s in self.next..seq {
                if self.missing.len() < 1_000_000 {
                    self.missing.insert(s);
                }
            }
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.reorders += 1;
        } else {
            self.dups += 1;
        }
    }
}

struct Pubs {
    sent: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
}

/// Per-publisher findings.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PublisherReport {
    /// Publisher index.
    pub publisher: usize,
    /// Messages it published.
    pub sent: u64,
    /// Copies expected at the receivers that should see them.
    pub expected: u64,
    /// Copies received.
    pub received: u64,
    /// Losses.
    pub lost: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Reorderings.
    pub reordered: u64,
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Broker address.
    pub bus: String,
    /// Traffic shape.
    pub scenario: Scenario,
    /// Publishers.
    pub publishers: usize,
    /// Subscribers.
    pub subscribers: usize,
    /// QoS.
    pub qos: u8,
    /// Payload bytes.
    pub size: usize,
    /// Publishing time, seconds.
    pub seconds: f64,
    /// Messages published.
    pub sent: u64,
    /// Copies delivered to subscribers.
    pub delivered: u64,
    /// Published per second.
    pub sent_per_sec: f64,
    /// Delivered per second.
    pub delivered_per_sec: f64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: [u64; 5],
    /// Lost copies.
    pub lost: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Reorderings.
    pub reordered: u64,
    /// Bad payloads (wrong bytes).
    pub corrupt: u64,
    /// Publishers with any loss, duplicate or reordering (at most 20 listed).
    pub problems: Vec<PublisherReport>,
    /// Whether the result is acceptable for the QoS: QoS 2 neither loses nor duplicates,
    /// QoS 1 does not lose, QoS 0 may lose only under overload.
    pub verdict: String,
}

fn fill(seq: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (seq as u8).wrapping_add(i as u8);
    }
}

fn topic_of(s: Scenario, p: usize) -> String {
    match s {
        Scenario::Fanout => "bench/0".into(),
        _ => format!("bench/{p}"),
    }
}

fn filter_of(s: Scenario, sub: usize) -> String {
    match s {
        Scenario::Pairs => format!("bench/{sub}"),
        Scenario::Fanout => "bench/0".into(),
        Scenario::Fanin => "bench/+".into(),
        Scenario::Shared => "$share/bench/bench/+".into(),
    }
}

/// Run the benchmark.
///
/// # Errors
/// Connection failures and bad arguments.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.size < 24 {
        return Err(crate::client::UsageError("--size must be at least 24 bytes".into()).into());
    }
    let ep = bus_endpoint(a.bus.as_deref());
    let n = a.count.max(1);
    let (pubs, subs) = match a.scenario {
        Scenario::Pairs => (n, n),
        Scenario::Fanout => (1, n),
        Scenario::Fanin => (n, 1),
        Scenario::Shared => (a.pubs.max(1), n),
    };
    // Receivers per publisher: who is expected to see each message.
    let fan = match a.scenario {
        Scenario::Fanout => subs as u64,
        _ => 1,
    };
    let groups = if a.scenario == Scenario::Shared {
        1
    } else {
        subs
    };
    let trackers: Arc<Vec<Mutex<Tracker>>> = Arc::new(
        (0..groups * pubs)
            .map(|_| Mutex::new(Tracker::default()))
            .collect(),
    );
    let counters = Arc::new(Pubs {
        sent: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
    });
    let corrupt = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let done = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let qos = super::codec::qos_from(a.qos).unwrap_or(QoS::Level0);
    let run_id = std::process::id();

    // Subscribers first, all subscribed before anyone publishes.
    let ready = Arc::new(Barrier::new(subs + 1));
    let mut sub_handles = Vec::new();
    for s in 0..subs {
        let ep = ep.clone();
        let (trackers, counters, corrupt, done, ready) = (
            trackers.clone(),
            counters.clone(),
            corrupt.clone(),
            done.clone(),
            ready.clone(),
        );
        let version = a.version;
        let scenario = a.scenario;
        let size = a.size;
        sub_handles.push(std::thread::Builder::new().stack_size(256 << 10).spawn(
            move || -> anyhow::Result<Histogram<u64>> {
                let o = ConnectOptions {
                    version,
                    client_id: format!("bench-{run_id}-s{s}"),
                    ..Default::default()
                };
                let r = Client::connect(&ep, &o).and_then(|(mut c, _)| {
                    c.subscribe(&[filter_of(scenario, s)], qos)?;
                    Ok(c)
                });
                ready.wait();
                let mut c = r?;
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                c.socket()
                    .set_read_timeout(Some(Duration::from_millis(100)))?;
                let group = if scenario == Scenario::Shared { 0 } else { s };
                let mut expect = vec![0u8; size];
                loop {
                    let p = match c.next_message() {
                        Ok(p) => p,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            if done.load(Ordering::Acquire) {
                                break;
                            }
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let now = epoch.elapsed().as_micros() as u64;
                    let b = &p.payload;
                    if b.len() != size {
                        corrupt.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let pid = u32::from_be_bytes(b[0..4].try_into().expect("4")) as usize;
                    let seq = u64::from_be_bytes(b[4..12].try_into().expect("8"));
                    let sent_us = u64::from_be_bytes(b[12..20].try_into().expect("8"));
                    fill(seq, &mut expect[20..]);
                    if pid >= pubs || b[20..] != expect[20..] {
                        corrupt.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let _ = hist.record(now.saturating_sub(sent_us).max(1));
                    trackers[group * pubs + pid]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .see(seq);
                    counters.delivered[pid].fetch_add(1, Ordering::Release);
                }
                let _ = c.disconnect();
                Ok(hist)
            },
        )?);
    }
    ready.wait();

    let start = Instant::now();
    let mut pub_handles = Vec::new();
    for p in 0..pubs {
        let ep = ep.clone();
        let (counters, publishing) = (counters.clone(), publishing.clone());
        let (version, scenario, size, rate, window) =
            (a.version, a.scenario, a.size, a.rate, a.inflight.max(1));
        pub_handles.push(std::thread::Builder::new().stack_size(256 << 10).spawn(
            move || -> anyhow::Result<()> {
                let o = ConnectOptions {
                    version,
                    client_id: format!("bench-{run_id}-p{p}"),
                    ..Default::default()
                };
                let (mut c, _) = Client::connect(&ep, &o)?;
                let topic = TopicName::try_from(topic_of(scenario, p).as_str())?;
                let mut payload = vec![0u8; size];
                let mut seq = 0u64;
                let mut outstanding = 0u64;
                let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
                while publishing.load(Ordering::Relaxed) {
                    let sched = match interval {
                        Some(i) => {
                            let due = start + i.mul_f64(seq as f64);
                            let now = Instant::now();
                            if due > now {
                                std::thread::sleep((due - now).min(Duration::from_millis(50)));
                                continue;
                            }
                            due
                        }
                        None => Instant::now(),
                    };
                    if interval.is_none() {
                        while outstanding >= window {
                            read_ack(&mut c, &mut outstanding)?;
                        }
                        // Closed loop: wait until the receivers caught up (briefly: a message the
                        // broker dropped never arrives), so the broker is measured at the rate it
                        // delivers, not driven past it.
                        let t0 = Instant::now();
                        while seq * fan
                            > counters.delivered[p].load(Ordering::Acquire) + window * fan
                            && t0.elapsed() < Duration::from_millis(200)
                            && publishing.load(Ordering::Relaxed)
                        {
                            std::thread::yield_now();
                        }
                    }
                    payload[0..4].copy_from_slice(&(p as u32).to_be_bytes());
                    payload[4..12].copy_from_slice(&seq.to_be_bytes());
                    payload[12..20].copy_from_slice(
                        &(sched.duration_since(epoch).as_micros() as u64).to_be_bytes(),
                    );
                    fill(seq, &mut payload[20..]);
                    let pid = Pid::try_from(((seq % 65535) + 1) as u16).expect("nonzero");
                    let qp = match qos {
                        QoS::Level0 => QosPid::Level0,
                        QoS::Level1 => QosPid::Level1(pid),
                        QoS::Level2 => QosPid::Level2(pid),
                    };
                    c.send(&v5::Packet::Publish(v5::Publish::new(
                        qp,
                        topic.clone(),
                        Bytes::copy_from_slice(&payload),
                    )))?;
                    if qos != QoS::Level0 {
                        outstanding += 1;
                    }
                    seq += 1;
                    counters.sent[p].store(seq, Ordering::Release);
                }
                while outstanding > 0 {
                    read_ack(&mut c, &mut outstanding)?;
                }
                let _ = c.disconnect();
                Ok(())
            },
        )?);
    }

    let progress = std::io::stderr().is_terminal();
    let mut last = 0u64;
    while start.elapsed() < a.duration {
        std::thread::sleep(
            Duration::from_millis(200).min(a.duration.saturating_sub(start.elapsed())),
        );
        if progress {
            let d: u64 = counters
                .delivered
                .iter()
                .map(|x| x.load(Ordering::Relaxed))
                .sum();
            eprint!(
                "\r  {:>5.1}s  delivered {:>10}  ({:>9.0}/s)   ",
                start.elapsed().as_secs_f64(),
                d,
                (d - last) as f64 * 5.0
            );
            last = d;
        }
    }
    publishing.store(false, Ordering::Relaxed);
    let mut errors = Vec::new();
    for h in pub_handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("a publisher thread panicked".into()),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // Let the subscribers drain: until everything expected arrived, or 2 s without progress.
    let expected_total: u64 = counters
        .sent
        .iter()
        .map(|s| s.load(Ordering::Acquire) * fan)
        .sum();
    let mut idle_since = Instant::now();
    let mut seen = 0;
    loop {
        let d: u64 = counters
            .delivered
            .iter()
            .map(|x| x.load(Ordering::Acquire))
            .sum();
        if d >= expected_total || idle_since.elapsed() > Duration::from_secs(2) {
            break;
        }
        if d != seen {
            seen = d;
            idle_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done.store(true, Ordering::Release);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for h in sub_handles {
        match h.join() {
            Ok(Ok(x)) => {
                let _ = hist.add(&x);
            }
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("a subscriber thread panicked".into()),
        }
    }
    if progress {
        eprintln!();
    }
    if let Some(e) = errors.first() {
        anyhow::bail!("{} client(s) failed; first: {e}", errors.len());
    }

    let mut lost = 0;
    let mut dups = 0;
    let mut reorders = 0;
    let mut problems = Vec::new();
    let mut delivered = 0;
    for p in 0..pubs {
        let sent = counters.sent[p].load(Ordering::Acquire);
        let mut r = PublisherReport {
            publisher: p,
            sent,
            expected: 0,
            received: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
        };
        for g in 0..groups {
            let hears = match a.scenario {
                Scenario::Pairs => g == p,
                _ => true,
            };
            let t = trackers[g * pubs + p]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if hears {
                r.expected += sent;
                r.lost += t.missing.len() as u64 + sent.saturating_sub(t.next);
            }
            r.received += t.received;
            r.duplicates += t.dups;
            // Members of a shared group interleave one publisher's messages: order across
            // them means nothing.
            if a.scenario != Scenario::Shared {
                r.reordered += t.reorders;
            }
        }
        delivered += r.received;
        lost += r.lost;
        dups += r.duplicates;
        reorders += r.reordered;
        if (r.lost > 0 || r.duplicates > 0 || r.reordered > 0) && problems.len() < 20 {
            problems.push(r);
        }
    }
    let sent: u64 = counters
        .sent
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .sum();
    let corrupt = corrupt.load(Ordering::Relaxed);
    let verdict = match (a.qos, lost, dups, corrupt) {
        (_, _, _, c) if c > 0 => "FAIL: corrupt payloads".to_string(),
        (2, 0, 0, _) => "ok: exactly once".into(),
        (2, _, _, _) => "FAIL: QoS 2 lost or duplicated messages".into(),
        (1, 0, _, _) => "ok: at least once".into(),
        (1, _, _, _) => "FAIL: QoS 1 lost messages".into(),
        (_, 0, _, _) => "ok: nothing lost".into(),
        _ => "QoS 0 lost messages: the broker dropped under overload".into(),
    };
    let q = |p: f64| hist.value_at_quantile(p);
    let report = Report {
        bus: ep.to_string(),
        scenario: a.scenario,
        publishers: pubs,
        subscribers: subs,
        qos: a.qos,
        size: a.size,
        seconds,
        sent,
        delivered,
        sent_per_sec: sent as f64 / seconds,
        delivered_per_sec: delivered as f64 / seconds,
        latency_us: [q(0.5), q(0.9), q(0.99), q(0.999), hist.max()],
        lost,
        duplicates: dups,
        reordered: reorders,
        corrupt,
        problems,
        verdict,
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(
            out,
            "bus bench {} ({:?}, {} pub x {} sub, QoS {}, {} B, {:.1} s)",
            report.bus, report.scenario, pubs, subs, a.qos, a.size, seconds
        )?;
        writeln!(
            out,
            "  sent       {:>12} ({:>10.0}/s)",
            sent, report.sent_per_sec
        )?;
        writeln!(
            out,
            "  delivered  {:>12} ({:>10.0}/s)",
            delivered, report.delivered_per_sec
        )?;
        let l = report.latency_us;
        writeln!(
            out,
            "  latency us p50 {} p90 {} p99 {} p99.9 {} max {}",
            l[0], l[1], l[2], l[3], l[4]
        )?;
        writeln!(
            out,
            "  lost {}  duplicates {}  reordered {}  corrupt {}",
            lost, dups, reorders, corrupt
        )?;
        for p in &report.problems {
            writeln!(
                out,
                "    publisher {}: sent {} lost {} dup {} reordered {}",
                p.publisher, p.sent, p.lost, p.duplicates, p.reordered
            )?;
        }
        writeln!(out, "  {}", report.verdict)?;
    }
    Ok(())
}

fn read_ack(c: &mut Client, outstanding: &mut u64) -> anyhow::Result<()> {
    match c.read_packet()? {
        v5::Packet::Puback(_) | v5::Packet::Pubcomp(_) => *outstanding -= 1,
        v5::Packet::Pubrec(r) => {
            if r.reason_code as u8 >= 0x80 {
                *outstanding -= 1;
            } else {
                c.send(&v5::Packet::Pubrel(v5::Pubrel::new_success(r.pid)))?;
            }
        }
        _ => {}
    }
    Ok(())
}
