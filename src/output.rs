//! The per-connection output queue, and the one function every model uses to send it.
//!
//! A session queues what it wants sent in an [`Outbox`]; the model calls [`Outbox::flush`]
//! when the socket can take data. On a blocking socket `flush` returns when everything is
//! sent; on a non-blocking one it sends what the kernel accepts and reports
//! [`Flush::Blocked`], and the model waits for writability before calling it again: a large
//! answer never blocks an event loop. Short writes are resumed where they stopped, `EINTR`
//! is retried, and every other error is returned.
//!
//! Besides bytes, a session can queue a *region of an open file* ([`Outbox::push_file`]): a
//! 1 GiB file is never read into memory. It is sent with the outbox's [`SendStrategy`], the
//! three ways of the course's web servers: `read` (read a block into a buffer, `send` it;
//! the bytes before it leave with `MSG_MORE`), `mmap` (map a window of the file and `writev`
//! the bytes before it together with the mapping), `sendfile` (the bytes before it with
//! `MSG_MORE` so they share segments with the file, then `sendfile(2)`, no copy to user space).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

/// How a queued file region is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SendStrategy {
    /// `pread` a block into a buffer, then `send` it (`srv_web_read_send`).
    Read,
    /// `mmap` a window of the file and `writev` it (`srv_web_mmap_writev`).
    Mmap,
    /// `sendfile(2)`: the kernel copies from the page cache to the socket (`srv_web_sendfile`).
    #[default]
    Sendfile,
}

/// Bytes of a file handed to one `read`+`send` round or one `mmap` window.
const FILE_BLOCK: usize = 256 * 1024;
const MMAP_WINDOW: usize = 4 << 20;

/// Small pushes are appended to the last queued buffer while it is under this size, so that
/// many small answers leave in one `writev` and cost no allocation each.
const COALESCE: usize = 256 * 1024;

/// A drained buffer is kept for the next answers only up to this capacity: an idle
/// connection keeps at most this much, whatever it once sent.
const SPARE_MAX: usize = 16 * 1024;

/// At most this many buffers are handed to one `writev`.
const MAX_IOV: usize = 16;

/// One queued piece of output.
#[derive(Debug)]
struct Chunk {
    buf: Vec<u8>,
    /// Bytes of `buf` already sent.
    sent: usize,
    /// A file region instead of bytes (then `buf` is empty).
    file: Option<FileRegion>,
}

/// A region of an open file waiting to be sent.
#[derive(Debug)]
struct FileRegion {
    file: Arc<File>,
    /// Next byte of the file to send.
    offset: u64,
    /// Bytes left to send.
    left: u64,
}

