//! One connection of an io_uring loop: its session, its output, and the one output
//! operation it may have in flight.
//!
//! Sends complete later, so the bytes handed to the kernel must stay put until then. The
//! connection keeps two queues: `sending`, which only the kernel reads while an operation is
//! in flight, and `out`, where the session queues new answers meanwhile; when `sending` is
//! empty the two change places. One operation at a time keeps the answers in order.
//!
//! File regions go out with the strategy of `--send`:
//! - `read`: the ring reads a block of the file into the connection's buffer, then sends it;
//! - `mmap`: a window of the file is mapped and sent from the mapping;
//! - `sendfile`: the ring `splice`s the file into a pipe of the connection's, then the pipe
//!   into the socket (io_uring has no `sendfile`; `splice` through a pipe is what
//!   `sendfile(2)` does inside the kernel, and the bytes never reach user space either).

use super::ring::Ring;
use crate::model::{contain, End, Slot};
use crate::output::{Outbox, Piece, SendStrategy};
use crate::service::Session;
use crate::sys::Mapping;
use socket2::Socket;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

/// Bytes of a file read per `read` round (as the other models' `read` strategy).
const FILE_BLOCK: usize = 256 * 1024;
/// Bytes of a file mapped per `mmap` window (as the other models).
const MMAP_WINDOW: usize = 4 << 20;
/// Pipe size asked for the `sendfile` strategy: bytes moved per pair of splices.
const PIPE_SIZE: usize = 256 * 1024;

/// The output operation a connection has in flight.
#[derive(Debug)]
enum Sending {
    /// None.
    Idle,
    /// A send of the bytes at the front of `sending`.
    Bytes,
    /// `read`: reading a block of the file into `block`.
    FileRead,
    /// `read`: sending `block[pos..len]`.
    Block { len: usize, pos: usize },
    /// `mmap`: sending the mapping from `pos`.
    Map { map: Mapping, pos: usize },
    /// `sendfile`: splicing the file into the pipe.
    SpliceIn,
    /// `sendfile`: splicing the pipe (holding `in_pipe` bytes) into the socket.
    SpliceOut { in_pipe: usize },
}

/// A pipe for the `sendfile` strategy's splices.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // A bigger pipe moves more per pair of splices; the default (64 KiB) if refused.
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Pipe {
            read,
            write,
            size: size.max(4096) as usize,
        })
    }
}

/// One connection of a loop.
#[derive(Debug)]
pub struct Conn<'a> {
    /// The socket (non-blocking; see [`Ring::accept`]).
    pub sock: Socket,
    /// Distinguishes this connection from earlier ones with the same token.
    pub gen: u32,
    slot: Slot<'a>,
    /// The protocol.
    pub session: Session,
    /// Where the session queues answers.
    pub out: Outbox,
    /// What the kernel is sending from (see the module doc).
    sending: Outbox,
    send: Sending,
    /// The operation in flight is a poll for room to send: `send`'s step is retried after.
    awaiting_room: bool,
    pipe: Option<Pipe>,
    block: Vec<u8>,
    /// A multishot receive is armed.
    pub recv_armed: bool,
    /// Its cancellation was asked for (reading paused).
    pub recv_cancelled: bool,
    /// Input that arrived while reading was paused, to be fed first when it resumes.
    pub held: Vec<u8>,
    /// The peer sent end-of-file.
    pub eof: bool,
    /// Being closed: waiting for its operations to finish before the socket is closed.
    pub closing: bool,
    /// Close once the output is out, for this reason (an HTTP 408 being sent).
    pub finishing: Option<crate::model::End>,
    /// When the connection last moved bytes (for the idle timeout).
    pub last_active: Instant,
    /// The deadline this connection has queued in the timers, if any.
    pub deadline: Option<Instant>,
    /// Already in this turn's list of connections to look at.
    pub touched: bool,
}

impl<'a> Conn<'a> {
    /// A new connection: the session opens (daytime queues its line here).
    ///
    /// # Errors
    /// [`End::Panic`] if opening the session panicked (the socket and slot are dropped:
    /// closed and released).
    pub fn new(
        sock: Socket,
        slot: Slot<'a>,
        ctx: &crate::model::Ctx,
        gen: u32,
        now: Instant,
    ) -> Result<Self, (End, Slot<'a>)> {
        let mut out = ctx.service.outbox();
        let session = match contain(|| ctx.service.open(&mut out)) {
            Ok(s) => s,
            Err(end) => return Err((end, slot)),
        };
        Ok(Conn {
            sock,
            gen,
            slot,
            session,
            out,
            sending: ctx.service.outbox(),
            send: Sending::Idle,
            awaiting_room: false,
            pipe: None,
            block: Vec::new(),
            recv_armed: false,
            recv_cancelled: false,
            held: Vec::new(),
            eof: false,
            closing: false,
            finishing: None,
            last_active: now,
            deadline: None,
            touched: false,
        })
    }

