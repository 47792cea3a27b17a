//! `uring`: `--workers` io_uring loops on as many threads, each with a listener of its own on
//! the same port (`SO_REUSEPORT`, as the [`reactors`](super::reactors)). Where the other event
//! loops ask the kernel "which sockets are ready?" and then make one system call per
//! operation, this one hands the kernel the operations themselves and collects their results:
//! Linux's asynchronous I/O, the answer to the course's remark that `aio_read`/`aio_write`
//! are a weak point of Linux (glibc runs them in a user-space thread).
//!
//! ```text
//! ring = io_uring_setup(SINGLE_ISSUER | DEFER_TASKRUN); register a ring of receive buffers
//! submit: multishot accept(listener), poll(signal pipe)
//! loop:
//!     submit what was queued, wait for >= 1 completion or the nearest deadline  (1 syscall)
//!     for each completion:
//!         accept -> new connection: multishot receive on it
//!         receive -> feed the bytes (in a ring buffer) to the session, give the buffer back;
//!                    0 = end of file; ENOBUFS = the buffers ran out: re-armed below
//!         send    -> account for what went, send the next piece (one send in flight)
//!         signal  -> stop accepting, finish in-flight requests, close idle ones
//!     for each connection touched: start its next send, pause or resume its receive,
//!                                  close it when done
//!     handle the deadlines due (idle timeout, HTTP head deadline -> 408, grace period)
//! ```
//!
//! Details that matter:
//! - A multishot operation posts completions until one comes without the "more" flag: then
//!   it has ended (error, end of file, buffers ran out, or the completion queue overflowed)
//!   and is armed again if still wanted. Data is never lost: what the kernel did not put in
//!   a buffer is still in the socket.
//! - Output is bounded per connection as in the other loops: while more than
//!   [`OUTPUT_BOUND`] bytes wait to be sent, the receive is cancelled (what arrives before the
//!   cancellation lands is held and fed first when reading resumes).
//! - A connection is freed only when no operation of its is in flight: the kernel may be
//!   reading its output buffers until then.
//! - Unix socket paths cannot be shared with `SO_REUSEPORT`: the loops then share one
//!   listener, each with its own multishot accept on it.
//!
//! If io_uring is not available (no kernel support, `kernel.io_uring_disabled`, a seccomp
//! filter), `socklab serve --model uring` stops at start with one line saying so ([`probe`]);
//! it never falls back to another design.

mod bufring;
mod conn;
mod ring;

use crate::model::evloop::{Parking, Slab, TimerKey};
use crate::model::{accept_action, AcceptAction, Ctx, End, Slot};
use crate::net::{ListenOptions, Listener};
use crate::signals::{self, Signals};
use crate::timer::Timers;
use bufring::BufRing;
use conn::Conn;
use io_uring::cqueue;
use ring::{tag, Done, Op, Ring};
use socket2::Socket;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

/// While a connection has more than this many bytes waiting to be sent, it is not read.
pub const OUTPUT_BOUND: usize = 256 * 1024;
/// Submission queue entries per loop (completions: 16 times as many).
const RING_ENTRIES: u16 = 512;
/// Receive buffers per loop, and their size: 4 MiB of buffers per loop.
const BUFFERS: u16 = 256;
const BUFFER_SIZE: usize = 16 * 1024;
/// How long an answer queued on the way out (an HTTP 408) may take before the connection is
/// closed anyway.
const FINISH_LIMIT: Duration = Duration::from_secs(1);
/// After the loop ends, how long to wait for the kernel to finish cancelled operations.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// A power of two up to 32768 from the environment variable `name`, or `default`: how
/// `SOCKLAB_URING_BUFFERS` (receive buffers per loop) and `SOCKLAB_URING_ENTRIES`
/// (submission entries per loop; completions: 16 times as many) let a test run the loop
/// short of buffers and with a completion queue that overflows.
fn tunable(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u16>().ok())
        .filter(|n| n.is_power_of_two() && *n <= 1 << 15)
        .unwrap_or(default)
}

/// Check that this system lets us run io_uring loops: a ring can be set up and a buffer ring
/// registered, on Linux 6.0 or later (multishot receive).
///
/// # Errors
/// One line saying why not and naming the alternative.
pub fn probe() -> Result<(), String> {
    let ring = Ring::new(8).map_err(|e| ring::unavailable(&e))?;
    BufRing::new(&ring.uring, 1, 64, 0).map_err(|e| ring::unavailable(&e))?;
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|x| x.parse::<u32>().unwrap_or(0));
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (6, 0) {
        return Err(format!(
            "io_uring here lacks multishot receive (Linux {release}; 6.0 or later needed); use --model reactors"
        ));
    }
    Ok(())
}

