//! What the event-loop designs (`select`, `poll`, `epoll`, `reactors`) share: a connection's
//! state and the one function that moves its bytes when the socket is ready, a slab of
//! connections indexed by token, and the idle-timeout and shutdown bookkeeping; and what the
//! two loops that rebuild their descriptor list every round (`select`, `poll`) do alike once
//! readiness is known ([`drive_level`], [`accept_batch`], [`stop_level`]).
//!
//! The loops differ only in how they learn readiness (`select` fills bit sets and `poll` an
//! array each round, `epoll` keeps an interest list in the kernel) and in edge vs level
//! triggering.

use crate::model::{accept, accept_action, contain, AcceptAction, Ctx, End, Slot, ADMIT_WAIT};
use crate::output::{Flush, Outbox};
use crate::service::Session;
use crate::signals;
use crate::timer::Timers;
use socket2::{SockAddr, Socket};
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

/// Which events a connection wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Wants to know when input arrives.
    pub read: bool,
    /// Has output waiting for room in the send buffer.
    pub write: bool,
}

/// One connection of an event loop.
#[derive(Debug)]
pub struct Conn<'a> {
    /// The non-blocking socket.
    pub sock: Socket,
    slot: Slot<'a>,
    session: Session,
    out: Outbox,
    /// Input may be waiting in the kernel. With edge triggering it stays set until a read
    /// returns `EAGAIN`: the kernel will not say it again.
    readable: bool,
    /// The peer sent end-of-file.
    eof: bool,
    /// The kernel reported the peer's FIN or an error with the last readiness: read on until
    /// end-of-file even after a short read.
    hangup: bool,
    /// When the connection last moved bytes: input read, or output accepted by the peer
    /// (for the idle timeout: a peer that reads nothing while answers wait is idle).
    pub last_active: Instant,
    /// The deadline this connection has queued in the timers, if any.
    pub deadline: Option<Instant>,
    /// The interest last registered with the kernel (level-triggered epoll, poll).
    pub registered: Interest,
}

/// What happened when a connection was driven.
#[derive(Debug)]
pub enum Step {
    /// Keep the connection, with this interest.
    Keep(Interest),
    /// Close it, for this reason.
    Close(End),
}

