//! The load generator: `--threads` epoll loops, each driving its share of non-blocking
//! client connections. No async runtime: a 2-core machine drives thousands of connections
//! because a waiting connection costs nothing but its socket.
//!
//! ```text
//! each thread:
//!     open idle connections (if --idle), wait for the others at the start line
//!     loop until the duration or the request budget is spent:
//!         start connects (at most 64 in progress, so the backlog is not the experiment)
//!         open loop: requests fall due at the rate; each goes to an idle connection
//!         epoll_wait(nearest deadline)
//!         connected  -> send a request (closed loop: at once)
//!         readable   -> check the answer bytes; complete -> record latency, next request
//!         deadline   -> timeout: count it, reconnect
//! ```
//!
//! Latency is measured from when a request was *sent* in a closed loop, and from when it
//! *should have been sent* in an open loop (`--rate`): a stalled server then shows up in the
//! latency of every request that had to wait, not only in the one that stalled
//! (coordinated-omission correction, as wrk2 does it).
//!
//! No handler calls another slot's handler: a slot whose next step can start at once (its
//! answer was complete as soon as the request was out, or it must reconnect) goes on a run
//! queue that the loop drains in bounded batches. A zero-size reverse request, whose answer
//! is empty, would otherwise recurse request after request until the stack overflowed.
//!
//! A run stops early when told to ([`Control::stop_fd`]: SIGINT/SIGTERM), or, with
//! [`LoadSpec::give_up`], when as many requests have failed as there are connections and
//! none was verified: a closed port or a server answering every request wrongly is reported
//! at once instead of after the whole duration.

use crate::bench::proto::{Answer, BenchService, Mismatch, Progress, Requests};
use crate::timer::Timers;
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::{Domain, SockAddr, Socket, Type};
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Barrier};
use std::time::{Duration, Instant};

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many requests (answered or failed).
    Requests(u64),
}

/// What to drive and how hard.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server's address (IP or Unix path).
    pub target: SockAddr,
    /// For the HTTP `Host` header.
    pub host: String,
    /// The protocol.
    pub service: BenchService,
    /// Active connections.
    pub connections: usize,
    /// Generator threads (epoll loops).
    pub threads: usize,
    /// Payload bytes per echo/reverse request.
    pub size: usize,
    /// HTTP path.
    pub path: String,
    /// When to stop.
    pub stop: Stop,
    /// Open loop at this many requests per second in total; `None` for closed loop.
    pub rate: Option<f64>,
    /// Every request on a new connection, closed after the answer.
    pub connect_per_request: bool,
    /// Extra connections held open without traffic.
    pub idle: usize,
    /// A connect or a request taking longer than this fails as a timeout.
    pub timeout: Duration,
    /// Report req/s, latency and errors per interval of this length (`--interval`).
    pub interval: Option<Duration>,
    /// Stop early when as many requests have failed as there are connections and none was
    /// verified (a plain run; `--compare` records such a point instead).
    pub give_up: bool,
}

/// How a run was ended from outside, and where its per-interval reports go.
#[derive(Default, Clone, Copy)]
pub struct Control<'a> {
    /// Stop (keeping what was measured) once this descriptor becomes readable: the signal
    /// self-pipe of [`crate::signals::Signals`], so SIGINT/SIGTERM end the run.
    pub stop_fd: Option<BorrowedFd<'a>>,
    /// Called with each interval as soon as every generator thread has reported it.
    pub on_interval: Option<&'a (dyn Fn(&Interval) + Sync)>,
}

/// One `--interval` of a run: what was verified and what failed in it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Interval {
    /// Start, seconds from the start line.
    pub start_s: f64,
    /// End, seconds from the start line (the last interval may be shorter).
    pub end_s: f64,
    /// Requests verified in this interval.
    pub requests: u64,
    /// `requests` per second of this interval.
    pub req_per_s: f64,
    /// Median latency of this interval's verified answers, microseconds (0 if none).
    pub p50_us: u64,
    /// 99th percentile latency of this interval's verified answers, microseconds (0 if none).
    pub p99_us: u64,
    /// Failed requests in this interval.
    pub errors: u64,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// The duration or the request budget was spent.
    Completed,
    /// Given up early: as many failures as connections and no verified answer.
    GaveUp,
    /// Stopped by [`Control::stop_fd`] (SIGINT/SIGTERM).
    Interrupted,
}

/// Failures, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Errors {
    /// Connection refused (nothing listening, or the backlog overflowed with resets).
    pub refused: u64,
    /// Connection reset or broken pipe.
    pub reset: u64,
    /// No complete answer (or no connection) within `--timeout`.
    pub timeout: u64,
    /// The server closed the connection before the answer was complete.
    pub short: u64,
    /// An answer byte differs from what the protocol demands.
    pub wrong: u64,
    /// HTTP status other than 200, or an unparsable response.
    pub bad_status: u64,
    /// Anything else (e.g. out of local ports or descriptors).
    pub other: u64,
}