/// Serve with `ctx.opts.workers` io_uring loops until a stop request. `listener` must have been
/// opened with `SO_REUSEPORT` (see [`ListenOptions::reuse_port`]) for an IP endpoint.
///
/// # Errors
/// Opening the sibling listeners, setting up a ring, or a loop's fatal error.
pub fn run(
    listener: &Listener,
    ctx: &Ctx,
    signals: &Signals,
    opts: ListenOptions,
) -> io::Result<()> {
    crate::model::reactors::on_each_listener(listener, ctx.opts.workers, opts, "uring", |l, _| {
        run_loop(l, ctx, signals)
    })
}

/// One io_uring loop on `listener` until a stop request (and the connections it had are done
/// or the grace period is over).
///
/// # Errors
/// Setting up the ring, or a fatal error of the ring or the listener.
pub fn run_loop(listener: &Socket, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let mut lp = Loop::new(ctx, listener.as_raw_fd(), signals.fd())?;
    lp.ring.accept(lp.listener)?;
    lp.accept_armed = true;
    lp.ring.poll_in(lp.signal.as_raw_fd())?;
    let mut done = Vec::new();
    let result = (|| {
        while !lp.finished() {
            lp.ring.wait(lp.timers.timeout(Instant::now()), &mut done)?;
            let now = Instant::now();
            let mut signal = false;
            for d in &done {
                match d.op {
                    Some(Op::Accept) => lp.accepted(d, now)?,
                    Some(Op::Signal) => signal = true,
                    Some(Op::Recv) => lp.received(d, now),
                    Some(Op::Send) => lp.sent(d, now),
                    Some(Op::Cancel) | None => {}
                }
            }
            // After the rest of the batch: connections accepted and bytes received in the
            // same turn as a stop request are served like those before it.
            if signal {
                lp.signalled(signals, listener, now)?;
            }
            lp.expire(now)?;
            lp.pump_touched();
            if lp.grace_over {
                lp.close_all(now);
            }
        }
        Ok(())
    })();
    lp.shut_down();
    result
}

/// The state of one loop. `ring` is declared before `bufs`: it is dropped first, so the
/// kernel is done with the buffers before they are unmapped.
struct Loop<'a> {
    ctx: &'a Ctx,
    ring: Ring,
    bufs: BufRing,
    conns: Slab<Conn<'a>>,
    /// Ordered deadlines: idle timeouts, HTTP head deadlines, accept resumption, grace.
    timers: Timers<TimerKey>,
    /// Connections over `--max-conns` waiting a moment for a slot.
    parking: Parking,
    idle: Option<Duration>,
    listener: RawFd,
    signal: BorrowedFd<'a>,
    next_gen: u32,
    /// Connections are wanted (not stopping, not paused for lack of descriptors).
    accepting: bool,
    accept_armed: bool,
    stopping: bool,
    /// The grace period is over: close every connection.
    grace_over: bool,
    /// They were closed: their operations are being cancelled.
    cut_off: bool,
    /// Cancelled operations did not finish in time either: leave the loop anyway.
    abandon: bool,
    /// Connections to look at once this turn's completions are handled.
    touched: Vec<usize>,
}