impl<'a> Conn<'a> {
    /// A new connection: the session opens (daytime queues its line here).
    ///
    /// # Errors
    /// [`End::Panic`] if opening the session panicked (the connection is then dropped,
    /// closing it and releasing its slot).
    pub fn new(
        sock: Socket,
        slot: Slot<'a>,
        ctx: &Ctx,
        now: Instant,
    ) -> Result<Conn<'a>, (End, Slot<'a>)> {
        let mut out = ctx.service.outbox();
        let session = match contain(|| ctx.service.open(&mut out)) {
            Ok(s) => s,
            Err(end) => return Err((end, slot)),
        };
        Ok(Conn {
            sock,
            slot,
            session,
            out,
            readable: true,
            eof: false,
            hangup: false,
            last_active: now,
            deadline: None,
            registered: Interest {
                read: true,
                write: false,
            },
        })
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> &str {
        &self.slot.peer
    }

    /// The kernel said the socket is readable; `hangup` when it also reported the peer's
    /// FIN (`EPOLLRDHUP`/`POLLHUP`) or an error.
    pub fn set_readable(&mut self, hangup: bool) {
        self.readable = true;
        self.hangup |= hangup;
    }

    /// Whether the connection can be closed without cutting a request: nothing half-received,
    /// nothing waiting to be sent.
    pub fn idle(&self) -> bool {
        !self.session.mid_request() && self.out.is_empty()
    }

    /// Move bytes: send queued output, read what arrived and feed the session, until the
    /// socket would block or the connection is finished. `edge` reads until `EAGAIN` (edge
    /// triggering reports readiness once); otherwise one read per readiness report, so a
    /// busy connection cannot starve the others. A panic in the session is contained here
    /// ([`contain`]): that connection is closed, the loop goes on.
    pub fn drive(&mut self, buf: &mut [u8], edge: bool, now: Instant) -> Step {
        contain(|| self.drive_inner(buf, edge, now)).unwrap_or_else(Step::Close)
    }

    fn drive_inner(&mut self, buf: &mut [u8], edge: bool, now: Instant) -> Step {
        let mut reads = 0;
        loop {
            let before = self.out.pending();
            match self.out.flush(&self.sock) {
                Ok(Flush::Done) => {
                    if before > 0 {
                        self.last_active = now;
                    }
                }
                Ok(Flush::Blocked) => {
                    // The peer is not reading: read nothing more from it until it does (the
                    // server's memory stays bounded), and ask only for writability -- a
                    // level-triggered loop still asking for input would be woken again and
                    // again for input it will not read, and spin. Only bytes the peer took
                    // count as activity: one that takes none is cut at the idle timeout.
                    if self.out.pending() < before {
                        self.last_active = now;
                    }
                    return Step::Keep(Interest {
                        read: false,
                        write: true,
                    });
                }
                Err(e) => return Step::Close(End::Io(e)),
            }
            if self.session.has_backlog() {
                // Requests waited for the output to drain (it just did): the next batch.
                self.session.resume(&mut self.out);
                continue;
            }
            if self.eof || self.session.done() {
                return Step::Close(End::Closed);
            }
            if signals::stop_requested() && !self.session.mid_request() && !self.readable {
                return Step::Close(End::Shutdown);
            }
            if !self.readable || (!edge && reads > 0) {
                return Step::Keep(Interest {
                    read: true,
                    write: false,
                });
            }
            match crate::model::recv(&self.sock, buf, 0) {
                Ok(0) => {
                    self.eof = true;
                    self.last_active = now;
                    if let Err(e) = self.session.end_of_input() {
                        return Step::Close(End::Protocol(e));
                    }
                }
                Ok(n) => {
                    reads += 1;
                    self.last_active = now;
                    if let Err(e) = self.session.receive(&buf[..n], &mut self.out) {
                        return Step::Close(End::Protocol(e));
                    }
                    // Level triggering will report the rest: this read was our turn. With
                    // edge triggering a short read also proves the receive queue was empty,
                    // and anything arriving later raises a new edge, so the read that would
                    // only return EAGAIN can be skipped (one syscall less per request) --
                    // unless the FIN was already reported with this edge: then read on to
                    // the end-of-file, which no new edge would announce.
                    if !edge || (n < buf.len() && !self.hangup) {
                        self.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Step::Close(End::Io(e)),
            }
        }
    }
}

/// Connections indexed by a small integer token (the `epoll` data / `poll` slot).
#[derive(Debug, Default)]
pub struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Slab<T> {
    /// An empty slab.
    pub fn new() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Store `item`, returning its token.
    pub fn insert(&mut self, item: T) -> usize {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(item);
            i
        } else {
            self.items.push(Some(item));
            self.items.len() - 1
        }
    }

    /// Take the item with `token` out.
    pub fn remove(&mut self, token: usize) -> Option<T> {
        let item = self.items.get_mut(token)?.take();
        if item.is_some() {
            self.len -= 1;
            self.free.push(token);
        }
        item
    }

    /// The item with `token`, to read.
    pub fn get(&self, token: usize) -> Option<&T> {
        self.items.get(token)?.as_ref()
    }

    /// The item with `token`.
    pub fn get_mut(&mut self, token: usize) -> Option<&mut T> {
        self.items.get_mut(token)?.as_mut()
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slab is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens of every item.
    pub fn tokens(&self) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| self.items[i].is_some())
            .collect()
    }

    /// Every item with its token.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.items
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.as_ref().map(|x| (i, x)))
    }
}

