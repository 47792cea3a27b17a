//! `epoll`: one thread, non-blocking sockets, the kernel keeps the interest list.
//!
//! ```text
//! epfd = epoll_create1(); add(listener); add(signal pipe)
//! loop:
//!     n = epoll_wait(epfd, events, nearest deadline)
//!     for each event:
//!         listener ready   -> accept (until EAGAIN when edge-triggered), add each connection
//!         connection ready -> send queued output, read, feed the session, queue answers
//!         signal pipe      -> stop accepting, finish in-flight requests, close idle ones
//!     close connections whose idle deadline passed
//! ```
//!
//! Edge-triggered (default): each connection is registered once for input and output with
//! `EPOLLET`. The kernel reports a change of readiness once, not the state: a socket left with
//! unread input is never reported again, so every read continues until `EAGAIN` (the
//! connection remembers "may be readable" until then). Level-triggered (`--trigger level`):
//! `EPOLLIN` is reported as long as input waits, so one read per report is enough and fairer;
//! `EPOLLOUT` is asked for only while output is blocked (it would be reported constantly
//! otherwise), which costs an `epoll_ctl` each time that changes.
//!
//! The [`reactors`](super::reactors) model runs this same loop on several threads.

use crate::model::evloop::{Book, Conn, Interest, Step};
use crate::model::{accept, accept_action, AcceptAction, Ctx, Trigger, READ_BUF};
use crate::net::Listener;
use crate::signals::{self, Signals};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::Socket;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;

/// Serve on `listener` with one epoll loop on this thread until a stop request.
///
/// # Errors
/// A failure of `epoll` itself or of the listener.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    run_loop(&listener.socket, false, ctx, signals.fd())
}

/// Flags of a connection with interest `i`.
fn conn_flags(edge: bool, i: Interest) -> EpollFlags {
    if edge {
        return EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
    }
    let mut f = EpollFlags::EPOLLRDHUP;
    if i.read {
        f |= EpollFlags::EPOLLIN;
    }
    if i.write {
        f |= EpollFlags::EPOLLOUT;
    }
    f
}

/// One epoll loop on `listener` (shared with other loops when `exclusive`: then registered
/// with `EPOLLEXCLUSIVE` so one connection wakes one loop), stopping when `wake` reports a
/// stop request.
///
/// # Errors
/// A failure of `epoll` itself or of the listener.
pub fn run_loop(
    listener: &Socket,
    exclusive: bool,
    ctx: &Ctx,
    wake: BorrowedFd<'_>,
) -> io::Result<()> {
    let edge = ctx.opts.trigger == Trigger::Edge;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut listen_flags = EpollFlags::EPOLLIN;
    if edge {
        listen_flags |= EpollFlags::EPOLLET;
    }
    if exclusive {
        listen_flags |= EpollFlags::EPOLLEXCLUSIVE;
    }
    let listen_event = EpollEvent::new(listen_flags, LISTENER);
    epoll.add(listener, listen_event)?;
    epoll.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;

    let mut events = vec![EpollEvent::empty(); 1024];
    let mut buf = vec![0u8; READ_BUF];
    let mut book = Book::new(ctx);
    let mut accepting = true;

    while !book.finished() {
        let timeout = EpollTimeout::try_from(crate::sys::timeout_ms(book.timeout(Instant::now())))
            .unwrap_or(EpollTimeout::NONE);
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        for ev in &events[..n] {
            match ev.data() {
                WAKE => {
                    if !signals::stop_requested() {
                        // Some other signal's byte: empty the pipe or it would be reported
                        // again and again (level-triggered).
                        signals::drain_fd(wake);
                        continue;
                    }
                    // Stop: no more accepts. The pipe stays unread so every loop sees it;
                    // each removes it from its own interest list instead.
                    epoll.delete(wake)?;
                    if accepting {
                        epoll.delete(listener)?;
                        accepting = false;
                    }
                    crate::model::stop_listening(listener);
                    book.begin_stop(ctx.opts.grace, now);
                    for t in book.conns.tokens() {
                        drive(&epoll, &mut book, t, &mut buf, edge, now);
                    }
                }
                LISTENER => {
                    if !accept_ready(&epoll, listener, ctx, &mut book, &mut buf, edge, now)? {
                        epoll.delete(listener)?;
                        accepting = false;
                    }
                }
                token => {
                    let t = token as usize;
                    let Some(conn) = book.conns.get_mut(t) else {
                        continue;
                    };
                    let flags = ev.events();
                    let hangup =
                        EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR | EpollFlags::EPOLLRDHUP;
                    if flags.intersects(EpollFlags::EPOLLIN | hangup) {
                        conn.set_readable(flags.intersects(hangup));
                    }
                    drive(&epoll, &mut book, t, &mut buf, edge, now);
                }
            }
        }
        let resume = book.expire(now).resume_accept;
        for (sock, slot) in book.unpark(ctx, now) {
            register(&epoll, ctx, &mut book, sock, slot, &mut buf, edge, now);
        }
        if resume && !book.stopping {
            epoll.add(listener, listen_event)?;
            accepting = true;
            if !accept_ready(&epoll, listener, ctx, &mut book, &mut buf, edge, now)? {
                epoll.delete(listener)?;
                accepting = false;
            }
        }
    }
    book.close_all();
    Ok(())
}

