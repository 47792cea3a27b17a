//! `poll`: one thread, non-blocking sockets, and `poll(2)` on an array rebuilt every round.
//!
//! ```text
//! loop:
//!     fds = [signal pipe, listener, every connection with the events it wants]
//!     poll(fds, nearest deadline)
//!     signal pipe ready -> stop accepting, finish in-flight requests, close idle ones
//!     listener ready    -> accept a batch, add each connection
//!     each connection with revents -> send queued output, read once, feed the session
//!     close connections whose idle deadline passed
//! ```
//!
//! `poll` is level-triggered and stateless: the whole array crosses into the kernel on every
//! call and the kernel checks every descriptor, so each round costs O(connections) even when
//! one of them is active. That is the cost the `--idle` benchmark shows next to `epoll`.

use crate::model::evloop::{accept_batch, drive_level, expire_level, stop_level, Book, Interest};
use crate::model::{Ctx, READ_BUF};
use crate::net::Listener;
use crate::signals::{self, Signals};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

fn events_of(i: Interest) -> i16 {
    let mut e = 0;
    if i.read {
        e |= libc::POLLIN;
    }
    if i.write {
        e |= libc::POLLOUT;
    }
    e
}

/// Serve on `listener` with a `poll` loop on this thread until a stop request.
///
/// # Errors
/// A failure of `poll` itself or of the listener.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let mut book = Book::new(ctx);
    let mut buf = vec![0u8; READ_BUF];
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut tokens: Vec<usize> = Vec::new();
    let mut accepting = true;

    while !book.finished() {
        fds.clear();
        tokens.clear();
        let pollfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        fds.push(pollfd(
            if book.stopping {
                -1
            } else {
                signals.fd().as_raw_fd()
            },
            libc::POLLIN,
        ));
        // A negative descriptor is skipped by poll: how a paused listener sits out a round.
        fds.push(pollfd(
            if accepting {
                listener.socket.as_raw_fd()
            } else {
                -1
            },
            libc::POLLIN,
        ));
        for (t, c) in book.conns.iter() {
            fds.push(pollfd(c.sock.as_raw_fd(), events_of(c.registered)));
            tokens.push(t);
        }
        match crate::sys::poll(&mut fds, book.timeout(Instant::now())) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let now = Instant::now();

        if fds[0].revents != 0 {
            signals.drain();
            if signals::stop_requested() {
                accepting = false;
                stop_level(&listener.socket, ctx, &mut book, &mut buf, now);
            }
        }
        for (i, &t) in tokens.iter().enumerate() {
            let revents = fds[i + 2].revents;
            if revents == 0 {
                continue;
            }
            let Some(conn) = book.conns.get_mut(t) else {
                continue;
            };
            if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                conn.set_readable(revents & (libc::POLLHUP | libc::POLLERR) != 0);
            }
            drive_level(&mut book, t, &mut buf, now);
        }
        if accepting && fds[1].revents != 0 {
            accepting = accept_batch(&listener.socket, ctx, &mut book, &mut buf, now, |_, _| true)?;
        }
        if expire_level(ctx, &mut book, &mut buf, now) {
            accepting = true;
        }
    }
    book.close_all();
    Ok(())
}
