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
//! and at most `--inflight` messages not yet received by its subscribers (a message skipped
//! at a receiver no longer counts), so the broker is measured at the rate it *delivers*
//! rather than driven into dropping. Open loop (`--rate`):
//! each publisher sends on a fixed schedule and latency counts from the scheduled time (no
//! coordinated omission).
//!
//! ```text
//! set up: connect every subscriber and subscribe, then every publisher (blocking, a few
//!         at a time), and hand the sockets to the loops
//! each of --threads epoll loops, over its share of the connections (all non-blocking):
//!     read what arrived: PUBLISH -> acknowledge (QoS 1/2), verify, count, latency;
//!                        PUBACK/PUBREC/PUBCOMP -> the publisher's window opens
//!     publishers whose window opened, whose subscribers caught up, or whose time came:
//!                        write their next messages
//!     one send per connection with output, epoll_wait(nearest due time)
//! ```
//!
//! A thousand connections cost a thousand sockets, not a thousand threads: on a small machine
//! the broker is measured, not the scheduling of the generator's threads.

use super::auth::tls::TlsConn;
use super::client::{bus_endpoint, parse_version, Client, ConnectOptions};
use super::codec::{self, Message, PublishHeader, Version};
use crate::timer::Timers;
use bytes::Bytes;
use hdrhistogram::Histogram;
use mqtt_proto::{v3, v5, QoS};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::Socket;
use std::collections::HashSet;
use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes read per `recv`.
const READ_BUF: usize = 256 << 10;
/// Reads per connection per round, so that one busy connection does not starve the others.
const READS_PER_ROUND: usize = 8;
/// A publisher's unsent output above which it writes no more messages until the socket
/// drains (open loop against a broker that falls behind).
const OUT_CAP: usize = 1 << 20;
/// How long a closed-loop publisher waits for its subscribers before sending one more
/// message anyway: if its last messages were dropped, only a later one's arrival shows it.
const DELIVERY_WAIT: Duration = Duration::from_millis(200);
/// After the run, how long publishers wait for their last acknowledgements.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Keep-alive of the generator's connections; every connection sends PINGREQ at half of it.
const KEEP_ALIVE: u16 = 60;

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
    /// Generator threads: epoll loops sharing the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// User name, password, TLS (every connection uses them).
    #[command(flatten)]
    pub login: super::client::LoginArgs,
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
    /// Note sequence number `seq`; returns how the number of gaps (sequence numbers skipped
    /// and not yet seen) changed.
    fn see(&mut self, seq: u64) -> i64 {
        self.received += 1;
        if seq == self.next {
            self.next += 1;
            0
        } else if seq > self.next {
            let before = self.missing.len();
            for s in self.next..seq {
                if self.missing.len() < 1_000_000 {
                    self.missing.insert(s);
                }
            }
            self.next = seq + 1;
            (self.missing.len() - before) as i64
        } else if self.missing.remove(&seq) {
            self.reorders += 1;
            -1
        } else {
            self.dups += 1;
            0
        }
    }
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

/// What every loop needs to know about the run.
struct Plan {
    scenario: Scenario,
    pubs: usize,
    /// Receivers of each message.
    fan: u64,
    qos: u8,
    size: usize,
    version: Version,
    /// Closed loop: messages a publisher keeps unacknowledged and undelivered.
    window: u64,
    /// Open loop: time between two messages of one publisher.
    interval: Option<Duration>,
    /// Whether another loop may deliver a publisher's messages (then a publisher waiting
    /// for its subscribers is looked at again every millisecond).
    threaded: bool,
}

/// What the loops share with each other and with the main thread.
struct Shared {
    /// One per (receiver group, publisher).
    trackers: Vec<Mutex<Tracker>>,
    /// Messages each publisher sent.
    sent: Vec<AtomicU64>,
    /// Copies of each publisher's messages received.
    delivered: Vec<AtomicU64>,
    /// Copies of each publisher's messages skipped at their receivers (lost, or late).
    gaps: Vec<AtomicI64>,
    corrupt: AtomicU64,
    /// Publishers publish while this is set.
    publishing: AtomicBool,
    /// The loops stop when this is set.
    done: AtomicBool,
    /// Publishers not yet finished (stopped, every acknowledgement in).
    pubs_left: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// The clock of the timestamps in the payloads.
    epoch: Instant,
}