/// Timer keys of an event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKey {
    /// A connection's idle deadline.
    Conn(usize),
    /// Accepting resumes (after descriptors ran out).
    ResumeAccept,
    /// The grace period after a stop request is over.
    Grace,
    /// Connections waiting for a slot are looked at again.
    Admit,
}

/// At most this many connections over `--max-conns` wait for a slot in one loop; more are
/// closed at once.
pub const MAX_PARKED: usize = 64;

/// How often a loop looks again at connections waiting for a slot.
const ADMIT_RETRY: Duration = Duration::from_millis(2);

/// Connections accepted over `--max-conns`, each waiting up to [`ADMIT_WAIT`] for a slot:
/// the count lags a client's close by a loop's turn or another loop's. Every event loop
/// keeps one (the readiness loops in their [`Book`], the io_uring loops beside theirs).
#[derive(Debug, Default)]
pub struct Parking {
    parked: VecDeque<(Socket, SockAddr, Instant)>,
    /// When the queued [`TimerKey::Admit`] deadline is.
    timer: Option<Instant>,
}

impl Parking {
    /// Let a connection over the limit wait for a slot, or close it at once if
    /// [`MAX_PARKED`] already wait or the loop is `stopping`.
    pub fn park(
        &mut self,
        ctx: &Ctx,
        sock: Socket,
        peer: SockAddr,
        now: Instant,
        stopping: bool,
        timers: &mut Timers<TimerKey>,
    ) {
        if self.parked.len() >= MAX_PARKED || stopping {
            ctx.refuse(&peer);
            return;
        }
        self.parked.push_back((sock, peer, now + ADMIT_WAIT));
        self.arm(now, timers);
    }

    fn arm(&mut self, now: Instant, timers: &mut Timers<TimerKey>) {
        if self.timer.is_none() {
            let at = now + ADMIT_RETRY;
            timers.insert(at, TimerKey::Admit);
            self.timer = Some(at);
        }
    }

    /// Its [`TimerKey::Admit`] deadline was popped.
    pub fn timer_fired(&mut self) {
        self.timer = None;
    }

    /// Admit the waiting connections that now find a slot (returned, for the loop to
    /// register), close those whose wait is over, and look again soon at the rest.
    pub fn unpark<'a>(
        &mut self,
        ctx: &'a Ctx,
        now: Instant,
        stopping: bool,
        timers: &mut Timers<TimerKey>,
    ) -> Vec<(Socket, Slot<'a>)> {
        let mut admitted = Vec::new();
        for (sock, peer, deadline) in std::mem::take(&mut self.parked) {
            match ctx.try_admit(&peer) {
                Some(slot) => admitted.push((sock, slot)),
                None if deadline <= now || stopping => ctx.refuse(&peer),
                None => self.parked.push_back((sock, peer, deadline)),
            }
        }
        if !self.parked.is_empty() {
            self.arm(now, timers);
        }
        admitted
    }
}

/// The idle-timeout and shutdown bookkeeping every event loop does the same way.
#[derive(Debug)]
pub struct Book<'a> {
    /// The connections.
    pub conns: Slab<Conn<'a>>,
    /// Ordered deadlines: idle timeouts, accept resumption, end of grace.
    pub timers: Timers<TimerKey>,
    idle: Option<Duration>,
    /// Set once a stop was requested and handled.
    pub stopping: bool,
    /// The grace period is over: close everything.
    pub grace_over: bool,
    /// Connections accepted over `--max-conns`, waiting for a slot.
    parking: Parking,
}

impl<'a> Book<'a> {
    /// Bookkeeping for a loop with `ctx`'s idle timeout.
    pub fn new(ctx: &Ctx) -> Self {
        Book {
            conns: Slab::new(),
            timers: Timers::new(),
            idle: Some(ctx.opts.idle_timeout).filter(|d| !d.is_zero()),
            stopping: false,
            grace_over: false,
            parking: Parking::default(),
        }
    }