impl Chunk {
    fn bytes(buf: Vec<u8>) -> Chunk {
        Chunk {
            buf,
            sent: 0,
            file: None,
        }
    }
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file shrank while being sent",
    )
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
    /// Bytes queued and not yet sent (file regions included).
    pending: usize,
    /// Of those, the bytes held in memory (not file regions).
    memory: usize,
    /// File regions queued: each holds its file open.
    files: usize,
    /// A drained buffer kept for reuse (up to [`SPARE_MAX`]), so a busy connection
    /// allocates once.
    spare: Vec<u8>,
    /// How file regions are sent.
    strategy: SendStrategy,
    /// The `read` strategy's block buffer: sized to what is sent (at most [`FILE_BLOCK`]),
    /// and freed when the file region is done, so a keep-alive connection that once sent
    /// a file does not keep a block for ever.
    block: Vec<u8>,
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// An empty outbox that sends file regions with `strategy`.
    pub fn with_strategy(strategy: SendStrategy) -> Outbox {
        Outbox {
            strategy,
            ..Outbox::default()
        }
    }

    /// Queue `len` bytes of `file` from `offset`, to be sent without reading the file into
    /// memory (see [`SendStrategy`]).
    pub fn push_file(&mut self, file: Arc<File>, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.pending += len as usize;
        self.files += 1;
        self.queue.push_back(Chunk {
            buf: Vec::new(),
            sent: 0,
            file: Some(FileRegion {
                file,
                offset,
                left: len,
            }),
        });
    }

    /// Bytes queued and not yet sent.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Whether nothing is waiting to be sent.
    pub fn is_empty(&self) -> bool {
        self.pending == 0
    }

    /// Bytes queued in memory (file regions not counted: they are read as they are sent).
    pub fn memory(&self) -> usize {
        self.memory
    }

    /// File regions queued, each holding its file open.
    pub fn files(&self) -> usize {
        self.files
    }

    /// The buffer new small output is appended to.
    fn tail(&mut self, room: usize) -> &mut Vec<u8> {
        let reuse = matches!(self.queue.back(), Some(c) if c.file.is_none() && c.buf.len() + room <= COALESCE);
        if !reuse {
            let buf = std::mem::take(&mut self.spare);
            self.queue.push_back(Chunk::bytes(buf));
        }
        &mut self.queue.back_mut().expect("just ensured").buf
    }

    /// Queue a copy of `bytes`.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.pending += bytes.len();
        self.memory += bytes.len();
        self.tail(bytes.len()).extend_from_slice(bytes);
    }

    /// Queue `bytes` in reverse order (the reverse service's answer), copying once.
    pub fn push_reversed(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.pending += bytes.len();
        self.memory += bytes.len();
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
        self.memory += buf.len();
        self.queue.push_back(Chunk::bytes(buf));
    }

    /// Drop everything queued (the connection is being closed).
    pub fn clear(&mut self) {
        self.queue.clear();
        self.pending = 0;
        self.memory = 0;
        self.files = 0;
        self.block = Vec::new();
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
            let front_is_file = self.queue.front().is_some_and(|c| c.file.is_some());
            let r = if front_is_file {
                self.send_file(sock)
            } else {
                self.send_bytes(sock)
            };
            match r {
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            }
        }
        Ok(Flush::Done)
    }

    /// Send the leading byte chunks in one call. With `mmap`, a file region right behind
    /// them goes in the same `writev` (its first window mapped); with `read`/`sendfile`, the
    /// bytes leave with `MSG_MORE` so the kernel holds them to fill segments with the file.
    fn send_bytes(&mut self, sock: &impl AsFd) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        let mut file_next = None;
        for c in &self.queue {
            if count == MAX_IOV {
                break;
            }
            if let Some(f) = &c.file {
                file_next = Some(f);
                break;
            }
            slices[count] = IoSlice::new(&c.buf[c.sent..]);
            count += 1;
        }
        match (file_next, self.strategy) {
            (None, _) => Ok(nix::sys::uio::writev(sock, &slices[..count])?),
            (Some(f), SendStrategy::Mmap) => {
                let window = (f.left as usize).min(MMAP_WINDOW);
                let map = crate::sys::Mapping::new(&f.file, f.offset, window)?;
                slices[count.min(MAX_IOV - 1)] = IoSlice::new(map.as_slice());
                let n = nix::sys::uio::writev(sock, &slices[..count.min(MAX_IOV - 1) + 1])?;
                Ok(n)
            }
            (Some(_), _) => {
                let flags = nix::sys::socket::MsgFlags::from_bits_retain(libc::MSG_MORE);
                let fd = sock.as_fd().as_raw_fd();
                let r = nix::sys::socket::sendmsg::<()>(fd, &slices[..count], &[], flags, None);
                match r {
                    // Not a socket (a pipe in tests): plain writev.
                    Err(nix::errno::Errno::ENOTSOCK) => {
                        Ok(nix::sys::uio::writev(sock, &slices[..count])?)
                    }
                    r => Ok(r?),
                }
            }
        }
    }

    /// Send (part of) the file region at the front.
    fn send_file(&mut self, sock: &impl AsFd) -> io::Result<usize> {
        let f = self
            .queue
            .front()
            .and_then(|c| c.file.as_ref())
            .expect("front is a file");
        match self.strategy {
            SendStrategy::Sendfile => {
                let mut off = f.offset as libc::off64_t;
                let count = (f.left as usize).min(1 << 30);
                let n = nix::sys::sendfile::sendfile64(sock, &*f.file, Some(&mut off), count)?;
                if n == 0 {
                    return Err(truncated());
                }
                Ok(n)
            }
            SendStrategy::Mmap => {
                let window = (f.left as usize).min(MMAP_WINDOW);
                let map = crate::sys::Mapping::new(&f.file, f.offset, window)?;
                Ok(nix::sys::uio::writev(
                    sock,
                    &[IoSlice::new(map.as_slice())],
                )?)
            }
            SendStrategy::Read => {
                let want = usize::try_from(f.left)
                    .unwrap_or(FILE_BLOCK)
                    .min(FILE_BLOCK);
                if self.block.len() < want {
                    self.block.resize(want, 0);
                }
                // A partial send re-reads from the new offset next time: `pread` keeps no
                // state, so nothing read-but-unsent has to be kept.
                let got = nix::sys::uio::pread(
                    &*f.file,
                    &mut self.block[..want],
                    f.offset as libc::off_t,
                )?;
                if got == 0 {
                    return Err(truncated());
                }
                Ok(nix::unistd::write(sock, &self.block[..got])?)
            }
        }
    }
    /// Mark `n` bytes as sent, recycling drained buffers.
    fn advance(&mut self, mut n: usize) {
        self.pending -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("sent more than queued");
            if let Some(f) = &mut front.file {
                let step = (n as u64).min(f.left);
                f.offset += step;
                f.left -= step;
                n -= step as usize;
                if f.left == 0 {
                    self.queue.pop_front();
                    self.files -= 1;
                    self.block = Vec::new();
                }
                continue;
            }
            let left = front.buf.len() - front.sent;
            if n < left {
                front.sent += n;
                self.memory -= n;
                return;
            }
            n -= left;
            self.memory -= left;
            let mut done = self.queue.pop_front().expect("front exists");
            if done.buf.capacity() <= SPARE_MAX && done.buf.capacity() > self.spare.capacity() {
                done.buf.clear();
                self.spare = done.buf;
            }
        }
    }

    /// Everything queued, as one vector, emptying the queue (for tests and in-memory use).
    pub fn take_bytes(&mut self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.pending);
        for c in self.queue.drain(..) {
            match c.file {
                Some(f) => {
                    let mut b = vec![0u8; f.left as usize];
                    let n = nix::sys::uio::pread(&*f.file, &mut b, f.offset as libc::off_t)
                        .unwrap_or(0);
                    b.truncate(n);
                    all.extend_from_slice(&b);
                }
                None => all.extend_from_slice(&c.buf[c.sent..]),
            }
        }
        self.pending = 0;
        self.memory = 0;
        self.files = 0;
        all
    }
}

