//! The one small trait every mechanism implements, and the pieces they share.
//!
//! A mechanism's `open` sets up both ends in the parent before any `fork` or thread (so every
//! limit is checked, and every name chosen, before the run), and returns a [`Pair`]. Each
//! [`End`] sends one message and receives one message; dropping it closes what it holds.
//! Named things (SysV queues, FIFO and socket paths) are released by the pair's [`Cleanup`]
//! in the parent, at the end of the run or, on Ctrl-C, by the signal handler of [`super::sys`].
//! Names are removed as early as possible (a FIFO or socket path right after both ends are
//! open, a POSIX queue right after `mq_open`), so even `kill -9` leaves nothing behind for
//! them.

use super::sys;
use nix::errno::Errno;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// One end of an IPC channel: send one message, receive one message.
///
/// Both calls may return [`io::ErrorKind::Interrupted`] (a signal: the other side failed or
/// died). The caller then looks at why and, if it goes on, calls again with the same
/// arguments: progress already made on the message is kept.
pub trait End: Send {
    /// Send one whole message.
    ///
    /// # Errors
    /// The system call's error; `Interrupted` to be retried.
    fn send(&mut self, msg: &[u8]) -> io::Result<()>;

    /// Receive one message into `buf` (large enough for any message of the run, plus one
    /// byte so a merged message shows); its length.
    ///
    /// # Errors
    /// The system call's error (`UnexpectedEof` if the other end closed); `InvalidData` if a
    /// frame or datagram does not fit `buf`; `Interrupted` to be retried.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Both ends of a channel, set up and ready.
pub struct Pair {
    /// The measuring side's end.
    pub a: Box<dyn End>,
    /// The peer's end.
    pub b: Box<dyn End>,
    /// What the parent removes when the run ends.
    pub cleanup: Cleanup,
    /// For mechanisms that drop instead of blocking when the receiver is behind (UDP): how
    /// many messages may be in flight before the sender waits for a credit.
    pub window: Option<usize>,
    /// A note on how the mechanism was set up (buffer sizes, ring slots), for the report.
    pub note: String,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("window", &self.window)
            .field("note", &self.note)
            .finish_non_exhaustive()
    }
}

/// Between what the messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Between {
    /// Two processes (`fork`), as in the course.
    Processes,
    /// Two threads of one process.
    Threads,
}

/// What a mechanism needs to know to set up its ends.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// Payload bytes per message (each message adds a 16-byte header).
    pub size: usize,
    /// Processes or threads.
    pub between: Between,
}

impl Setup {
    /// Header + payload: the largest message of the run.
    pub fn message_len(&self) -> usize {
        self.size + super::message::HEADER
    }
}

/// A size the mechanism cannot carry: the limit, where it is set, and how to raise it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LimitError(pub String);