impl Shared {
    fn fail(&self, e: impl std::fmt::Display) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e.to_string());
    }
}

struct Publisher {
    /// Publisher index.
    p: usize,
    /// The message being written (its payload replaced for each one).
    msg: Message,
    payload: Vec<u8>,
    seq: u64,
    /// QoS 1/2 messages not yet acknowledged.
    outstanding: u64,
    /// Since when it has been waiting for its subscribers (closed loop).
    blocked_since: Option<Instant>,
    /// The wake-up queued for it, if any.
    wake: Option<Instant>,
    finished: bool,
}

enum Role {
    Pub(Box<Publisher>),
    Sub { group: usize },
}

struct Conn {
    sock: Socket,
    /// TLS state (`--tls`).
    tls: Option<Box<TlsConn>>,
    role: Role,
    /// Bytes of an incomplete packet.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Bytes of `out` already sent.
    off: usize,
    dead: bool,
}

/// What one publisher does next.
enum Next {
    /// Waits for an acknowledgement or for its socket to drain.
    Idle,
    /// Looked at again at this time (open loop: the next message is due; closed loop: it
    /// stops waiting for its subscribers).
    At(Instant),
}

/// Run the benchmark.
///
/// # Errors
/// Connection failures and bad arguments.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.size < 24 {
        return Err(crate::client::UsageError("--size must be at least 24 bytes".into()).into());
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(crate::client::UsageError("--rate must be a positive number".into()).into());
    }
    crate::bench::raise_fd_limit();
    let ep = bus_endpoint(a.bus.as_deref());
    let mut base = ConnectOptions::default();
    a.login.apply(&mut base)?;
    let n = a.count.max(1);
    let (pubs, subs) = match a.scenario {
        Scenario::Pairs => (n, n),
        Scenario::Fanout => (1, n),
        Scenario::Fanin => (n, 1),
        Scenario::Shared => (a.pubs.max(1), n),
    };
    let groups = if a.scenario == Scenario::Shared {
        1
    } else {
        subs
    };
    let threads = a.threads.clamp(1, pubs + subs);
    let plan = Plan {
        scenario: a.scenario,
        pubs,
        fan: match a.scenario {
            Scenario::Fanout => subs as u64,
            _ => 1,
        },
        qos: a.qos,
        size: a.size,
        version: a.version,
        window: a.inflight.max(1),
        interval: a.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
        threaded: threads > 1,
    };
    let shared = Shared {
        trackers: (0..groups * pubs)
            .map(|_| Mutex::new(Tracker::default()))
            .collect(),
        sent: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..pubs).map(|_| AtomicU64::new(0)).collect(),
        gaps: (0..pubs).map(|_| AtomicI64::new(0)).collect(),
        corrupt: AtomicU64::new(0),
        publishing: AtomicBool::new(true),
        done: AtomicBool::new(false),
        pubs_left: AtomicUsize::new(pubs),
        errors: Mutex::new(Vec::new()),
        epoch: Instant::now(),
    };
    let qos = codec::qos_from(a.qos).unwrap_or(QoS::Level0);
    let run_id = std::process::id();

    // Subscribers first, all subscribed before anyone publishes; then the publishers.
    let mut conns = open_all(subs, |s| {
        let o = ConnectOptions {
            version: a.version,
            client_id: format!("bench-{run_id}-s{s}"),
            keep_alive: KEEP_ALIVE,
            ..base.clone()
        };
        let (mut c, _) = Client::connect(&ep, &o)?;
        let codes = c.subscribe(&[filter_of(a.scenario, s)], qos)?;
        if codes.iter().any(|c| *c as u8 >= 0x80) {
            anyhow::bail!("the broker refused the subscription: {codes:?}");
        }
        let group = if a.scenario == Scenario::Shared { 0 } else { s };
        Ok((c, Role::Sub { group }))
    })?;
    conns.extend(open_all(pubs, |p| {
        let o = ConnectOptions {
            version: a.version,
            client_id: format!("bench-{run_id}-p{p}"),
            keep_alive: KEEP_ALIVE,
            ..base.clone()
        };
        let (c, _) = Client::connect(&ep, &o)?;
        let msg = Message {
            topic: topic_of(a.scenario, p).into(),
            payload: Bytes::new(),
            qos,
            retain: false,
            props: Default::default(),
            expires: None,
        };
        let publisher = Publisher {
            p,
            msg,
            payload: vec![0u8; a.size],
            seq: 0,
            outstanding: 0,
            blocked_since: None,
            wake: None,
            finished: false,
        };
        Ok((c, Role::Pub(Box::new(publisher))))
    })?);
    // Deal the connections to the loops, each loop getting publishers and subscribers.
    let mut shares: Vec<Vec<(Conn, Vec<v5::Packet>)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        shares[i % threads].push(c);
    }

    let start = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let (seconds, hist) = std::thread::scope(|scope| -> anyhow::Result<_> {
        let mut handles = Vec::new();
        for (i, share) in shares.into_iter().enumerate() {
            let (plan, shared) = (&plan, &shared);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bus-bench-{i}"))
                    .spawn_scoped(scope, move || drive(share, plan, shared, start))?,
            );
        }
        let total = || -> u64 {
            shared
                .delivered
                .iter()
                .map(|x| x.load(Ordering::Acquire))
                .sum()
        };
        let mut last = 0u64;
        while start.elapsed() < a.duration {
            std::thread::sleep(
                Duration::from_millis(200).min(a.duration.saturating_sub(start.elapsed())),
            );
            if progress {
                let d = total();
                eprint!(
                    "\r  {:>5.1}s  delivered {:>10}  ({:>9.0}/s)   ",
                    start.elapsed().as_secs_f64(),
                    d,
                    (d - last) as f64 * 5.0
                );
                last = d;
            }
        }
        shared.publishing.store(false, Ordering::Release);
        // Publishers finish once their last messages are acknowledged.
        let stopped = Instant::now();
        while shared.pubs_left.load(Ordering::Acquire) > 0
            && stopped.elapsed() < ACK_WAIT + Duration::from_secs(1)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let seconds = start.elapsed().as_secs_f64();
        // Let the subscribers drain: until everything expected arrived, or 2 s without
        // progress.
        let expected: u64 = shared
            .sent
            .iter()
            .map(|s| s.load(Ordering::Acquire) * plan.fan)
            .sum();
        let mut idle_since = Instant::now();
        let mut seen = 0;
        loop {
            let d = total();
            if d >= expected || idle_since.elapsed() > Duration::from_secs(2) {
                break;
            }
            if d != seen {
                seen = d;
                idle_since = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.done.store(true, Ordering::Release);
        let mut hist = new_histogram();
        for h in handles {
            match h.join() {
                Ok(Ok(x)) => {
                    let _ = hist.add(&x);
                }
                Ok(Err(e)) => shared.fail(e),
                Err(_) => shared.fail("a generator thread panicked"),
            }
        }
        Ok((seconds, hist))
    })?;
    if progress {
        eprintln!();
    }
    {
        let errors = shared.errors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = errors.first() {
            anyhow::bail!("{} client(s) failed; first: {e}", errors.len());
        }
    }
    let report = report(
        a,
        &plan,
        &shared,
        subs,
        groups,
        seconds,
        &hist,
        &ep.to_string(),
    );
    print_report(a, &report)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Open `n` connections with `open` (blocking), up to 16 at a time, in index order.
fn open_all(
    n: usize,
    open: impl Fn(usize) -> anyhow::Result<(Client, Role)> + Sync,
) -> anyhow::Result<Vec<(Conn, Vec<v5::Packet>)>> {
    let workers = n.clamp(1, 16);
    let next = AtomicUsize::new(0);
    type Opened = anyhow::Result<(Client, Role)>;
    let slots: Vec<Mutex<Option<Opened>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = open(i);
                let failed = r.is_err();
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                if failed {
                    next.store(n, Ordering::Relaxed);
                }
            });
        }
    });
    let mut conns = Vec::with_capacity(n);
    for slot in slots {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok((client, role))) => {
                let (sock, tls, inbuf, pending) = client.into_parts();
                sock.set_nonblocking(true)?;
                sock.set_read_timeout(None)?;
                conns.push((
                    Conn {
                        sock,
                        tls: tls.map(Box::new),
                        role,
                        inbuf,
                        out: Vec::new(),
                        off: 0,
                        dead: false,
                    },
                    pending,
                ));
            }
            Some(Err(e)) => return Err(e),
            None => {} // after a failure, the others were not opened
        }
    }
    Ok(conns)
}