impl Errors {
    /// All failures.
    pub fn total(&self) -> u64 {
        self.refused
            + self.reset
            + self.timeout
            + self.short
            + self.wrong
            + self.bad_status
            + self.other
    }

    fn add(&mut self, o: &Errors) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.short += o.short;
        self.wrong += o.wrong;
        self.bad_status += o.bad_status;
        self.other += o.other;
    }

    fn count_io(&mut self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => self.refused += 1,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => self.reset += 1,
            io::ErrorKind::TimedOut => self.timeout += 1,
            _ => self.other += 1,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests answered correctly.
    pub ok: u64,
    /// Answer bytes received for them.
    pub bytes: u64,
    /// Failures by kind.
    pub errors: Errors,
    /// Connections opened after the first one of each slot (after errors, or per request).
    pub reconnects: u64,
    /// Latency of correct answers, in microseconds.
    pub latency: Histogram<u64>,
    /// Time from the start line to the end.
    pub elapsed: Duration,
    /// Idle connections that were established.
    pub idle_established: u64,
    /// Active connections that got no answer at all during the run: a design that serves
    /// fewer clients at once than it is given leaves the rest waiting (iterative, a pool with
    /// fewer workers than connections). Their waiting requests count as timeouts only once
    /// `--timeout` passes, so a short run would otherwise hide them.
    pub starved: u64,
    /// Why the run ended.
    pub ended: Ended,
    /// The `--interval` reports, in order (empty without `--interval`).
    pub intervals: Vec<Interval>,
}

/// Shared between the generator threads and whoever watches progress.
#[derive(Debug, Default)]
pub struct Live {
    /// Correct answers so far.
    pub ok: AtomicU64,
    /// Failures so far.
    pub errors: AtomicU64,
    /// Requests claimed from a `--requests` budget.
    claimed: AtomicU64,
    /// Set when the run is over (for the progress watcher).
    pub done: AtomicBool,
    /// Set to make every generator thread stop now.
    halt: AtomicBool,
    /// Set when the run was given up (see [`LoadSpec::give_up`]).
    gave_up: AtomicBool,
    /// Set when the stop descriptor fired.
    interrupted: AtomicBool,
}

impl Live {
    /// Whether the threads should stop.
    fn halted(&self) -> bool {
        self.halt.load(Ordering::SeqCst)
    }

    fn halt(&self) {
        self.halt.store(true, Ordering::SeqCst);
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 us .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Run the load described by `spec`, reporting progress into `live`; `control` can end it
/// early and receives the `--interval` reports.
///
/// # Errors
/// Failures of the generator itself (epoll, threads, no descriptor for a socket);
/// connection problems are counted in the outcome, never fatal.
pub fn run(spec: &LoadSpec, live: &Live, control: Control<'_>) -> io::Result<Outcome> {
    let threads = spec.threads.clamp(1, spec.connections.max(1));
    let barrier = Barrier::new(threads);
    let start = std::sync::OnceLock::new();
    let (tx, rx) = mpsc::channel::<IntervalPart>();
    let (results, intervals) = std::thread::scope(|scope| {
        let collector = spec
            .interval
            .map(|iv| scope.spawn(move || collect_intervals(rx, threads, iv, control.on_interval)));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, start) = (&barrier, &start);
                let tx = spec.interval.map(|_| tx.clone());
                scope.spawn(move || {
                    let share = |n: usize| n / threads + usize::from(t < n % threads);
                    // Every thread reaches the start line, even one whose setup failed: the
                    // others would wait there forever.
                    let setup = Worker::new(
                        spec,
                        live,
                        t,
                        share(spec.connections),
                        share(spec.idle),
                        control.stop_fd,
                        tx,
                    )
                    .and_then(|mut w| w.open_idle().map(|()| w));
                    if setup.is_err() {
                        live.halt();
                    }
                    barrier.wait();
                    let t0 = *start.get_or_init(Instant::now);
                    setup?.run(t0)
                })
            })
            .collect();
        drop(tx);
        let results: Vec<io::Result<Outcome>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(io::Error::other("generator thread panicked")))
            })
            .collect();
        let intervals = collector
            .map(|c| c.join().unwrap_or_default())
            .unwrap_or_default();
        (results, intervals)
    });
    live.done.store(true, Ordering::SeqCst);
    let mut total: Option<Outcome> = None;
    for r in results {
        let o = r?;
        match &mut total {
            None => total = Some(o),
            Some(t) => {
                t.ok += o.ok;
                t.bytes += o.bytes;
                t.errors.add(&o.errors);
                t.reconnects += o.reconnects;
                t.latency
                    .add(&o.latency)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                t.elapsed = t.elapsed.max(o.elapsed);
                t.idle_established += o.idle_established;
                t.starved += o.starved;
            }
        }
    }
    let mut total = total.expect("at least one thread");
    total.ended = if live.interrupted.load(Ordering::SeqCst) {
        Ended::Interrupted
    } else if live.gave_up.load(Ordering::SeqCst) {
        Ended::GaveUp
    } else {
        Ended::Completed
    };
    total.intervals = intervals;
    Ok(total)
}