impl<'a> Loop<'a> {
    fn new(ctx: &'a Ctx, listener: RawFd, signal: BorrowedFd<'a>) -> io::Result<Loop<'a>> {
        let entries = tunable("SOCKLAB_URING_ENTRIES", RING_ENTRIES);
        let ring =
            Ring::new(entries.into()).map_err(|e| io::Error::other(ring::unavailable(&e)))?;
        let bufs = BufRing::new(
            &ring.uring,
            tunable("SOCKLAB_URING_BUFFERS", BUFFERS),
            BUFFER_SIZE,
            0,
        )?;
        Ok(Loop {
            ctx,
            ring,
            bufs,
            conns: Slab::new(),
            timers: Timers::new(),
            parking: Parking::default(),
            idle: Some(ctx.opts.idle_timeout).filter(|d| !d.is_zero()),
            listener,
            signal,
            next_gen: 0,
            accepting: true,
            accept_armed: false,
            stopping: false,
            grace_over: false,
            cut_off: false,
            abandon: false,
            touched: Vec::new(),
        })
    }

    /// Whether the loop may end: stopping, and every connection freed (or, after the grace
    /// period, their cancelled operations not finished within [`DRAIN_LIMIT`]).
    fn finished(&self) -> bool {
        self.stopping && (self.conns.is_empty() || self.abandon)
    }

    /// Look at connection `t` again at the end of this turn.
    fn touch(&mut self, t: usize) {
        if let Some(c) = self.conns.get_mut(t) {
            if !c.touched {
                c.touched = true;
                self.touched.push(t);
            }
        }
    }

    /// An accept completed: a new connection (or an error, handled as every model does).
    fn accepted(&mut self, d: &Done, now: Instant) -> io::Result<()> {
        if !cqueue::more(d.flags) {
            self.accept_armed = false;
        }
        if d.res >= 0 {
            // Accepted before a stop took effect: served like the others (closed at once if
            // it sent nothing).
            let sock = ring::adopt(d.res);
            let Ok(peer) = sock.peer_addr() else {
                return self.arm_accept(); // reset by its peer already: nothing to serve
            };
            self.admit(sock, &peer, now);
        } else if !self.stopping {
            let err = io::Error::from_raw_os_error(-d.res);
            match accept_action(&err) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause(p) => {
                    self.accepting = false;
                    self.timers.insert(now + p, TimerKey::ResumeAccept);
                    if self.accept_armed {
                        self.ring.cancel(tag(Op::Accept, 0, 0))?;
                    }
                }
                AcceptAction::Fatal => return Err(err),
            }
        }
        self.arm_accept()
    }

    /// Arm the multishot accept again if it ended and connections are wanted.
    fn arm_accept(&mut self) -> io::Result<()> {
        if self.accepting && !self.stopping && !self.accept_armed {
            self.ring.accept(self.listener)?;
            self.accept_armed = true;
        }
        Ok(())
    }

    /// Take a new connection from `peer` into the loop, within `--max-conns`. (The
    /// multishot accept does not return the peer's address: the caller asks the socket.)
    fn admit(&mut self, sock: Socket, peer: &socket2::SockAddr, now: Instant) {
        if peer.is_ipv4() || peer.is_ipv6() {
            // Answers are small and written whole: do not let Nagle hold them back.
            let _ = sock.set_tcp_nodelay(true);
        }
        match self.ctx.try_admit(peer) {
            Some(slot) => self.register(sock, slot, now),
            None => self.parking.park(
                self.ctx,
                sock,
                peer.clone(),
                now,
                self.stopping,
                &mut self.timers,
            ),
        }
    }

    /// Open the session of an admitted connection; it is served from the end of the turn.
    fn register(&mut self, sock: Socket, slot: Slot<'a>, now: Instant) {
        self.next_gen = (self.next_gen + 1) & 0xff_ffff;
        let conn = match Conn::new(sock, slot, self.ctx, self.next_gen, now) {
            Ok(c) => c,
            Err((end, slot)) => return end.log(&slot.peer),
        };
        let t = self.conns.insert(conn);
        if let Some(i) = self.idle {
            self.set_deadline(t, now + i);
        }
        self.touch(t);
    }

    /// The signal pipe is readable: on a stop request, stop accepting and let the
    /// connections finish; any other signal is not ours (drain it, watch again).
    fn signalled(&mut self, signals: &Signals, listener: &Socket, now: Instant) -> io::Result<()> {
        if !signals::stop_requested() {
            signals.drain();
            return self.ring.poll_in(self.signal.as_raw_fd());
        }
        // The pipe stays unread so that every loop's poll sees it.
        self.stopping = true;
        self.accepting = false;
        if self.accept_armed {
            self.ring.cancel(tag(Op::Accept, 0, 0))?;
        }
        // Connections the kernel completed before the stop are served like the others
        // (the multishot accept may not have reported them yet); then the listener refuses.
        loop {
            match crate::model::accept(listener, true) {
                Ok((sock, peer)) => self.admit(sock, &peer, now),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        crate::model::stop_listening(listener);
        self.timers
            .insert(now + self.ctx.opts.grace, TimerKey::Grace);
        for t in self.conns.tokens() {
            self.touch(t);
        }
        Ok(())
    }

    /// A receive completed: bytes in a ring buffer, end of file, or why it ended.
    fn received(&mut self, d: &Done, now: Instant) {
        let bid = cqueue::buffer_select(d.flags);
        let live = self.conns.get_mut(d.token).filter(|c| c.gen == d.gen);
        let Some(c) = live else {
            if let Some(b) = bid {
                self.bufs.recycle(b);
            }
            return;
        };
        if !cqueue::more(d.flags) {
            c.recv_armed = false;
            c.recv_cancelled = false;
        }
        let mut end = None;
        if d.res > 0 {
            c.last_active = now;
            match bid.and_then(|b| self.bufs.get(b, d.res as usize)) {
                None => end = Some(End::Io(io::Error::other("receive without a valid buffer"))),
                Some(_) if c.closing => {}
                Some(data) if c.recv_cancelled || !c.held.is_empty() => {
                    c.held.extend_from_slice(data)
                }
                Some(data) => end = c.feed(data).err(),
            }
        } else if d.res == 0 {
            c.last_active = now;
            end = c.end_of_input().err();
        } else {
            match -d.res {
                libc::ENOBUFS => {
                    tracing::debug!(peer = %c.peer(), "receive buffers ran out: receive re-armed");
                }
                libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                errno => end = Some(End::Io(io::Error::from_raw_os_error(errno))),
            }
        }
        if let Some(b) = bid {
            self.bufs.recycle(b);
        }
        match end {
            Some(end) => self.close(d.token, end),
            None => {
                self.watch(d.token);
                self.touch(d.token);
            }
        }
    }

    /// A connection's output operation completed.
    fn sent(&mut self, d: &Done, now: Instant) {
        let Some(c) = self.conns.get_mut(d.token).filter(|c| c.gen == d.gen) else {
            return;
        };
        if c.closing {
            c.output_abandoned();
        } else {
            if d.res > 0 {
                c.last_active = now;
            }
            if let Err(e) = c.output_completed(d.res, &mut self.ring, d.token) {
                self.close(d.token, End::Io(e));
                return;
            }
        }
        self.touch(d.token);
    }

    /// Look at every connection touched this turn.
    fn pump_touched(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        for &t in &touched {
            if let Some(c) = self.conns.get_mut(t) {
                c.touched = false;
            }
            self.pump(t);
        }
        self.touched = touched;
        self.touched.clear();
    }

    /// Move connection `t` along: feed input held back, start its next send, close it when
    /// done, and receive while its output is below the bound.
    fn pump(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if c.closing {
            self.free_if_quiet(t);
            return;
        }
        if !c.held.is_empty() && !c.recv_cancelled && c.pending_out() < OUTPUT_BOUND {
            // Reading resumes: what arrived meanwhile goes first.
            let held = std::mem::take(&mut c.held);
            let fed = c.feed(&held);
            c.held = held;
            c.held.clear();
            if let Err(end) = fed {
                return self.close(t, end);
            }
            self.watch(t);
        }
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if let Err(e) = c.start_output(&mut self.ring, t) {
            return self.close(t, End::Io(e));
        }
        if c.output_done() && c.has_backlog() {
            // Requests waited for the output to drain (it just did): the next batch.
            if let Err(end) = c.resume() {
                return self.close(t, end);
            }
            if let Err(e) = c.start_output(&mut self.ring, t) {
                return self.close(t, End::Io(e));
            }
        }
        if c.output_done() {
            if let Some(end) = c.finishing.take() {
                return self.close(t, end);
            }
            if c.eof || c.session.done() {
                return self.close(t, End::Closed);
            }
            if self.stopping && !c.session.mid_request() && c.held.is_empty() && !c.input_waiting()
            {
                return self.close(t, End::Shutdown);
            }
        }
        let want = !c.eof
            && !c.has_backlog()
            && !c.session.done()
            && c.finishing.is_none()
            && c.held.is_empty()
            && c.pending_out() < OUTPUT_BOUND;
        let (fd, gen) = (c.sock.as_raw_fd(), c.gen);
        let r = if want && !c.recv_armed {
            c.recv_armed = true;
            self.ring.recv(fd, self.bufs.group(), t, gen)
        } else if !want && c.recv_armed && !c.recv_cancelled {
            // Output is backing up (or no more input is wanted): stop receiving.
            c.recv_cancelled = true;
            self.ring.cancel(tag(Op::Recv, t, gen))
        } else {
            Ok(())
        };
        if let Err(e) = r {
            self.close(t, End::Io(e));
        }
    }

    /// Start closing connection `t`: log why, cancel its operations, free it once none is
    /// in flight.
    fn close(&mut self, t: usize, end: End) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if c.closing {
            return;
        }
        c.closing = true;
        end.log(c.peer());
        if let Some(d) = c.deadline.take() {
            self.timers.remove(d, TimerKey::Conn(t));
        }
        if c.recv_armed || !c.send_idle() {
            let fd = c.sock.as_raw_fd();
            if let Err(e) = self.ring.cancel_fd(fd) {
                tracing::warn!("cannot cancel a closing connection's operations: {e}");
            }
        }
        self.free_if_quiet(t);
    }

    /// Free a closing connection (closing its socket) once no operation of its is in flight.
    fn free_if_quiet(&mut self, t: usize) {
        if self
            .conns
            .get_mut(t)
            .is_some_and(|c| c.closing && !c.recv_armed && c.send_idle())
        {
            self.conns.remove(t);
        }
    }

    /// Queue `at` as connection `t`'s deadline, replacing the one it had.
    fn set_deadline(&mut self, t: usize, at: Instant) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if let Some(old) = c.deadline.replace(at) {
            self.timers.remove(old, TimerKey::Conn(t));
        }
        self.timers.insert(at, TimerKey::Conn(t));
    }

    /// After input was fed: if the session now has a deadline earlier than the one queued
    /// (an HTTP request head started arriving), queue that one instead.
    fn watch(&mut self, t: usize) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        match c.session.deadline() {
            Some(d) if c.deadline.is_none_or(|q| d < q) => self.set_deadline(t, d),
            _ => {}
        }
    }

    /// Handle the deadlines due at `now`.
    fn expire(&mut self, now: Instant) -> io::Result<()> {
        while let Some((_, key)) = self.timers.pop_due(now) {
            let t = match key {
                TimerKey::ResumeAccept => {
                    if !self.stopping {
                        self.accepting = true;
                        self.arm_accept()?;
                    }
                    continue;
                }
                TimerKey::Grace => {
                    if self.cut_off {
                        self.abandon = true;
                    } else {
                        self.grace_over = true;
                    }
                    continue;
                }
                TimerKey::Conn(t) => t,
                TimerKey::Admit => {
                    self.parking.timer_fired();
                    let admitted =
                        self.parking
                            .unpark(self.ctx, now, self.stopping, &mut self.timers);
                    for (sock, slot) in admitted {
                        self.register(sock, slot, now);
                    }
                    continue;
                }
            };
            let idle = self.idle;
            let Some(c) = self.conns.get_mut(t) else {
                continue;
            };
            c.deadline = None; // popped: nothing left to remove
            if c.closing {
                continue;
            }
            if let Some(end) = c.finishing.take() {
                // Its last answer did not get out in time.
                self.close(t, end);
                continue;
            }
            if c.session.deadline().is_some_and(|d| d <= now) {
                // The session's own deadline (HTTP: 408): sent, then the connection closes.
                if let Err(end) = c.deadline_passed() {
                    self.close(t, end);
                    continue;
                }
                c.finishing = Some(End::Deadline);
                self.set_deadline(t, now + FINISH_LIMIT);
                self.touch(t);
                continue;
            }
            let idle_due = idle.map(|i| c.last_active + i);
            if idle_due.is_some_and(|d| d <= now) {
                self.close(t, End::IdleTimeout);
                continue;
            }
            let next = match (idle_due, c.session.deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(next) = next {
                self.set_deadline(t, next);
            }
        }
        Ok(())
    }

    /// The grace period is over: close every connection left, and give their operations
    /// [`DRAIN_LIMIT`] to finish.
    fn close_all(&mut self, now: Instant) {
        let left: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(t, _)| t)
            .collect();
        if !left.is_empty() {
            tracing::warn!(
                open = left.len(),
                "grace period over: closing remaining connections"
            );
        }
        for t in left {
            self.close(t, End::Shutdown);
        }
        self.grace_over = false;
        self.cut_off = true;
        self.timers.insert(now + DRAIN_LIMIT, TimerKey::Grace);
    }

    /// The loop is over: cancel what is still in flight and wait (a bounded time) for the
    /// kernel to finish with our memory. If it does not, the buffers and connections are
    /// leaked rather than freed under the kernel's hands.
    fn shut_down(mut self) {
        for t in self.conns.tokens() {
            self.close(t, End::Shutdown);
        }
        if self.ring.in_flight > 0 {
            let _ = self.ring.cancel_all();
        }
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut done = Vec::new();
        while self.ring.in_flight > 0 {
            let now = Instant::now();
            let waited = if now < deadline {
                self.ring.wait(Some(deadline - now), &mut done)
            } else {
                Err(io::ErrorKind::TimedOut.into())
            };
            if let Err(e) = waited {
                tracing::warn!(
                    in_flight = self.ring.in_flight,
                    "io_uring operations did not finish ({e}): leaking their buffers"
                );
                let Loop {
                    ring, bufs, conns, ..
                } = self;
                drop(ring);
                std::mem::forget(bufs);
                std::mem::forget(conns);
                return;
            }
            for d in &done {
                if let (Some(Op::Recv), Some(b)) = (d.op, cqueue::buffer_select(d.flags)) {
                    self.bufs.recycle(b);
                }
            }
        }
    }
}