/// One loop's state while it runs.
struct Loop<'a> {
    plan: &'a Plan,
    shared: &'a Shared,
    conns: Vec<Conn>,
    /// Connection index of each publisher this loop drives.
    pub_conn: Vec<Option<usize>>,
    hist: Histogram<u64>,
    /// Microseconds since the epoch when the current batch of bytes was read.
    now_us: u64,
    expect: Vec<u8>,
    /// Connections with output to send.
    dirty: Vec<usize>,
    /// Publishers to look at this round.
    ready: Vec<usize>,
    /// Publishers waiting for deliveries made by another loop.
    blocked: Vec<usize>,
    timers: Timers<(Instant, usize)>,
}

/// A generator thread: drive `share` until the run is done; its latency histogram.
fn drive(
    share: Vec<(Conn, Vec<v5::Packet>)>,
    plan: &Plan,
    shared: &Shared,
    start: Instant,
) -> io::Result<Histogram<u64>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut lp = Loop {
        plan,
        shared,
        conns: Vec::with_capacity(share.len()),
        pub_conn: vec![None; plan.pubs],
        hist: new_histogram(),
        now_us: 0,
        expect: vec![0u8; plan.size],
        dirty: Vec::new(),
        ready: Vec::new(),
        blocked: Vec::new(),
        timers: Timers::new(),
    };
    let mut pending = Vec::new();
    for (i, (c, early)) in share.into_iter().enumerate() {
        // Edge-triggered: every readiness change is reported once, so each socket is read
        // until it would block (or, for fairness, remembered and read on next round).
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        epoll.add(&c.sock, EpollEvent::new(flags, i as u64))?;
        if let Role::Pub(p) = &c.role {
            lp.pub_conn[p.p] = Some(i);
            lp.ready.push(i);
        }
        lp.conns.push(c);
        pending.push((i, early));
    }
    lp.now_us = shared.epoch.elapsed().as_micros() as u64;
    for (i, early) in pending {
        for p in early {
            if let v5::Packet::Publish(p) = p {
                lp.on_publish(i, p.qos_pid, &p.payload);
            }
        }
    }
    let mut to_read: Vec<usize> = (0..lp.conns.len()).collect();
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; READ_BUF];
    let mut next_ping = Instant::now() + Duration::from_secs(KEEP_ALIVE as u64 / 2);
    let mut stopping = false;
    let mut stop_deadline = None;
    loop {
        if shared.done.load(Ordering::Acquire) {
            for c in lp.conns.iter_mut().filter(|c| !c.dead) {
                if let Role::Sub { .. } = c.role {
                    // DISCONNECT, best effort
                    let _ = match &mut c.tls {
                        Some(tls) => tls.send(&c.sock, &[0xe0, 0]),
                        None => c.sock.send(&[0xe0, 0]),
                    };
                }
            }
            return Ok(lp.hist);
        }
        for i in std::mem::take(&mut to_read) {
            if lp.read(i, &mut buf) {
                to_read.push(i);
            }
        }
        let now = Instant::now();
        if !stopping && !shared.publishing.load(Ordering::Acquire) {
            stopping = true;
            stop_deadline = Some(now + ACK_WAIT);
            lp.ready.extend(lp.pub_conn.iter().flatten().copied());
        }
        while let Some((at, (_, i))) = lp.timers.pop_due(now) {
            if let Role::Pub(p) = &mut lp.conns[i].role {
                if p.wake == Some(at) {
                    p.wake = None;
                    lp.ready.push(i);
                }
            }
        }
        if plan.threaded {
            lp.ready.append(&mut lp.blocked);
        }
        let mut ready = std::mem::take(&mut lp.ready);
        ready.sort_unstable();
        ready.dedup();
        for i in ready {
            if stopping {
                lp.finish(i, now, stop_deadline);
            } else {
                lp.publish(i, start, now);
            }
        }
        if now >= next_ping {
            next_ping = now + Duration::from_secs(KEEP_ALIVE as u64 / 2);
            for i in 0..lp.conns.len() {
                lp.conns[i].out.extend_from_slice(&[0xc0, 0]);
                lp.dirty.push(i);
            }
        }
        lp.flush();
        let mut timeout = lp
            .timers
            .timeout(now)
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        if !to_read.is_empty() || !lp.ready.is_empty() {
            timeout = Duration::ZERO;
        } else if !lp.blocked.is_empty() {
            timeout = timeout.min(Duration::from_millis(1));
        }
        if stopping {
            timeout = timeout.min(Duration::from_millis(10));
        }
        let timeout = EpollTimeout::try_from(crate::sys::timeout_ms(Some(timeout)))
            .unwrap_or(EpollTimeout::NONE);
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let i = ev.data() as usize;
            let f = ev.events();
            if f.intersects(
                EpollFlags::EPOLLIN
                    | EpollFlags::EPOLLRDHUP
                    | EpollFlags::EPOLLHUP
                    | EpollFlags::EPOLLERR,
            ) {
                to_read.push(i);
            }
            if f.contains(EpollFlags::EPOLLOUT) {
                lp.dirty.push(i);
                if matches!(lp.conns[i].role, Role::Pub(_)) {
                    lp.ready.push(i);
                }
            }
        }
    }
}