/// Drive connection `t` and apply the outcome: re-register its interest (level-triggered)
/// or close it.
fn drive(epoll: &Epoll, book: &mut Book<'_>, t: usize, buf: &mut [u8], edge: bool, now: Instant) {
    let Some(conn) = book.conns.get_mut(t) else {
        return;
    };
    match conn.drive(buf, edge, now) {
        Step::Keep(i) => {
            book.watch(t);
            let Some(conn) = book.conns.get_mut(t) else {
                return;
            };
            if !edge && i != conn.registered {
                let mut ev = EpollEvent::new(conn_flags(edge, i), t as u64);
                if let Err(e) = epoll.modify(conn.sock.as_fd(), &mut ev) {
                    book.close(t, crate::model::End::Io(e.into()));
                    return;
                }
                conn.registered = i;
            }
        }
        Step::Close(end) => {
            // Closing the socket also removes it from the interest list.
            book.close(t, end);
        }
    }
}

/// Accept pending connections (all of them when edge-triggered, a batch otherwise) and
/// register them. Returns `false` when accepting must pause (descriptors ran out; a resume
/// deadline is queued).
fn accept_ready<'a>(
    epoll: &Epoll,
    listener: &Socket,
    ctx: &'a Ctx,
    book: &mut Book<'a>,
    buf: &mut [u8],
    edge: bool,
    now: Instant,
) -> io::Result<bool> {
    let mut batch = 0;
    while edge || batch < 64 {
        batch += 1;
        let (sock, peer) = match accept(listener, true) {
            Ok(x) => x,
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait => return Ok(true),
                AcceptAction::Retry => continue,
                AcceptAction::Pause(d) => {
                    book.timers
                        .insert(now + d, crate::model::evloop::TimerKey::ResumeAccept);
                    return Ok(false);
                }
                AcceptAction::Fatal => return Err(e),
            },
        };
        match ctx.try_admit(&peer) {
            Some(slot) => register(epoll, ctx, book, sock, slot, buf, edge, now),
            None => book.park(ctx, sock, peer, now),
        }
    }
    Ok(true)
}

/// Open the session of an admitted connection, register it, and serve what already
/// arrived.
#[allow(clippy::too_many_arguments)]
fn register<'a>(
    epoll: &Epoll,
    ctx: &'a Ctx,
    book: &mut Book<'a>,
    sock: Socket,
    slot: crate::model::Slot<'a>,
    buf: &mut [u8],
    edge: bool,
    now: Instant,
) {
    let conn = match Conn::new(sock, slot, ctx, now) {
        Ok(c) => c,
        Err((end, slot)) => {
            end.log(&slot.peer);
            return;
        }
    };
    let flags = conn_flags(edge, conn.registered);
    let t = book.add(conn, now);
    let Some(conn) = book.conns.get_mut(t) else {
        return;
    };
    if let Err(e) = epoll.add(conn.sock.as_fd(), EpollEvent::new(flags, t as u64)) {
        book.close(t, crate::model::End::Io(e.into()));
        return;
    }
    // Input (or daytime's output) may already be there: serve it without a round trip.
    drive(epoll, book, t, buf, edge, now);
}