/// Read an integer from `/proc/sys/...`.
pub fn proc_value(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Named resources the parent removes at the end of the run (and the signal handler on
/// Ctrl-C).
#[derive(Debug, Default)]
pub struct Cleanup {
    sysv: Vec<i32>,
}

impl Cleanup {
    /// Remove SysV queue `id` at the end.
    pub fn sysv(&mut self, id: i32) {
        sys::remember_sysv(id);
        self.sysv.push(id);
    }

    /// Remove everything now.
    pub fn release(&mut self) {
        for id in self.sysv.drain(..) {
            sys::msg_remove(id);
            sys::forget_sysv(id);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.release();
    }
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A private directory (mode 0700) under the temp dir for FIFOs and socket paths, removed
/// with everything in it by [`PrivateDir::remove`] or on drop (and on Ctrl-C).
#[derive(Debug)]
pub struct PrivateDir {
    dir: PathBuf,
    entries: Vec<(PathBuf, Option<usize>)>,
    slot: Option<usize>,
}

impl PrivateDir {
    /// Create `socklab-ipc-PID-N` in the temp dir.
    ///
    /// # Errors
    /// `mkdir`'s error.
    pub fn new() -> io::Result<PrivateDir> {
        use std::os::unix::fs::DirBuilderExt;
        let n = DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("socklab-ipc-{}-{n}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let slot = sys::remember_path(&dir);
        Ok(PrivateDir {
            dir,
            entries: Vec::new(),
            slot,
        })
    }

    /// A path inside the directory, removed with it.
    pub fn path(&mut self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        let slot = sys::remember_path(&p);
        self.entries.push((p.clone(), slot));
        p
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Remove the entries and the directory (the open ends keep working without names).
    pub fn remove(&mut self) {
        for (p, slot) in self.entries.drain(..) {
            let _ = std::fs::remove_file(&p);
            sys::forget_path(slot);
        }
        if self.slot.is_some() || self.dir.exists() {
            let _ = std::fs::remove_dir(&self.dir);
            sys::forget_path(self.slot.take());
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        self.remove();
    }
}

fn interrupted() -> io::Error {
    io::Error::from(io::ErrorKind::Interrupted)
}

/// An end over a byte stream (pipe, FIFO, stream socket): messages framed by the header's
/// length, read through a buffer so many small messages cost one `read`.
#[derive(Debug)]
pub struct StreamEnd {
    rd: OwnedFd,
    wr: OwnedFd,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of the current frame already in the caller's buffer.
    got: usize,
    /// The current frame's total length, once its header is in.
    total: Option<usize>,
    /// Bytes of the current message already written.
    sent: usize,
}

/// The read buffer of a stream end.
const INBUF: usize = 64 * 1024;

impl StreamEnd {
    /// An end reading from `rd` and writing to `wr` (the same socket twice, or two pipes).
    pub fn new(rd: OwnedFd, wr: OwnedFd) -> StreamEnd {
        StreamEnd {
            rd,
            wr,
            inbuf: vec![0; INBUF],
            start: 0,
            end: 0,
            got: 0,
            total: None,
            sent: 0,
        }
    }
}

/// An errno as an `io::Error`, `EINTR` as `Interrupted`.
pub fn errno(e: Errno) -> io::Error {
    if e == Errno::EINTR {
        interrupted()
    } else {
        io::Error::from(e)
    }
}

impl End for StreamEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        while self.sent < msg.len() {
            match nix::unistd::write(&self.wr, &msg[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) => return Err(errno(e)),
            }
        }
        self.sent = 0;
        Ok(())
    }

    fn recv(&mut self, out: &mut [u8]) -> io::Result<usize> {
        use super::message::{declared_len, HEADER};
        loop {
            if self.total.is_none() && self.got >= HEADER {
                let header: &[u8; HEADER] = out[..HEADER].try_into().expect("16 bytes");
                let total = HEADER + declared_len(header);
                if total > out.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a frame header announces {total} bytes, more than the {} expected",
                            out.len() - 1
                        ),
                    ));
                }
                self.total = Some(total);
            }
            let want = self.total.unwrap_or(HEADER);
            if self.got == want && self.total.is_some() {
                self.got = 0;
                self.total = None;
                return Ok(want);
            }
            let need = want - self.got;
            if self.start < self.end {
                let k = need.min(self.end - self.start);
                out[self.got..self.got + k]
                    .copy_from_slice(&self.inbuf[self.start..self.start + k]);
                self.start += k;
                self.got += k;
                continue;
            }
            // Nothing buffered: a large rest goes straight into the caller's buffer.
            let r = if need >= INBUF / 2 {
                nix::unistd::read(&self.rd, &mut out[self.got..want]).inspect(|&n| {
                    self.got += n;
                })
            } else {
                nix::unistd::read(&self.rd, &mut self.inbuf).inspect(|&n| {
                    self.start = 0;
                    self.end = n;
                })
            };
            match r {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the other end closed",
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(errno(e)),
            }
        }
    }
}

/// An end over a connected message socket (datagram or seqpacket): one `send` per message,
/// one `recv` per message; a datagram larger than the buffer is reported, never cut silently.
#[derive(Debug)]
pub struct PacketEnd {
    fd: OwnedFd,
}

impl PacketEnd {
    /// An end over a connected socket.
    pub fn new(sock: impl Into<OwnedFd>) -> PacketEnd {
        PacketEnd { fd: sock.into() }
    }
}

impl End for PacketEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd;
        let n = send(self.fd.as_raw_fd(), msg, MsgFlags::empty()).map_err(errno)?;
        if n != msg.len() {
            return Err(io::Error::other(format!(
                "a datagram send took {n} of {} bytes",
                msg.len()
            )));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        // MSG_TRUNC: the result is the datagram's real length, even if it did not fit.
        let n = recv(self.fd.as_raw_fd(), buf, MsgFlags::MSG_TRUNC).map_err(errno)?;
        if n > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a datagram of {n} bytes arrived, more than the {} expected",
                    buf.len() - 1
                ),
            ));
        }
        Ok(n)
    }
}

/// Make a datagram socket able to send `len`-byte messages: raise `SO_SNDBUF` (and
/// `SO_RCVBUF`) as far as `net.core.wmem_max` allows, then check the kernel's answer.
///
/// # Errors
/// [`LimitError`] naming the limit, or the `setsockopt` error.
pub fn fit_datagram(sock: &socket2::Socket, len: usize, what: &str) -> anyhow::Result<()> {
    let want = len + 1024;
    if sock.send_buffer_size()? < want + 32 {
        sock.set_send_buffer_size(want)?;
    }
    if sock.recv_buffer_size()? < want {
        sock.set_recv_buffer_size(want)?;
    }
    let got = sock.send_buffer_size()?;
    // A Unix datagram must fit in the send buffer less a little bookkeeping.
    if got < len + 32 {
        let wmem = proc_value("/proc/sys/net/core/wmem_max").unwrap_or(0);
        return Err(LimitError(format!(
            "{what}: a {len}-byte message (payload + 16-byte header) does not fit the socket send \
             buffer: it holds at most {got} bytes here (twice net.core.wmem_max = {wmem}); \
             raise it with `sysctl net.core.wmem_max={}`",
            len + 1024
        ))
        .into());
    }
    Ok(())
}