/// One thread's share of one interval.
struct IntervalPart {
    index: u64,
    /// End of the interval (or of the run, for the last one), seconds from the start line.
    end_s: f64,
    ok: u64,
    errors: u64,
    hist: Histogram<u64>,
}

/// Merge the threads' parts of each interval; hand each one on as soon as every thread has
/// reported it, and the incomplete last ones when the threads are done.
fn collect_intervals(
    rx: mpsc::Receiver<IntervalPart>,
    threads: usize,
    iv: Duration,
    on_interval: Option<&(dyn Fn(&Interval) + Sync)>,
) -> Vec<Interval> {
    let mut pending: BTreeMap<u64, (usize, IntervalPart)> = BTreeMap::new();
    let mut out = Vec::new();
    let finish = |p: IntervalPart, out: &mut Vec<Interval>| {
        let start_s = p.index as f64 * iv.as_secs_f64();
        let span = (p.end_s - start_s).max(1e-9);
        let q = |x| {
            if p.hist.is_empty() {
                0
            } else {
                p.hist.value_at_quantile(x)
            }
        };
        let i = Interval {
            start_s,
            end_s: p.end_s,
            requests: p.ok,
            req_per_s: p.ok as f64 / span,
            p50_us: q(0.5),
            p99_us: q(0.99),
            errors: p.errors,
        };
        if let Some(f) = on_interval {
            f(&i);
        }
        out.push(i);
    };
    for part in rx {
        let index = part.index;
        let merged = match pending.remove(&index) {
            None => (1, part),
            Some((n, mut m)) => {
                m.ok += part.ok;
                m.errors += part.errors;
                m.end_s = m.end_s.max(part.end_s);
                let _ = m.hist.add(&part.hist);
                (n + 1, m)
            }
        };
        if merged.0 == threads {
            // Earlier intervals some thread never reported (it had ended) are complete too.
            while let Some(entry) = pending.first_entry() {
                if *entry.key() > index {
                    break;
                }
                finish(entry.remove().1, &mut out);
            }
            finish(merged.1, &mut out);
        } else {
            pending.insert(index, merged);
        }
    }
    for (_, (_, p)) in pending {
        finish(p, &mut out);
    }
    out
}

/// Claim the right to send one more request (the `--requests` budget, shared by threads).
fn claim(spec: &LoadSpec, live: &Live) -> bool {
    match spec.stop {
        Stop::After(_) => true,
        Stop::Requests(n) => live.claimed.fetch_add(1, Ordering::SeqCst) < n,
    }
}

/// Where a connection slot stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket; (re)connect when the connect budget allows.
    Closed,
    /// `connect` in progress.
    Connecting,
    /// Connected, no request in flight (open loop: waiting for one to fall due).
    Ready,
    /// A request is being sent or answered.
    Busy,
    /// Waiting out a pause after an error before reconnecting.
    Backoff,
    /// Finished: no more work for this slot.
    Finished,
}

#[derive(Debug)]
struct Slot {
    sock: Option<Socket>,
    state: State,
    reqs: Requests,
    answer: Option<Answer>,
    /// Bytes of the request already sent.
    sent: usize,
    /// When the request was sent (closed loop) or due (open loop).
    started: Instant,
    /// The deadline queued for this slot in the timers.
    deadline: Option<Instant>,
    /// Whether this slot has connected before (so the next connect is a reconnect).
    connected_once: bool,
    /// Requests this slot had answered.
    answered: u64,
    /// Whether this slot was ever given a request (a slot the `--requests` budget or the
    /// open loop's rate never needed is not starved).
    asked: bool,
}

const IDLE_TOKEN_BASE: u64 = 1 << 62;
const TIMER_TOKEN: u64 = u64::MAX;
const STOP_TOKEN: u64 = u64::MAX - 1;
/// Slots taken from the run queue before the loop looks at the clock and the sockets again.
const RUN_BATCH: usize = 4096;
/// Connects in progress at once per thread.
const CONNECT_BUDGET: usize = 64;
/// Pause after a failed connection before trying again.
const BACKOFF: Duration = Duration::from_millis(10);