/// The next piece of queued output, for a model whose sends complete later (io_uring): it
/// hands the kernel this piece, and tells [`Outbox::consume`] how much of it went. While the
/// kernel reads from it the outbox must not change (the model queues new output in another
/// outbox meanwhile).
#[derive(Debug)]
pub enum Piece<'a> {
    /// Bytes, at the front of the queue; `more` when a file region follows them (send them
    /// with `MSG_MORE`, so they share segments with the file).
    Bytes {
        /// The bytes not yet sent.
        bytes: &'a [u8],
        /// A file region comes next.
        more: bool,
    },
    /// A region of an open file.
    File {
        /// The file.
        file: &'a File,
        /// The next byte of it to send.
        offset: u64,
        /// Bytes of it left to send.
        len: u64,
    },
}

impl Outbox {
    /// The piece at the front of the queue, if any (see [`Piece`]).
    pub fn piece(&self) -> Option<Piece<'_>> {
        let front = self.queue.front()?;
        Some(match &front.file {
            Some(f) => Piece::File {
                file: &f.file,
                offset: f.offset,
                len: f.left,
            },
            None => Piece::Bytes {
                bytes: &front.buf[front.sent..],
                more: self.queue.get(1).is_some_and(|c| c.file.is_some()),
            },
        })
    }

    /// `n` bytes from the front went out (as the kernel reported a send of [`Outbox::piece`]).
    /// More than is queued counts as all of it.
    pub fn consume(&mut self, n: usize) {
        self.advance(n.min(self.pending));
    }

    /// How file regions are to be sent.
    pub fn strategy(&self) -> SendStrategy {
        self.strategy
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
    fn file_regions_are_sent_exactly_with_every_strategy() {
        use std::io::Write;
        let mut tmp = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
        tmp.write_all(&data).unwrap();
        let file = Arc::new(tmp);
        for strategy in [
            SendStrategy::Read,
            SendStrategy::Mmap,
            SendStrategy::Sendfile,
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let mut o = Outbox::with_strategy(strategy);
            o.push_bytes(b"HEAD");
            o.push_file(file.clone(), 4097, 2_000_000);
            o.push_bytes(b"TAIL");
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                b.read_to_end(&mut got).unwrap();
                got
            });
            while o.flush(&a).unwrap() == Flush::Blocked {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            drop(a);
            let got = reader.join().unwrap();
            assert_eq!(&got[..4], b"HEAD", "{strategy:?}");
            assert_eq!(
                &got[4..4 + 2_000_000],
                &data[4097..4097 + 2_000_000],
                "{strategy:?}"
            );
            assert_eq!(&got[4 + 2_000_000..], b"TAIL", "{strategy:?}");
        }
    }

    /// Issue 13, item 10: `--send read` sized its block to 256 KiB for a 6-byte file and
    /// kept it for ever; 2,000 keep-alive connections cost half a GiB.
    #[test]
    fn the_read_block_follows_the_file_and_is_freed_after_it() {
        use std::io::Write;
        let mut tmp = tempfile::tempfile().unwrap();
        tmp.write_all(b"small\n").unwrap();
        let file = Arc::new(tmp);
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut o = Outbox::with_strategy(SendStrategy::Read);
        o.push_bytes(b"HEAD");
        o.push_file(file, 0, 6);
        assert_eq!((o.memory(), o.files(), o.pending()), (4, 1, 10));
        assert_eq!(o.flush(&a).unwrap(), Flush::Done);
        assert_eq!((o.memory(), o.files(), o.pending()), (0, 0, 0));
        assert_eq!(o.block.capacity(), 0, "the block outlived its file");
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"HEADsmall\n");
    }

    /// Kin of item 10: an idle connection keeps at most a small spare buffer, whatever
    /// it sent before.
    #[test]
    fn a_large_drained_buffer_is_not_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut b = b;
            let mut v = Vec::new();
            b.read_to_end(&mut v).unwrap();
            v.len()
        });
        let mut o = Outbox::new();
        for _ in 0..4 {
            o.push_bytes(&[1u8; 60_000]);
        }
        while o.flush(&a).unwrap() == Flush::Blocked {}
        assert!(o.spare.capacity() <= SPARE_MAX, "{}", o.spare.capacity());
        drop(a);
        assert_eq!(reader.join().unwrap(), 240_000);
    }

    #[test]
    fn a_region_past_the_end_of_the_file_is_an_error_not_a_crash() {
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(100).unwrap();
        for strategy in [
            SendStrategy::Read,
            SendStrategy::Mmap,
            SendStrategy::Sendfile,
        ] {
            let (a, _b) = UnixStream::pair().unwrap();
            let mut o = Outbox::with_strategy(strategy);
            o.push_file(file.clone(), 50, 1000);
            let mut result = o.flush(&a);
            // The first 50 bytes may go out; then the shortfall must be an error.
            if result.is_ok() {
                result = o.flush(&a);
            }
            assert!(result.is_err(), "{strategy:?}: {result:?}");
        }
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