    /// A connection over `--max-conns`: let it wait for a slot (see [`Parking::park`]).
    pub fn park(&mut self, ctx: &Ctx, sock: Socket, peer: SockAddr, now: Instant) {
        self.parking
            .park(ctx, sock, peer, now, self.stopping, &mut self.timers);
    }

    /// The waiting connections that now find a slot (see [`Parking::unpark`]).
    pub fn unpark(&mut self, ctx: &'a Ctx, now: Instant) -> Vec<(Socket, Slot<'a>)> {
        self.parking
            .unpark(ctx, now, self.stopping, &mut self.timers)
    }

    /// Add a connection and queue its idle deadline; returns its token.
    pub fn add(&mut self, mut conn: Conn<'a>, now: Instant) -> usize {
        let deadline = self.idle.map(|d| now + d);
        conn.deadline = deadline;
        let token = self.conns.insert(conn);
        if let Some(d) = deadline {
            self.timers.insert(d, TimerKey::Conn(token));
        }
        token
    }

    /// After a connection was driven: if its session now has a deadline earlier than the
    /// one queued (an HTTP request head started arriving), queue that one instead.
    pub fn watch(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let Some(d) = conn.session.deadline() else {
            return;
        };
        if conn.deadline.is_some_and(|q| q <= d) {
            return;
        }
        if let Some(old) = conn.deadline.replace(d) {
            self.timers.remove(old, TimerKey::Conn(token));
        }
        self.timers.insert(d, TimerKey::Conn(token));
    }

    /// Remove a connection (closing its socket) and its deadline, logging why it ended.
    pub fn close(&mut self, token: usize, end: End) -> Option<Conn<'a>> {
        let conn = self.conns.remove(token)?;
        if let Some(d) = conn.deadline {
            self.timers.remove(d, TimerKey::Conn(token));
        }
        end.log(conn.peer());
        Some(conn)
    }

    /// The wait timeout: until the nearest deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        self.timers.timeout(now)
    }

    /// Handle the deadlines due at `now`: idle connections are closed (re-arming those that
    /// were active since their deadline was queued), and the caller is told whether
    /// accepting should resume.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let mut resume_accept = false;
        let mut closed = Vec::new();
        while let Some((_, key)) = self.timers.pop_due(now) {
            match key {
                TimerKey::ResumeAccept => resume_accept = true,
                TimerKey::Grace => self.grace_over = true,
                TimerKey::Admit => self.parking.timer_fired(),
                TimerKey::Conn(t) => {
                    let Some(conn) = self.conns.get_mut(t) else {
                        continue;
                    };
                    conn.deadline = None; // popped: nothing left to remove
                    if conn.session.deadline().is_some_and(|d| d <= now) {
                        // The session's own deadline (HTTP: 408), sent if the socket takes it.
                        let end = contain(|| {
                            conn.session.on_deadline(&mut conn.out);
                            let _ = conn.out.flush(&conn.sock);
                        })
                        .err()
                        .unwrap_or(End::Deadline);
                        closed.push((t, end));
                        continue;
                    }
                    let idle_due = self.idle.map(|i| conn.last_active + i);
                    if idle_due.is_some_and(|d| d <= now) {
                        closed.push((t, End::IdleTimeout));
                        continue;
                    }
                    let next = match (idle_due, conn.session.deadline()) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    if let Some(next) = next {
                        conn.deadline = Some(next);
                        self.timers.insert(next, TimerKey::Conn(t));
                    }
                }
            }
        }
        for (t, end) in closed {
            if let Some(c) = self.conns.remove(t) {
                end.log(c.peer());
            }
        }
        Expired { resume_accept }
    }

    /// A stop was requested: remember it, queue the end of the grace period, and mark every
    /// connection readable so the caller's next drive of each answers what already arrived
    /// and closes it if it is then idle.
    pub fn begin_stop(&mut self, grace: Duration, now: Instant) {
        self.stopping = true;
        self.timers.insert(now + grace, TimerKey::Grace);
        for t in self.conns.tokens() {
            if let Some(c) = self.conns.get_mut(t) {
                c.set_readable(false);
            }
        }
    }

    /// Whether the loop may exit: stopping and nothing left, or the grace period is over.
    pub fn finished(&self) -> bool {
        self.stopping && (self.conns.is_empty() || self.grace_over)
    }

    /// Close every remaining connection (end of grace).
    pub fn close_all(&mut self) {
        let left = self.conns.len();
        if left > 0 {
            tracing::warn!(
                open = left,
                "grace period over: closing remaining connections"
            );
        }
        for t in self.conns.tokens() {
            self.close(t, End::Shutdown);
        }
    }
}