struct Worker<'a> {
    spec: &'a LoadSpec,
    live: &'a Live,
    epoll: Epoll,
    slots: Vec<Slot>,
    idle: Vec<Socket>,
    idle_wanted: usize,
    timers: Timers<usize>,
    hist: Histogram<u64>,
    ok: u64,
    bytes: u64,
    errors: Errors,
    reconnects: u64,
    connecting: usize,
    /// Open loop: the next due time, the interval, and the requests due but not yet sent.
    next_due: Option<Instant>,
    interval: Duration,
    due: VecDeque<Instant>,
    /// Open loop: a timerfd armed for the next due time, with nanosecond precision
    /// (`epoll_wait` only counts milliseconds, and a request sent up to 1 ms late would be
    /// charged to the server by the coordinated-omission correction), and when it is armed for.
    timer: Option<(nix::sys::timerfd::TimerFd, Option<Instant>)>,
    /// Open loop: slots that may be Ready (checked when taken).
    ready: Vec<usize>,
    /// Slots whose next step can start at once: Ready ones send (closed loop), Closed ones
    /// reconnect. Drained by the loop, never by a handler (see the module doc).
    again: VecDeque<usize>,
    buf: Vec<u8>,
    /// Readable when the run must stop (SIGINT/SIGTERM).
    stop_fd: Option<BorrowedFd<'a>>,
    /// `--interval`: where this thread's parts go, the interval's own histogram, and the
    /// counts when it began.
    iv: Option<IntervalState>,
}

struct IntervalState {
    every: Duration,
    tx: mpsc::Sender<IntervalPart>,
    index: u64,
    hist: Histogram<u64>,
    ok_at_start: u64,
    errors_at_start: u64,
}