    /// Feed `data` to the session. The session's own steps run inside the panic boundary
    /// ([`contain`]): a bug reached by this connection closes it, not the loop.
    ///
    /// # Errors
    /// The protocol refused the input, or the session panicked.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), End> {
        contain(|| self.session.receive(data, &mut self.out))?.map_err(End::Protocol)
    }

    /// The peer sent end-of-file: tell the session.
    ///
    /// # Errors
    /// The peer stopped in the middle of a request, or the session panicked.
    pub fn end_of_input(&mut self) -> Result<(), End> {
        self.eof = true;
        contain(|| self.session.end_of_input())?.map_err(End::Protocol)
    }

    /// The output drained while requests waited for it (`Session::has_backlog`): answer
    /// them.
    ///
    /// # Errors
    /// The session panicked.
    pub fn resume(&mut self) -> Result<(), End> {
        contain(|| self.session.resume(&mut self.out))
    }

    /// The session's own deadline passed (HTTP: queue the 408).
    ///
    /// # Errors
    /// The session panicked.
    pub fn deadline_passed(&mut self) -> Result<(), End> {
        contain(|| self.session.on_deadline(&mut self.out))
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> &str {
        &self.slot.peer
    }

    /// Requests wait for the output to drain before they are answered.
    pub fn has_backlog(&self) -> bool {
        self.session.has_backlog()
    }

    /// Whether input waits in the socket that no receive has reported yet (a connection
    /// accepted just before a stop): such a connection is not idle.
    pub fn input_waiting(&self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            crate::model::recv(&self.sock, &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT),
            Ok(1)
        )
    }

    /// Output queued and not yet sent.
    pub fn pending_out(&self) -> usize {
        self.out.pending() + self.sending.pending()
    }

    /// No output operation in flight.
    pub fn send_idle(&self) -> bool {
        matches!(self.send, Sending::Idle)
    }

    /// Nothing in flight and nothing queued.
    pub fn output_done(&self) -> bool {
        self.send_idle() && self.pending_out() == 0
    }

    /// If no output operation is in flight and output is queued, start one.
    ///
    /// # Errors
    /// Submitting failed, or a file region could not be mapped (the file shrank).
    pub fn start_output(&mut self, ring: &mut Ring, token: usize) -> io::Result<()> {
        if !self.send_idle() {
            return Ok(());
        }
        if self.sending.is_empty() {
            std::mem::swap(&mut self.sending, &mut self.out);
        }
        self.send = match self.sending.piece() {
            None => return Ok(()),
            Some(Piece::Bytes { .. }) => Sending::Bytes,
            Some(Piece::File { file, offset, len }) => match self.sending.strategy() {
                SendStrategy::Read => Sending::FileRead,
                SendStrategy::Mmap => {
                    let window = (len as usize).min(MMAP_WINDOW);
                    Sending::Map {
                        map: Mapping::new(file, offset, window)?,
                        pos: 0,
                    }
                }
                SendStrategy::Sendfile => Sending::SpliceIn,
            },
        };
        self.submit(ring, token)
    }

    /// Submit the operation `self.send` names.
    fn submit(&mut self, ring: &mut Ring, token: usize) -> io::Result<()> {
        let fd = self.sock.as_raw_fd();
        let gen = self.gen;
        match &mut self.send {
            Sending::Idle => Ok(()),
            Sending::Bytes => {
                let Some(Piece::Bytes { bytes, more }) = self.sending.piece() else {
                    return Err(io::Error::other("output queue changed under a send"));
                };
                // SAFETY: the bytes are in `sending`'s front buffer, which nothing changes
                // until this send's completion: the session queues into `out` meanwhile,
                // `sending` is consumed only by the completion, and the connection is not
                // dropped while an operation is in flight (the loop frees it only when
                // `send_idle`).
                unsafe { ring.send(fd, bytes.as_ptr(), bytes.len(), more, token, gen) }
            }
            Sending::FileRead => {
                let Some(Piece::File { file, offset, len }) = self.sending.piece() else {
                    return Err(io::Error::other("output queue changed under a read"));
                };
                let want = (len as usize).min(FILE_BLOCK);
                if self.block.len() < want {
                    self.block.resize(FILE_BLOCK, 0);
                }
                let (file, ptr) = (file.as_raw_fd(), self.block.as_mut_ptr());
                // SAFETY: `block` holds at least `want` bytes and is neither resized, read
                // nor dropped until this read's completion (the state stays `FileRead`
                // until then, and the connection lives while an operation is in flight).
                unsafe { ring.read(file, ptr, want, offset, token, gen) }
            }
            Sending::Block { len, pos } => {
                let rest = &self.block[*pos..*len];
                // SAFETY: `block` is not touched until this send's completion (state `Block`),
                // and the connection lives while an operation is in flight.
                unsafe { ring.send(fd, rest.as_ptr(), rest.len(), false, token, gen) }
            }
            Sending::Map { map, pos } => {
                let rest = &map.as_slice()[*pos..];
                // SAFETY: the mapping is owned by the state `Map`, which lasts until this
                // send's completion; the connection lives while an operation is in flight.
                unsafe { ring.send(fd, rest.as_ptr(), rest.len(), false, token, gen) }
            }
            Sending::SpliceIn => {
                let Some(Piece::File { file, offset, len }) = self.sending.piece() else {
                    return Err(io::Error::other("output queue changed under a splice"));
                };
                if self.pipe.is_none() {
                    self.pipe = Some(Pipe::new()?);
                }
                let pipe = self.pipe.as_ref().expect("just made");
                let n = (len as usize).min(pipe.size);
                ring.splice(
                    file.as_raw_fd(),
                    Some(offset),
                    pipe.write.as_raw_fd(),
                    n,
                    token,
                    gen,
                )
            }
            Sending::SpliceOut { in_pipe } => {
                let pipe = self
                    .pipe
                    .as_ref()
                    .ok_or_else(|| io::Error::other("no pipe"))?;
                ring.splice(pipe.read.as_raw_fd(), None, fd, *in_pipe, token, gen)
            }
        }
    }

    /// The output operation completed with `res`: account for what went, and submit the
    /// next step of the same piece if any (a file block's remainder, the pipe's contents).
    /// Starting the next piece is left to [`Conn::start_output`].
    ///
    /// # Errors
    /// The operation failed (reset, broken pipe...), or a file turned out shorter than its
    /// region (the file shrank while being sent).
    pub fn output_completed(&mut self, res: i32, ring: &mut Ring, token: usize) -> io::Result<()> {
        if std::mem::take(&mut self.awaiting_room) {
            // The poll for room ended: retry the step it waited for.
            if res < 0 {
                self.send = Sending::Idle;
                return Err(io::Error::from_raw_os_error(-res));
            }
            return self.submit(ring, token);
        }
        if res < 0 {
            let to_socket = matches!(
                self.send,
                Sending::Bytes
                    | Sending::Block { .. }
                    | Sending::Map { .. }
                    | Sending::SpliceOut { .. }
            );
            return match -res {
                libc::EAGAIN if to_socket => {
                    // The socket is full (a splice, run on a kernel worker, does not wait):
                    // wait for room, then retry.
                    self.awaiting_room = true;
                    ring.poll_out(self.sock.as_raw_fd(), token, self.gen)
                }
                libc::EINTR | libc::EAGAIN => self.submit(ring, token),
                errno => {
                    self.send = Sending::Idle;
                    Err(io::Error::from_raw_os_error(errno))
                }
            };
        }
        let n = res as usize;
        let truncated = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while being sent",
            )
        };
        self.send = match std::mem::replace(&mut self.send, Sending::Idle) {
            Sending::Idle => Sending::Idle,
            Sending::Bytes => {
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                self.sending.consume(n);
                Sending::Idle
            }
            Sending::FileRead => {
                if n == 0 {
                    return Err(truncated());
                }
                Sending::Block { len: n, pos: 0 }
            }
            Sending::Block { len, pos } => {
                self.sending.consume(n);
                if pos + n < len {
                    Sending::Block { len, pos: pos + n }
                } else {
                    Sending::Idle
                }
            }
            Sending::Map { map, pos } => {
                self.sending.consume(n);
                if pos + n < map.as_slice().len() {
                    Sending::Map { map, pos: pos + n }
                } else {
                    Sending::Idle
                }
            }
            Sending::SpliceIn => {
                if n == 0 {
                    return Err(truncated());
                }
                Sending::SpliceOut { in_pipe: n }
            }
            Sending::SpliceOut { in_pipe } => {
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                self.sending.consume(n);
                if n < in_pipe {
                    Sending::SpliceOut {
                        in_pipe: in_pipe - n,
                    }
                } else {
                    Sending::Idle
                }
            }
        };
        self.submit(ring, token)
    }

    /// The output operation ended because the connection is closing: nothing more is sent.
    pub fn output_abandoned(&mut self) {
        self.send = Sending::Idle;
        self.awaiting_room = false;
    }
}