/// What [`Book::expire`] found.
#[derive(Debug, Clone, Copy)]
pub struct Expired {
    /// The accept pause is over.
    pub resume_accept: bool,
}

/// Drive connection `t` of a level-triggered loop (one read per readiness report) and apply
/// the outcome: remember the interest it wants next round, or close it.
pub fn drive_level(book: &mut Book<'_>, t: usize, buf: &mut [u8], now: Instant) {
    let Some(conn) = book.conns.get_mut(t) else {
        return;
    };
    match conn.drive(buf, false, now) {
        Step::Keep(i) => {
            conn.registered = i;
            book.watch(t);
        }
        Step::Close(end) => {
            book.close(t, end);
        }
    }
}

/// Accept up to a batch of connections on a readable listener and serve what they already
/// sent. `watchable` sees each new socket first and may refuse it (logging why): `select`
/// cannot watch a descriptor at or above `FD_SETSIZE`. Returns `false` when accepting must
/// pause (descriptors ran out; a resume deadline is queued).
///
/// # Errors
/// A fatal listener error.
pub fn accept_batch<'a>(
    listener: &Socket,
    ctx: &'a Ctx,
    book: &mut Book<'a>,
    buf: &mut [u8],
    now: Instant,
    watchable: impl Fn(&Socket, &socket2::SockAddr) -> bool,
) -> io::Result<bool> {
    for _ in 0..64 {
        let (sock, peer) = match accept(listener, true) {
            Ok(x) => x,
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait => break,
                AcceptAction::Retry => continue,
                AcceptAction::Pause(d) => {
                    book.timers.insert(now + d, TimerKey::ResumeAccept);
                    return Ok(false);
                }
                AcceptAction::Fatal => return Err(e),
            },
        };
        if !watchable(&sock, &peer) {
            continue;
        }
        match ctx.try_admit(&peer) {
            Some(slot) => register_level(ctx, book, sock, slot, buf, now),
            None => book.park(ctx, sock, peer, now),
        }
    }
    Ok(true)
}

/// Open the session of an admitted connection of a level-triggered loop and serve what
/// already arrived.
pub fn register_level<'a>(
    ctx: &'a Ctx,
    book: &mut Book<'a>,
    sock: Socket,
    slot: Slot<'a>,
    buf: &mut [u8],
    now: Instant,
) {
    match Conn::new(sock, slot, ctx, now) {
        Ok(conn) => {
            let t = book.add(conn, now);
            drive_level(book, t, buf, now);
        }
        Err((end, slot)) => end.log(&slot.peer),
    }
}

/// The end of a level-triggered loop's round: handle the deadlines due, register the
/// connections waiting for a slot that now find one. Returns whether accepting may resume.
pub fn expire_level<'a>(ctx: &'a Ctx, book: &mut Book<'a>, buf: &mut [u8], now: Instant) -> bool {
    let resume = book.expire(now).resume_accept;
    for (sock, slot) in book.unpark(ctx, now) {
        register_level(ctx, book, sock, slot, buf, now);
    }
    resume && !book.stopping
}