impl<'a> Worker<'a> {
    fn new(
        spec: &'a LoadSpec,
        live: &'a Live,
        t: usize,
        conns: usize,
        idle: usize,
        stop_fd: Option<BorrowedFd<'a>>,
        tx: Option<mpsc::Sender<IntervalPart>>,
    ) -> io::Result<Self> {
        let slots = (0..conns)
            .map(|i| Slot {
                sock: None,
                state: State::Closed,
                reqs: Requests::new(
                    spec.service,
                    spec.size,
                    &spec.path,
                    &spec.host,
                    (t * 1_000_000 + i) as u64,
                ),
                answer: None,
                sent: 0,
                started: Instant::now(),
                deadline: None,
                connected_once: false,
                answered: 0,
                asked: false,
            })
            .collect();
        let interval = match spec.rate {
            Some(r) if r > 0.0 && conns > 0 => {
                let mine = r * conns as f64 / spec.connections as f64;
                Duration::from_secs_f64(1.0 / mine)
            }
            _ => Duration::ZERO,
        };
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        if let Some(fd) = stop_fd {
            // Level-triggered and never drained here: every thread's epoll sees it.
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN))?;
        }
        let iv = match (spec.interval, tx) {
            (Some(every), Some(tx)) => Some(IntervalState {
                every,
                tx,
                index: 0,
                hist: new_histogram(),
                ok_at_start: 0,
                errors_at_start: 0,
            }),
            _ => None,
        };
        Ok(Worker {
            spec,
            live,
            epoll,
            slots,
            idle: Vec::new(),
            idle_wanted: idle,
            timers: Timers::new(),
            hist: new_histogram(),
            ok: 0,
            bytes: 0,
            errors: Errors::default(),
            reconnects: 0,
            connecting: 0,
            next_due: None,
            interval,
            due: VecDeque::new(),
            timer: None,
            ready: Vec::new(),
            again: VecDeque::new(),
            buf: vec![0u8; 64 * 1024],
            stop_fd,
            iv,
        })
    }

    /// Whether the stop descriptor has fired with a stop request (checked without waiting).
    fn stop_fired(&self) -> bool {
        let Some(fd) = self.stop_fd else {
            return false;
        };
        if !crate::signals::stop_requested() {
            return false;
        }
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(n) if n > 0
        )
    }

    /// Stop every thread: the stop descriptor fired.
    fn interrupted(&self) {
        self.live.interrupted.store(true, Ordering::SeqCst);
        self.live.halt();
    }

    /// Give up when as many requests failed as there are connections and none passed.
    fn check_give_up(&self) {
        if self.spec.give_up
            && self.live.ok.load(Ordering::Relaxed) == 0
            && self.live.errors.load(Ordering::Relaxed) >= self.spec.connections.max(1) as u64
        {
            self.live.gave_up.store(true, Ordering::SeqCst);
            self.live.halt();
        }
    }

    /// Send this thread's part of every interval that ended before `upto` (seconds from
    /// the start line); `last` also sends the interval `upto` falls in, cut at `upto`.
    fn flush_intervals(&mut self, upto: f64, last: bool) {
        let (ok, errors) = (self.ok, self.errors.total());
        let Some(iv) = self.iv.as_mut() else { return };
        let every = iv.every.as_secs_f64();
        loop {
            let end = (iv.index + 1) as f64 * every;
            let complete = end <= upto;
            let started = (iv.index as f64 * every) < upto;
            if !(complete || (last && started)) {
                return;
            }
            let part = IntervalPart {
                index: iv.index,
                end_s: if complete { end } else { upto },
                ok: ok - iv.ok_at_start,
                errors: errors - iv.errors_at_start,
                hist: std::mem::replace(&mut iv.hist, new_histogram()),
            };
            iv.ok_at_start = ok;
            iv.errors_at_start = errors;
            iv.index += 1;
            let _ = iv.tx.send(part);
            if !complete {
                return;
            }
        }
    }

    fn new_socket(&self) -> io::Result<Socket> {
        let domain = if self.spec.target.is_unix() {
            Domain::UNIX
        } else {
            self.spec.target.domain()
        };
        let s = Socket::new(domain, Type::STREAM.nonblocking().cloexec(), None)?;
        if !self.spec.target.is_unix() {
            s.set_tcp_nodelay(true)?;
        }
        Ok(s)
    }

    /// Open this thread's idle connections (blocking until each is established or fails).
    fn open_idle(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + self.spec.timeout.max(Duration::from_secs(10));
        let mut pending: Vec<Socket> = Vec::new();
        let mut events = vec![EpollEvent::empty(); 256];
        while (self.idle.len() + pending.len() < self.idle_wanted || !pending.is_empty())
            && Instant::now() < deadline
        {
            if self.live.halted() {
                break;
            }
            if self.stop_fired() {
                self.interrupted();
                break;
            }
            while self.idle.len() + pending.len() < self.idle_wanted
                && pending.len() < CONNECT_BUDGET
            {
                let s = self.new_socket()?;
                match s.connect(&self.spec.target) {
                    Ok(()) => self.idle.push(s),
                    Err(e)
                        if e.raw_os_error() == Some(libc::EINPROGRESS)
                            || e.kind() == io::ErrorKind::WouldBlock =>
                    {
                        let token = IDLE_TOKEN_BASE + pending.len() as u64;
                        self.epoll
                            .add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLOUT, token))?;
                        pending.push(s);
                    }
                    Err(e) => {
                        self.errors.count_io(&e);
                        std::thread::sleep(BACKOFF);
                    }
                }
            }
            if pending.is_empty() {
                continue;
            }
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(100u16)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                continue;
            }
            // Collect every finished connect, then rebuild the pending list.
            let mut still = Vec::new();
            for s in pending.drain(..) {
                match s.take_error() {
                    Ok(None) if s.peer_addr().is_ok() => {
                        self.epoll.delete(s.as_fd())?;
                        self.idle.push(s);
                    }
                    Ok(None) => still.push(s),
                    Ok(Some(e)) | Err(e) => {
                        self.errors.count_io(&e);
                        let _ = self.epoll.delete(s.as_fd());
                    }
                }
            }
            for (i, s) in still.iter().enumerate() {
                self.epoll.modify(
                    s.as_fd(),
                    &mut EpollEvent::new(EpollFlags::EPOLLOUT, IDLE_TOKEN_BASE + i as u64),
                )?;
            }
            pending = still;
        }
        Ok(())
    }

    fn end(&self, t0: Instant) -> Option<Instant> {
        match self.spec.stop {
            Stop::After(d) => Some(t0 + d),
            Stop::Requests(_) => None,
        }
    }

    fn budget_spent(&self) -> bool {
        match self.spec.stop {
            Stop::After(_) => false,
            Stop::Requests(n) => self.live.claimed.load(Ordering::SeqCst) >= n,
        }
    }

    fn run(mut self, t0: Instant) -> io::Result<Outcome> {
        let end = self.end(t0);
        if self.interval > Duration::ZERO {
            use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
            self.next_due = Some(t0);
            let fd = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )?;
            self.epoll.add(
                fd.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
            )?;
            self.timer = Some((fd, None));
        }
        let mut events = vec![EpollEvent::empty(); 1024];
        let iv_every = self.iv.as_ref().map(|iv| iv.every);
        loop {
            let now = Instant::now();
            if let Some(every) = iv_every {
                let upto = end.map_or(now, |e| now.min(e)) - t0;
                if upto >= every {
                    self.flush_intervals(upto.as_secs_f64(), false);
                }
            }
            if end.is_some_and(|e| now >= e) || self.live.halted() {
                break;
            }
            if self.all_done() {
                break;
            }
            self.start_connects(now);
            self.open_loop_tick(now);
            self.run_again(now);
            if self.all_done() {
                // The run queue may have spent the budget: do not wait for events then.
                continue;
            }
            let mut timeout = self.timers.timeout(now);
            self.arm_timer(now)?;
            if let Some(e) = end {
                let until = e.saturating_duration_since(now);
                timeout = Some(timeout.map_or(until, |t| t.min(until)));
            }
            if let Some(iv) = &self.iv {
                let next = t0 + iv.every * (iv.index as u32 + 1);
                let until = next.saturating_duration_since(now);
                timeout = Some(timeout.map_or(until, |t| t.min(until)));
            }
            if !self.again.is_empty() {
                timeout = Some(Duration::ZERO);
            }
            let timeout = EpollTimeout::try_from(crate::sys::timeout_ms(timeout))
                .unwrap_or(EpollTimeout::NONE);
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => 0,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            for ev in &events[..n] {
                if ev.data() == STOP_TOKEN {
                    if crate::signals::stop_requested() {
                        self.interrupted();
                    } else if let Some(fd) = self.stop_fd {
                        // Not a stop request: empty the pipe, or it would wake us forever.
                        let mut b = [0u8; 64];
                        let _ = nix::unistd::read(fd, &mut b);
                    }
                    continue;
                }
                if ev.data() == TIMER_TOKEN {
                    if let Some((fd, armed)) = &mut self.timer {
                        let mut b = [0u8; 8];
                        let _ = nix::unistd::read(fd.as_fd(), &mut b);
                        *armed = None;
                    }
                    continue;
                }
                let i = ev.data() as usize;
                if i < self.slots.len() {
                    self.on_ready(i, now);
                }
            }
            while let Some((_, i)) = self.timers.pop_due(now) {
                self.slots[i].deadline = None;
                self.on_deadline(i, now);
            }
            self.check_give_up();
        }
        let stop = end.map_or_else(Instant::now, |e| e.min(Instant::now()));
        let elapsed = stop.saturating_duration_since(t0);
        self.flush_intervals(elapsed.as_secs_f64(), true);
        Ok(Outcome {
            ok: self.ok,
            bytes: self.bytes,
            errors: self.errors,
            reconnects: self.reconnects,
            latency: self.hist,
            elapsed,
            idle_established: self.idle.len() as u64,
            starved: self
                .slots
                .iter()
                .filter(|s| {
                    // Starved: it wanted an answer and got none. A slot that the budget
                    // ended before it asked (-n), or that an open loop never needed, did not.
                    // A closed-loop slot that tried to connect and was not finished by the
                    // budget wanted one too.
                    s.answered == 0
                        && (s.asked
                            || (self.interval == Duration::ZERO
                                && s.connected_once
                                && s.state != State::Finished))
                })
                .count() as u64,
            ended: Ended::Completed,
            intervals: Vec::new(),
        })
    }

    /// Whether nothing is left to do: no slots, or the request budget spent and nothing in
    /// flight.
    fn all_done(&self) -> bool {
        self.slots.is_empty()
            || (self.budget_spent()
                && self
                    .slots
                    .iter()
                    .all(|s| s.state != State::Busy && s.state != State::Connecting))
    }

    /// Take slots off the run queue (at most [`RUN_BATCH`]): a Ready slot sends its next
    /// request (closed loop), a Closed one reconnects if the connect budget allows (else
    /// `start_connects` will). Open loop: hand due requests to Ready slots.
    fn run_again(&mut self, now: Instant) {
        for _ in 0..RUN_BATCH {
            let Some(i) = self.again.pop_front() else {
                break;
            };
            match self.slots[i].state {
                State::Ready if self.interval == Duration::ZERO => self.send_request(i, now, None),
                State::Closed if self.connecting < CONNECT_BUDGET && !self.budget_spent() => {
                    self.connect(i, now)
                }
                _ => {}
            }
        }
        if self.interval > Duration::ZERO {
            self.dispatch_due(now);
        }
    }

    /// Open loop: make the timerfd fire when the next request falls due.
    fn arm_timer(&mut self, now: Instant) -> io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        let (Some(due), Some((fd, armed))) = (self.next_due, self.timer.as_mut()) else {
            return Ok(());
        };
        if *armed == Some(due) {
            return Ok(());
        }
        // A zero expiry would disarm the timer: fire in 1 ns instead.
        let wait = due
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        fd.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        )?;
        *armed = Some(due);
        Ok(())
    }

    fn set_deadline(&mut self, i: usize, at: Option<Instant>) {
        if let Some(old) = self.slots[i].deadline.take() {
            self.timers.remove(old, i);
        }
        if let Some(at) = at {
            self.timers.insert(at, i);
            self.slots[i].deadline = Some(at);
        }
    }

    /// Start connects for closed slots, at most `CONNECT_BUDGET` in progress.
    fn start_connects(&mut self, now: Instant) {
        for i in 0..self.slots.len() {
            if self.connecting >= CONNECT_BUDGET {
                return;
            }
            if self.slots[i].state != State::Closed {
                continue;
            }
            if self.budget_spent() {
                self.slots[i].state = State::Finished;
                continue;
            }
            self.connect(i, now);
        }
    }

    fn connect(&mut self, i: usize, now: Instant) {
        if self.spec.connect_per_request
            && self.interval == Duration::ZERO
            && self.slots[i].answer.is_none()
        {
            // Closed loop with a connection per request: the request is born with its
            // connection, so claim it now -- a connection opened for a request that another
            // connection then claims would be a connect with nothing to send.
            if !claim(self.spec, self.live) {
                self.slots[i].state = State::Finished;
                return;
            }
            let slot = &mut self.slots[i];
            slot.answer = Some(slot.reqs.next_request());
            slot.asked = true;
        }
        let s = match self.new_socket() {
            Ok(s) => s,
            Err(e) => return self.fail_io(i, &e, now),
        };
        if self.slots[i].connected_once {
            self.reconnects += 1;
        }
        self.slots[i].connected_once = true;
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        if let Err(e) = self.epoll.add(s.as_fd(), EpollEvent::new(flags, i as u64)) {
            return self.fail_io(i, &e.into(), now);
        }
        if self.spec.connect_per_request {
            // The connect is part of the request: latency counts from here.
            self.slots[i].started = Instant::now();
        }
        match s.connect(&self.spec.target) {
            Ok(()) => {
                self.slots[i].sock = Some(s);
                self.slots[i].state = State::Connecting;
                self.connecting += 1;
                self.connected(i, now);
            }
            // A Unix socket says EAGAIN when the server's backlog is full: no connect is in
            // progress then, it was refused.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.spec.target.is_unix() => {
                drop(s);
                self.fail_io(i, &io::ErrorKind::ConnectionRefused.into(), now);
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINPROGRESS)
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                self.slots[i].sock = Some(s);
                self.slots[i].state = State::Connecting;
                self.connecting += 1;
                self.set_deadline(i, Some(now + self.spec.timeout));
            }
            Err(e) => {
                drop(s);
                self.fail_io(i, &e, now);
            }
        }
    }

    fn connected(&mut self, i: usize, now: Instant) {
        self.connecting -= 1;
        self.slots[i].state = State::Ready;
        self.set_deadline(i, None);
        if self.interval == Duration::ZERO {
            self.send_request(i, now, None);
        } else {
            self.ready.push(i);
            self.dispatch_due(now);
        }
    }

    /// Begin a request on slot `i` (which is Ready). `due` is the open-loop due time.
    fn send_request(&mut self, i: usize, now: Instant, due: Option<Instant>) {
        if self.slots[i].answer.is_none() {
            // A fresh request (not one kept across a per-request reconnect).
            if !claim(self.spec, self.live) {
                let slot = &mut self.slots[i];
                slot.state = State::Finished;
                if let Some(s) = slot.sock.take() {
                    drop(s);
                }
                return;
            }
            let slot = &mut self.slots[i];
            slot.answer = Some(slot.reqs.next_request());
            slot.asked = true;
            // Open loop: latency counts from when the request fell due. Closed loop: from
            // now (read afresh: `now` is when the event batch began, and an answer read
            // later in the same batch would seem to take no time), or from the connect
            // when every request has its own connection.
            slot.started = due.unwrap_or_else(|| {
                if self.spec.connect_per_request {
                    slot.started
                } else {
                    Instant::now()
                }
            });
        }
        let slot = &mut self.slots[i];
        slot.sent = 0;
        slot.state = State::Busy;
        self.set_deadline(i, Some(now + self.spec.timeout));
        self.pump(i, now);
    }

    /// Send what remains of the request, then read and check what arrived.
    fn pump(&mut self, i: usize, now: Instant) {
        // Send.
        loop {
            let slot = &mut self.slots[i];
            let wire_len = slot.reqs.wire().len();
            if slot.sent >= wire_len {
                break;
            }
            let sock = slot.sock.as_ref().expect("busy slot has a socket");
            match sock.send_with_flags(&slot.reqs.wire()[slot.sent..], libc::MSG_NOSIGNAL) {
                Ok(n) => slot.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail_io(i, &e, now),
            }
        }
        // An empty answer is complete as soon as the request is out.
        if self.slots[i].sent >= self.slots[i].reqs.wire().len()
            && self.slots[i].answer.as_ref().is_some_and(|a| a.is_empty())
        {
            return self.complete(i, now, false);
        }
        // Receive.
        loop {
            let slot = &mut self.slots[i];
            let Some(sock) = slot.sock.as_ref() else {
                return;
            };
            let n = match crate::model::recv(sock, &mut self.buf, 0) {
                Ok(0) => {
                    self.errors.short += 1;
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    return self.drop_conn(i, now, true);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail_io(i, &e, now),
            };
            let Some(answer) = slot.answer.as_mut() else {
                // Bytes nobody asked for.
                return self.fail_mismatch(i, Mismatch::Wrong, now);
            };
            let (used, progress) = answer.feed(&self.buf[..n]);
            match progress {
                Progress::More => {}
                Progress::Bad(m) => return self.fail_mismatch(i, m, now),
                Progress::Done { close } => {
                    if used < n {
                        // The server sent more than the answer: it cannot be trusted.
                        return self.fail_mismatch(i, Mismatch::Wrong, now);
                    }
                    self.bytes += used as u64;
                    return self.complete(i, now, close);
                }
            }
            self.bytes += used as u64;
            if n < self.buf.len() {
                return; // drained: edge-triggered epoll reports the next arrival
            }
        }
    }

    fn complete(&mut self, i: usize, now: Instant, close: bool) {
        let slot = &mut self.slots[i];
        let us = Instant::now()
            .saturating_duration_since(slot.started)
            .as_micros()
            .max(1) as u64;
        let us = us.min(100_000_000);
        let _ = self.hist.record(us);
        if let Some(iv) = self.iv.as_mut() {
            let _ = iv.hist.record(us);
        }
        slot.answered += 1;
        self.ok += 1;
        self.live.ok.fetch_add(1, Ordering::Relaxed);
        slot.answer = None;
        slot.state = State::Ready;
        self.set_deadline(i, None);
        if close || self.spec.connect_per_request {
            // The client closes after the answer; the next request opens a new connection.
            return self.drop_conn(i, now, false);
        }
        if self.interval == Duration::ZERO {
            self.again.push_back(i);
        } else {
            self.ready.push(i);
        }
    }

    /// Close the slot's connection; reconnect at once (`pause` after an error: after a short
    /// back-off, so a dead server is not hammered).
    fn drop_conn(&mut self, i: usize, now: Instant, pause: bool) {
        let slot = &mut self.slots[i];
        if let Some(s) = slot.sock.take() {
            let _ = self.epoll.delete(s.as_fd());
        }
        if slot.state == State::Connecting {
            self.connecting -= 1;
        }
        if pause {
            // A failed request is spent: the next one is a new request.
            slot.answer = None;
            slot.state = State::Backoff;
            self.set_deadline(i, Some(now + BACKOFF));
        } else {
            slot.state = State::Closed;
            self.set_deadline(i, None);
            self.again.push_back(i);
        }
    }

    fn fail_io(&mut self, i: usize, e: &io::Error, now: Instant) {
        self.errors.count_io(e);
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.drop_conn(i, now, true);
    }

    fn fail_mismatch(&mut self, i: usize, m: Mismatch, now: Instant) {
        match m {
            Mismatch::Wrong => self.errors.wrong += 1,
            Mismatch::BadStatus => self.errors.bad_status += 1,
        }
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.drop_conn(i, now, true);
    }

    fn on_ready(&mut self, i: usize, now: Instant) {
        match self.slots[i].state {
            State::Connecting => {
                let sock = self.slots[i]
                    .sock
                    .as_ref()
                    .expect("connecting slot has a socket");
                match sock.take_error() {
                    Ok(None) if sock.peer_addr().is_ok() => self.connected(i, now),
                    Ok(None) => {} // not yet
                    Ok(Some(e)) | Err(e) => self.fail_io(i, &e, now),
                }
            }
            State::Busy => self.pump(i, now),
            State::Ready => {
                // Nothing asked, yet something happened: the server closed or sent junk.
                let sock = self.slots[i]
                    .sock
                    .as_ref()
                    .expect("ready slot has a socket");
                let mut b = [0u8; 1];
                match crate::model::recv(sock, &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The server closed an idle connection (e.g. its idle timeout): reconnect.
                    Ok(0) => self.drop_conn(i, now, false),
                    Ok(_) => self.fail_mismatch(i, Mismatch::Wrong, now),
                    Err(e) => self.fail_io(i, &e, now),
                }
            }
            State::Closed | State::Backoff | State::Finished => {}
        }
    }

    fn on_deadline(&mut self, i: usize, now: Instant) {
        match self.slots[i].state {
            State::Connecting | State::Busy => {
                self.errors.timeout += 1;
                self.live.errors.fetch_add(1, Ordering::Relaxed);
                self.drop_conn(i, now, true);
            }
            State::Backoff => {
                self.slots[i].state = State::Closed;
            }
            _ => {}
        }
    }

    /// Open loop: queue the requests that have fallen due and hand them to ready slots.
    fn open_loop_tick(&mut self, now: Instant) {
        let Some(mut due) = self.next_due else { return };
        while due <= now {
            if self.budget_spent() {
                self.next_due = None;
                break;
            }
            self.due.push_back(due);
            due += self.interval;
            self.next_due = Some(due);
        }
        self.dispatch_due(now);
    }

    fn dispatch_due(&mut self, now: Instant) {
        while let Some(&due) = self.due.front() {
            let Some(i) = self.ready.pop() else { return };
            if self.slots[i].state != State::Ready {
                continue; // it failed or closed since it was listed
            }
            self.due.pop_front();
            self.send_request(i, now, Some(due));
        }
    }
}
