//! `select`: one thread, non-blocking sockets, and `select(2)` on descriptor bit sets filled
//! anew every round -- the course's I/O multiplexing loop, with its timeouts kept in a sorted
//! list.
//!
//! ```text
//! loop:
//!     FD_ZERO(&rfds); FD_ZERO(&wfds)
//!     FD_SET(signal pipe, &rfds); FD_SET(listener, &rfds)
//!     for each connection:
//!         FD_SET(fd, &rfds) if it wants input; FD_SET(fd, &wfds) if its output waits
//!     delta = earliest deadline in the sorted list - now   (none queued: block)
//!     n = select(highest fd + 1, &rfds, &wfds, NULL, &delta)
//!         -1 and EINTR -> look at the signal flags, go round again; other errors are fatal
//!         0            -> only deadlines are due
//!     FD_ISSET(signal pipe) -> stop accepting, finish in-flight requests, close idle ones
//!     FD_ISSET(connection)  -> send queued output, read once, feed the session
//!     FD_ISSET(listener)    -> accept a batch, add each connection
//!     handle the deadlines due: idle connections closed, HTTP heads too slow answered 408
//! ```
//!
//! Like `poll`, `select` is level-triggered and stateless: the sets cross into the kernel and
//! back on every call, and both sides walk every bit up to the highest descriptor. Unlike
//! `poll`, an `fd_set` is a bitmap of a fixed `FD_SETSIZE` (1024) bits: a descriptor at or
//! above 1024 cannot be watched at all (setting its bit would write past the set). So a new
//! connection whose descriptor is that high is refused -- closed at once, with one log line
//! naming the limit -- while the connections already served go on. `poll` and `epoll` have no
//! such limit; `socklab bench --compare --scenario c10k` shows where `select` falls off.

use crate::model::evloop::{accept_batch, drive_level, expire_level, stop_level, Book};
use crate::model::{Ctx, READ_BUF};
use crate::net::{display_addr, Listener};
use crate::signals::{self, Signals};
use nix::sys::select::{select, FdSet, FD_SETSIZE};
use nix::sys::time::{TimeVal, TimeValLike};
use socket2::{SockAddr, Socket};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// Whether `select` can watch `fd` (its bit lies inside an `fd_set`).
fn fits(fd: RawFd) -> bool {
    usize::try_from(fd).is_ok_and(|fd| fd < FD_SETSIZE)
}

/// A new connection `select` could not watch: refused with one log line.
fn watchable(sock: &Socket, peer: &SockAddr) -> bool {
    if fits(sock.as_raw_fd()) {
        return true;
    }
    tracing::warn!(
        peer = %display_addr(peer),
        "select cannot watch descriptor {} (FD_SETSIZE is {FD_SETSIZE}): connection closed; \
         --model poll or epoll have no such limit",
        sock.as_raw_fd()
    );
    false
}

/// The wait for `select`: the delta to the nearest deadline, rounded up to whole
/// microseconds (a `timeval`), or `None` to block until a descriptor is ready.
fn timeval(timeout: Option<Duration>) -> Option<TimeVal> {
    timeout.map(|d| TimeVal::microseconds(d.as_nanos().div_ceil(1000).min(i64::MAX as u128) as i64))
}

/// What one `select` call reported.
#[derive(Default)]
struct Ready {
    signal: bool,
    listener: bool,
    /// Tokens of the connections reported, each with "readable".
    conns: Vec<(usize, bool)>,
}

/// Serve on `listener` with a `select` loop on this thread until a stop request.
///
/// # Errors
/// A failure of `select` itself or of the listener, or a listener or signal pipe whose
/// descriptor is too high for an `fd_set`.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let sig = signals.fd();
    let lst = listener.socket.as_fd();
    if !fits(sig.as_raw_fd()) || !fits(lst.as_raw_fd()) {
        return Err(io::Error::other(format!(
            "select cannot watch the listener or signal pipe: descriptors {} and {} (FD_SETSIZE is {FD_SETSIZE})",
            lst.as_raw_fd(),
            sig.as_raw_fd()
        )));
    }
    let mut book = Book::new(ctx);
    let mut buf = vec![0u8; READ_BUF];
    let mut accepting = true;
    let mut ready = Ready::default();

    while !book.finished() {
        // FD_ZERO both sets, FD_SET every descriptor of interest.
        let mut rfds = FdSet::new();
        let mut wfds = FdSet::new();
        if !book.stopping {
            rfds.insert(sig);
        }
        if accepting {
            rfds.insert(lst);
        }
        for (_, c) in book.conns.iter() {
            if c.registered.read {
                rfds.insert(c.sock.as_fd());
            }
            if c.registered.write {
                wfds.insert(c.sock.as_fd());
            }
        }
        let mut delta = timeval(book.timeout(Instant::now()));
        match select(None, &mut rfds, &mut wfds, None, delta.as_mut()) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        // FD_ISSET every descriptor (the sets borrow the sockets: note what is ready first).
        ready.signal = rfds.contains(sig);
        ready.listener = accepting && rfds.contains(lst);
        ready.conns.clear();
        for (t, c) in book.conns.iter() {
            let r = rfds.contains(c.sock.as_fd());
            if r || wfds.contains(c.sock.as_fd()) {
                ready.conns.push((t, r));
            }
        }
        let now = Instant::now();

        if ready.signal {
            signals.drain();
            if signals::stop_requested() {
                accepting = false;
                stop_level(&listener.socket, ctx, &mut book, &mut buf, now);
            }
        }
        for &(t, readable) in &ready.conns {
            let Some(conn) = book.conns.get_mut(t) else {
                continue;
            };
            if readable {
                // select says "readable" for data, end-of-file and errors alike: the read tells.
                conn.set_readable(false);
            }
            drive_level(&mut book, t, &mut buf, now);
        }
        if ready.listener && accepting {
            accepting = accept_batch(&listener.socket, ctx, &mut book, &mut buf, now, watchable)?;
        }
        if expire_level(ctx, &mut book, &mut buf, now) {
            accepting = true;
        }
    }
    book.close_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_past_fd_setsize_do_not_fit() {
        assert!(fits(0));
        assert!(fits(FD_SETSIZE as i32 - 1));
        assert!(!fits(FD_SETSIZE as i32));
        assert!(!fits(-1));
    }

    #[test]
    fn timeouts_round_up_to_whole_microseconds() {
        assert!(timeval(None).is_none());
        let tv = timeval(Some(Duration::from_nanos(1))).unwrap();
        assert_eq!(tv.num_microseconds(), 1);
        let tv = timeval(Some(Duration::from_millis(1500))).unwrap();
        assert_eq!((tv.tv_sec(), tv.tv_usec()), (1, 500_000));
        assert_eq!(timeval(Some(Duration::ZERO)).unwrap().num_microseconds(), 0);
    }
}
