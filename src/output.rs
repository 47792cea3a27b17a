//! The per-connection output queue, and the one function every model uses to send it.
//!
//! A session queues what it wants sent in an [`Outbox`]; the model calls [`Outbox::flush`]
//! when the socket can take data. On a blocking socket `flush` returns when everything is
//! sent; on a non-blocking one it sends what the kernel accepts and reports
//! [`Flush::Blocked`], and the model waits for writability before calling it again: a large
//! answer never blocks an event loop. Short writes are resumed where they stopped, `EINTR`
//! is retried, and every other error is returned.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsFd;

/// Small pushes are appended to the last queued buffer while it is under this size, so that
/// many small answers leave in one `writev` and cost no allocation each.
const COALESCE: usize = 256 * 1024;

/// At most this many buffers are handed to one `writev`.
const MAX_IOV: usize = 16;

/// One queued piece of output.
#[derive(Debug)]
struct Chunk {
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The queue is empty.
    Done,
    /// The socket's send buffer is full (`EAGAIN`): wait until it is writable and flush again.
    Blocked,
}

/// Output waiting to be sent on one connection.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Chunk>,
    /// Bytes queued and not yet sent.
    pending: usize,
    /// A drained buffer kept for reuse, so a busy connection allocates once.
    spare: Vec<u8>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Bytes queued and not yet sent.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether nothing is waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// The buffer new small output is appended to.
    fn tail(&mut self, room: usize) -> &mut Vec<u8> {
        let reuse = matches!(self.queue.back(), Some(c) if c.buf.len() + room <= COALESCE);
        if !reuse {
            let buf = std::mem::take(&mut self.spare);
            self.queue.push_back(Chunk { buf, sent: 0 });
        }
        &mut self.queue.back_mut().expect("just ensured").buf
    }

    /// Queue a copy of `bytes`.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.pending += bytes.len();
        self.tail(bytes.len()).extend_from_slice(bytes);
    }

    /// Queue `bytes` in reverse order (the reverse service's answer), copying once.
    pub fn push_reversed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.pending += bytes.len();
        // Measured (examples/session_cost): extending from the reversed iterator compiles to
        // a vectorised loop, about 5x faster than copying and then `reverse()`-ing in place.
        self.tail(bytes.len()).extend(bytes.iter().rev());
    }

    /// Queue an owned buffer without copying it.
    pub fn push_vec(&mut self, buf: Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        if buf.len() < 4096 {
            return self.push_bytes(&buf);
        }
        self.pending += buf.len();
        self.queue.push_back(Chunk { buf, sent: 0 });
    }

    /// Drop everything queued (the connection is being closed).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.pending = 0;
    }

    /// Send as much as the socket takes. On a blocking socket this returns [`Flush::Done`]
    /// once all is sent (or an error); on a non-blocking one it may return [`Flush::Blocked`].
    ///
    /// # Errors
    /// Any error of `writev` other than `EINTR` (retried) and `EAGAIN` (reported as
    /// [`Flush::Blocked`]); a blocking socket whose send timeout expired reports
    /// [`io::ErrorKind::TimedOut`].
    pub fn flush(&mut self, sock: &impl AsFd) -> io::Result<Flush> {
        while self.pending > 0 {
            let n = {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut count = 0;
                for (slot, c) in slices.iter_mut().zip(&self.queue) {
                    *slot = IoSlice::new(&c.buf[c.sent..]);
                    count += 1;
                }
                match nix::sys::uio::writev(sock, &slices[..count]) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => return Ok(Flush::Blocked),
                    Err(e) => return Err(e.into()),
                }
            };
            self.advance(n);
        }
        Ok(Flush::Done)
    }

    /// Mark `n` bytes as sent, recycling drained buffers.
    fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("sent more than queued");
            let left = front.buf.len() - front.sent;
            if n < left {
                front.sent += n;
                return;
            }
            n -= left;
            let mut done = self.queue.pop_front().expect("front exists");
            if done.buf.capacity() <= COALESCE && done.buf.capacity() > self.spare.capacity() {
                done.buf.clear();
                self.spare = done.buf;
            }
        }
    }

    /// Everything queued, as one vector, emptying the queue (for tests and in-memory use).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.pending);
        for c in self.queue.drain(..) {
            all.extend_from_slice(&c.buf[c.sent..]);
        }
        self.pending = 0;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn small_pushes_coalesce_and_large_ones_are_moved() {
        let mut o = Outbox::new();
        o.push_bytes(b"ab");
        o.push_reversed(b"dc");
        assert_eq!(o.queue.len(), 1);
        o.push_vec(vec![7; 1 << 20]);
        o.push_bytes(b"z");
        assert_eq!(o.queue.len(), 3);
        assert_eq!(o.pending(), 4 + (1 << 20) + 1);
        let all = o.take_bytes();
        assert_eq!(&all[..4], b"abcd");
        assert_eq!(all.len(), 4 + (1 << 20) + 1);
        assert!(o.is_empty());
    }

    #[test]
    fn nonblocking_flush_resumes_where_it_stopped() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let mut o = Outbox::new();
        o.push_bytes(b"head");
        o.push_vec(data.clone());
        assert_eq!(o.flush(&a).unwrap(), Flush::Blocked);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let mut rounds = 0;
        while o.flush(&a).unwrap() == Flush::Blocked {
            rounds += 1;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(a);
        let got = reader.join().unwrap();
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..], &data[..]);
        assert!(rounds > 0);
    }

    #[test]
    fn flush_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut o = Outbox::new();
        o.push_bytes(b"x");
        let err = o.flush(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