/// A stop was requested in a level-triggered loop: stop listening, start the grace period,
/// answer what already arrived and close the idle connections.
pub fn stop_level(listener: &Socket, ctx: &Ctx, book: &mut Book<'_>, buf: &mut [u8], now: Instant) {
    crate::model::stop_listening(listener);
    book.begin_stop(ctx.opts.grace, now);
    for t in book.conns.tokens() {
        drive_level(book, t, buf, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServeOptions;
    use crate::service::{ServiceConfig, ServiceKind};
    use socket2::{Domain, SockAddr, Type};

    fn ctx(idle: Duration) -> Ctx {
        let opts = ServeOptions {
            idle_timeout: idle,
            ..ServeOptions::default()
        };
        Ctx::new(ServiceConfig::new(ServiceKind::Echo), opts).unwrap()
    }

    fn conn<'a>(ctx: &'a Ctx, now: Instant) -> (Conn<'a>, Socket) {
        let (a, b) = Socket::pair(Domain::UNIX, Type::STREAM, None).unwrap();
        a.set_nonblocking(true).unwrap();
        let peer = SockAddr::unix("/peer").unwrap();
        let conn = Conn::new(a, ctx.admit(&peer).unwrap(), ctx, now).unwrap_or_else(|_| panic!());
        (conn, b)
    }

    #[test]
    fn slab_reuses_freed_tokens() {
        let mut s = Slab::new();
        let a = s.insert('a');
        let b = s.insert('b');
        assert_eq!(s.remove(a), Some('a'));
        assert_eq!(s.remove(a), None);
        let c = s.insert('c');
        assert_eq!(c, a);
        assert_eq!(s.len(), 2);
        assert_eq!(s.tokens(), vec![a, b]);
        assert_eq!(s.get_mut(b), Some(&mut 'b'));
    }

    #[test]
    fn idle_deadline_rearms_for_active_connections_and_closes_idle_ones() {
        let ctx = ctx(Duration::from_secs(10));
        let t0 = Instant::now();
        let mut book = Book::new(&ctx);
        let (busy, _pb) = conn(&ctx, t0);
        let (idle, _pi) = conn(&ctx, t0);
        let busy = book.add(busy, t0);
        let idle = book.add(idle, t0);
        assert_eq!(ctx.active(), 2);
        // The busy one moved bytes at t0 + 6 s: only the idle one times out at t0 + 10 s.
        book.conns.get_mut(busy).unwrap().last_active = t0 + Duration::from_secs(6);
        book.expire(t0 + Duration::from_secs(10));
        assert!(book.conns.get_mut(idle).is_none());
        assert!(book.conns.get_mut(busy).is_some());
        assert_eq!(ctx.active(), 1, "the closed connection released its slot");
        // Its deadline was re-armed from its last activity.
        assert_eq!(
            book.timeout(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(6))
        );
        book.expire(t0 + Duration::from_secs(16));
        assert!(book.conns.is_empty());
        assert!(book.timers.is_empty());
    }

    #[test]
    fn blocked_output_asks_only_for_writability() {
        let ctx = ctx(Duration::ZERO);
        let now = Instant::now();
        let (mut c, peer) = conn(&ctx, now);
        let mut buf = vec![0u8; 65536];
        // Fill the peer's receive buffer: the echo of a large input cannot all be sent.
        let data = vec![7u8; 4 << 20];
        let writer = std::thread::spawn(move || {
            let mut p = &peer;
            let _ = std::io::Write::write_all(&mut p, &data);
            peer
        });
        let mut blocked = false;
        for _ in 0..1000 {
            c.set_readable(false);
            match c.drive(&mut buf, true, now) {
                Step::Keep(i) if i.write => {
                    assert!(!i.read, "a blocked connection must not ask for input");
                    blocked = true;
                    break;
                }
                Step::Keep(_) => std::thread::sleep(Duration::from_millis(1)),
                Step::Close(e) => panic!("closed: {e:?}"),
            }
        }
        assert!(blocked);
        assert!(!c.idle());
        drop(c);
        drop(writer.join().unwrap());
    }
}