impl Loop<'_> {
    /// Read connection `i` (a few reads' worth) and act on every packet; `true` if it may
    /// have more to read.
    fn read(&mut self, i: usize, buf: &mut [u8]) -> bool {
        for _ in 0..READS_PER_ROUND {
            if self.conns[i].dead {
                return false;
            }
            let c = &mut self.conns[i];
            let r = match &mut c.tls {
                Some(tls) => tls.recv(&c.sock, buf),
                None => crate::model::recv(&c.sock, buf, 0),
            };
            match r {
                Ok(0) => {
                    let c = &mut self.conns[i];
                    if matches!(&c.role, Role::Pub(p) if p.finished) {
                        c.dead = true; // after our DISCONNECT
                    } else {
                        self.kill(i, "the broker closed the connection".into());
                    }
                    return false;
                }
                Ok(n) => {
                    self.now_us = self.shared.epoch.elapsed().as_micros() as u64;
                    if let Err(e) = self.take(i, &buf[..n]) {
                        self.kill(i, e);
                        return false;
                    }
                    if n < buf.len() {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.kill(i, e.to_string());
                    return false;
                }
            }
        }
        true
    }

    fn kill(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        if !c.dead {
            c.dead = true;
            if let Role::Pub(p) = &mut c.role {
                if !p.finished {
                    p.finished = true;
                    self.shared.pubs_left.fetch_sub(1, Ordering::AcqRel);
                }
            }
            self.shared.fail(why);
        }
    }

    /// Bytes from connection `i`: act on each complete packet, keep the rest.
    fn take(&mut self, i: usize, data: &[u8]) -> Result<(), String> {
        if self.conns[i].inbuf.is_empty() {
            let used = self.packets(i, data)?;
            self.conns[i].inbuf.extend_from_slice(&data[used..]);
        } else {
            let mut inbuf = std::mem::take(&mut self.conns[i].inbuf);
            inbuf.extend_from_slice(data);
            let used = self.packets(i, &inbuf);
            let used = used?;
            inbuf.drain(..used);
            self.conns[i].inbuf = inbuf;
        }
        Ok(())
    }

    fn packets(&mut self, i: usize, data: &[u8]) -> Result<usize, String> {
        let mut used = 0;
        while let Some((h, total)) =
            codec::frame(&data[used..], usize::MAX >> 4).map_err(|e| e.to_string())?
        {
            let frame = &data[used..used + total];
            used += total;
            self.packet(i, frame, h)?;
        }
        Ok(used)
    }

    /// One packet from the broker.
    fn packet(&mut self, i: usize, frame: &[u8], h: usize) -> Result<(), String> {
        let body = &frame[h..];
        let pid = || body.get(..2).map(|b| [b[0], b[1]]);
        match frame[0] >> 4 {
            3 => {
                let (qos_pid, payload) = decode_publish(self.plan.version, frame, h)?;
                self.on_publish(i, qos_pid, &payload);
            }
            // PUBACK, PUBCOMP: a QoS 1/2 message of ours is done.
            4 | 7 => self.acked(i),
            // PUBREC: release it (or, refused, it is done).
            5 => {
                let refused = self.plan.version.is_v5() && body.get(2).is_some_and(|&r| r >= 0x80);
                match (refused, pid()) {
                    (false, Some(p)) => {
                        self.conns[i].out.extend_from_slice(&[0x62, 2, p[0], p[1]]);
                        self.dirty.push(i);
                    }
                    _ => self.acked(i),
                }
            }
            // PUBREL: complete it.
            6 => {
                if let Some(p) = pid() {
                    self.conns[i].out.extend_from_slice(&[0x70, 2, p[0], p[1]]);
                    self.dirty.push(i);
                }
            }
            14 => {
                return Err(format!(
                    "the broker disconnected (reason {:#04x})",
                    body.first().copied().unwrap_or(0)
                ))
            }
            _ => {}
        }
        Ok(())
    }

    fn acked(&mut self, i: usize) {
        if let Role::Pub(p) = &mut self.conns[i].role {
            p.outstanding = p.outstanding.saturating_sub(1);
            self.ready.push(i);
        }
    }

    /// A publication received on connection `i`: acknowledge it, and for a subscriber,
    /// verify and count it.
    fn on_publish(&mut self, i: usize, qos_pid: mqtt_proto::QosPid, payload: &[u8]) {
        let ack = match qos_pid {
            mqtt_proto::QosPid::Level0 => None,
            mqtt_proto::QosPid::Level1(p) => Some((0x40, p.value())),
            mqtt_proto::QosPid::Level2(p) => Some((0x50, p.value())),
        };
        if let Some((t, p)) = ack {
            let p = p.to_be_bytes();
            self.conns[i].out.extend_from_slice(&[t, 2, p[0], p[1]]);
            self.dirty.push(i);
        }
        let Role::Sub { group } = self.conns[i].role else {
            return;
        };
        let sh = self.shared;
        let b = payload;
        if b.len() != self.plan.size {
            sh.corrupt.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let publisher = u32::from_be_bytes(b[0..4].try_into().expect("4")) as usize;
        let seq = u64::from_be_bytes(b[4..12].try_into().expect("8"));
        let sent_us = u64::from_be_bytes(b[12..20].try_into().expect("8"));
        fill(seq, &mut self.expect[20..]);
        if publisher >= self.plan.pubs || b[20..] != self.expect[20..] {
            sh.corrupt.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let _ = self.hist.record(self.now_us.saturating_sub(sent_us).max(1));
        let gaps = sh.trackers[group * self.plan.pubs + publisher]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .see(seq);
        // Members of a shared group interleave a publisher's messages: a gap at one of them
        // says nothing.
        if gaps != 0 && self.plan.scenario != Scenario::Shared {
            sh.gaps[publisher].fetch_add(gaps, Ordering::AcqRel);
        }
        sh.delivered[publisher].fetch_add(1, Ordering::AcqRel);
        if let Some(c) = self.pub_conn[publisher] {
            self.ready.push(c);
        }
    }

    /// Write publisher `i`'s next messages, as many as its window, its subscribers and (open
    /// loop) the schedule allow.
    fn publish(&mut self, i: usize, start: Instant, now: Instant) {
        let plan = self.plan;
        let c = &mut self.conns[i];
        if c.dead {
            return;
        }
        let Role::Pub(p) = &mut c.role else {
            return;
        };
        let next = loop {
            if c.out.len() - c.off > OUT_CAP {
                break Next::Idle; // the socket's EPOLLOUT brings it back
            }
            let sched = match plan.interval {
                Some(iv) => {
                    let due = start + iv.mul_f64(p.seq as f64);
                    if due > now {
                        break Next::At(due);
                    }
                    due
                }
                None => {
                    if plan.qos > 0 && p.outstanding >= plan.window {
                        break Next::Idle; // an acknowledgement brings it back
                    }
                    // Wait until the receivers caught up, so that the broker is measured at
                    // the rate it delivers, not driven past it. A copy skipped at a receiver
                    // (a later one arrived: lost, or late) no longer holds the window; if
                    // nothing arrives for a while (the last ones lost), one more message is
                    // sent, whose arrival shows the gap.
                    let sh = self.shared;
                    let seen = sh.delivered[p.p].load(Ordering::Acquire) as i64
                        + sh.gaps[p.p].load(Ordering::Acquire);
                    let waiting = (p.seq * plan.fan) as i64 - seen;
                    if waiting > (plan.window * plan.fan) as i64 {
                        let since = *p.blocked_since.get_or_insert(now);
                        if now.duration_since(since) < DELIVERY_WAIT {
                            if plan.threaded {
                                self.blocked.push(i);
                            }
                            break Next::At(since + DELIVERY_WAIT);
                        }
                    }
                    p.blocked_since = None;
                    now
                }
            };
            let b = &mut p.payload;
            b[0..4].copy_from_slice(&(p.p as u32).to_be_bytes());
            b[4..12].copy_from_slice(&p.seq.to_be_bytes());
            let at = sched
                .saturating_duration_since(self.shared.epoch)
                .as_micros() as u64;
            b[12..20].copy_from_slice(&at.to_be_bytes());
            fill(p.seq, &mut b[20..]);
            p.msg.payload = Bytes::copy_from_slice(b);
            let h = PublishHeader {
                qos: plan.qos,
                pid: ((p.seq % 65535) + 1) as u16,
                ..Default::default()
            };
            codec::encode_publish(plan.version, &p.msg, &h, usize::MAX, &mut c.out);
            if plan.qos > 0 {
                p.outstanding += 1;
            }
            p.seq += 1;
            self.shared.sent[p.p].store(p.seq, Ordering::Release);
        };
        if c.out.len() > c.off {
            self.dirty.push(i);
        }
        if let Next::At(t) = next {
            if p.wake.is_none_or(|w| t < w) {
                if let Some(w) = p.wake.replace(t) {
                    self.timers.remove(w, (w, i));
                }
                self.timers.insert(t, (t, i));
            }
        }
    }

    /// After the run: a publisher with nothing unacknowledged (or that waited long
    /// enough) says DISCONNECT and is finished.
    fn finish(&mut self, i: usize, now: Instant, deadline: Option<Instant>) {
        let c = &mut self.conns[i];
        let Role::Pub(p) = &mut c.role else {
            return;
        };
        if p.finished || c.dead {
            return;
        }
        if p.outstanding == 0 || deadline.is_some_and(|d| now >= d) {
            p.finished = true;
            c.out.extend_from_slice(&[0xe0, 0]);
            self.dirty.push(i);
            self.shared.pubs_left.fetch_sub(1, Ordering::AcqRel);
        } else if let Some(d) = deadline {
            self.timers.insert(d, (d, i));
            p.wake = Some(d);
        }
    }

    /// One `send` (or a few) per connection with output.
    fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for &i in &dirty {
            let c = &mut self.conns[i];
            if c.dead {
                continue;
            }
            let mut err = None;
            if let Some(tls) = &mut c.tls {
                // What rustls holds goes first.
                match tls.flush(&c.sock) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => err = Some(e.to_string()),
                }
            }
            while err.is_none() && c.off < c.out.len() {
                let r = match &mut c.tls {
                    Some(tls) => tls.send(&c.sock, &c.out[c.off..]),
                    None => c.sock.send(&c.out[c.off..]),
                };
                match r {
                    Ok(n) => c.off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
            if c.off == c.out.len() {
                c.out.clear();
                c.off = 0;
            }
            if let Some(e) = err {
                self.kill(i, e);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }
}

/// The QoS, packet identifier and payload of a PUBLISH from the broker.
fn decode_publish(
    version: Version,
    frame: &[u8],
    h: usize,
) -> Result<(mqtt_proto::QosPid, Bytes), String> {
    let (rem, total) = ((frame.len() - h) as u32, frame.len() as u32);
    let mut off = h;
    if version.is_v5() {
        let hd = v5::Header::new_with(frame[0], rem, total).map_err(|e| e.to_string())?;
        let p = v5::Publish::decode(frame, &mut off, hd).map_err(|e| e.to_string())?;
        Ok((p.qos_pid, p.payload))
    } else {
        let hd = v3::Header::new_with(frame[0], rem, total).map_err(|e| e.to_string())?;
        let p = v3::Publish::decode(frame, &mut off, hd).map_err(|e| e.to_string())?;
        Ok((p.qos_pid, p.payload))
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    a: &BenchArgs,
    plan: &Plan,
    shared: &Shared,
    subs: usize,
    groups: usize,
    seconds: f64,
    hist: &Histogram<u64>,
    bus: &str,
) -> Report {
    let mut lost = 0;
    let mut dups = 0;
    let mut reorders = 0;
    let mut problems = Vec::new();
    let mut delivered = 0;
    for p in 0..plan.pubs {
        let sent = shared.sent[p].load(Ordering::Acquire);
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
            let hears = match plan.scenario {
                Scenario::Pairs => g == p,
                _ => true,
            };
            let t = shared.trackers[g * plan.pubs + p]
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
            if plan.scenario != Scenario::Shared {
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
    let sent: u64 = shared.sent.iter().map(|s| s.load(Ordering::Acquire)).sum();
    let corrupt = shared.corrupt.load(Ordering::Relaxed);
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
    Report {
        bus: bus.to_string(),
        scenario: a.scenario,
        publishers: plan.pubs,
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
    }
}

fn print_report(a: &BenchArgs, report: &Report) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "bus bench {} ({:?}, {} pub x {} sub, QoS {}, {} B, {:.1} s)",
        report.bus,
        report.scenario,
        report.publishers,
        report.subscribers,
        a.qos,
        a.size,
        report.seconds
    )?;
    writeln!(
        out,
        "  sent       {:>12} ({:>10.0}/s)",
        report.sent, report.sent_per_sec
    )?;
    writeln!(
        out,
        "  delivered  {:>12} ({:>10.0}/s)",
        report.delivered, report.delivered_per_sec
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
        report.lost, report.duplicates, report.reordered, report.corrupt
    )?;
    for p in &report.problems {
        writeln!(
            out,
            "    publisher {}: sent {} lost {} dup {} reordered {}",
            p.publisher, p.sent, p.lost, p.duplicates, p.reordered
        )?;
    }
    writeln!(out, "  {}", report.verdict)?;
    Ok(())
}
