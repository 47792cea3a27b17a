//! The server designs ("models"), one file each, and what they all share.
//!
//! | model | file | design |
//! | --- | --- | --- |
//! | `iterative` | [`iterative`] | one connection at a time |
//! | `fork` | [`fork`] | a process per connection |
//! | `prefork` | [`prefork`] | N processes blocking in `accept` on one listener |
//! | `thread` | [`thread`] | a thread per connection |
//! | `pool` | [`pool`] | a dispatcher and N worker threads around a bounded queue |
//! | `select` | [`select`] | one thread, `select(2)` on `fd_set`s (descriptors below 1024) |
//! | `poll` | [`poll`] | one thread, `poll(2)` |
//! | `epoll` | [`epoll`] | one thread, `epoll`, edge- or level-triggered |
//! | `reactors` | [`reactors`] | N epoll loops, each with its own `SO_REUSEPORT` listener |
//! | `uring` | [`uring`] | N io_uring loops (the kernel does the I/O), each with its own listener |
//! | `tokio` | [`tokio`] | the same sessions on a tokio runtime: the reference point |
//!
//! Shared here: the [`Ctx`] every model receives (service, options, connection limit),
//! accepting with error handling ([`accept_action`]), the blocking connection driver
//! ([`serve_blocking`]) used by the blocking designs, the [`Tracker`] thread designs use to
//! close idle connections on shutdown, and [`contain`], the panic boundary every model puts
//! around one connection's handling: a panic there (a bug) is logged and closes that
//! connection; the loop, worker, process or server goes on. The event loops share
//! [`evloop`].

pub mod epoll;
pub mod evloop;
pub mod fork;
pub mod iterative;
pub mod poll;
pub mod pool;
pub mod prefork;
pub mod reactors;
pub mod select;
pub mod thread;
pub mod tokio;
pub mod uring;

use crate::net::{display_addr, Listener};
use crate::output::Flush;
use crate::service::{ProtocolError, ServiceConfig};
use crate::signals::{self, Signals};
use crate::sys::SharedCounter;
use socket2::{SockAddr, Socket};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The server designs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ModelKind {
    /// One connection at a time (the course's sequential server).
    Iterative,
    /// A process per connection.
    Fork,
    /// `--workers` processes blocking in `accept` on one shared listener.
    Prefork,
    /// A thread per connection.
    Thread,
    /// A dispatcher thread and `--workers` threads around a bounded queue.
    Pool,
    /// One thread, non-blocking sockets, `select(2)` (descriptors below `FD_SETSIZE` only).
    Select,
    /// One thread, non-blocking sockets, `poll(2)`.
    Poll,
    /// One thread, non-blocking sockets, `epoll` (`--trigger edge|level`).
    Epoll,
    /// `--workers` epoll loops, each with its own `SO_REUSEPORT` listener.
    Reactors,
    /// `--workers` io_uring loops, each with its own `SO_REUSEPORT` listener.
    Uring,
    /// The sessions driven by a tokio multi-threaded runtime.
    Tokio,
}

impl ModelKind {
    /// Every model, in the order the course introduces them.
    pub const ALL: [ModelKind; 11] = [
        ModelKind::Iterative,
        ModelKind::Fork,
        ModelKind::Prefork,
        ModelKind::Thread,
        ModelKind::Pool,
        ModelKind::Select,
        ModelKind::Poll,
        ModelKind::Epoll,
        ModelKind::Reactors,
        ModelKind::Uring,
        ModelKind::Tokio,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Iterative => "iterative",
            ModelKind::Fork => "fork",
            ModelKind::Prefork => "prefork",
            ModelKind::Thread => "thread",
            ModelKind::Pool => "pool",
            ModelKind::Select => "select",
            ModelKind::Poll => "poll",
            ModelKind::Epoll => "epoll",
            ModelKind::Reactors => "reactors",
            ModelKind::Uring => "uring",
            ModelKind::Tokio => "tokio",
        }
    }

    /// Default `--workers` for this model on a machine with `cores` cores.
    pub fn default_workers(self, cores: usize) -> usize {
        match self {
            ModelKind::Pool => 4 * cores,
            _ => cores,
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Edge- or level-triggered epoll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Trigger {
    /// `EPOLLET`: notified once per change; every ready socket must be drained to `EAGAIN`.
    Edge,
    /// The default of `epoll` and `poll`: notified as long as the socket is ready.
    Level,
}

/// Options every model understands.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Worker processes/threads/loops (prefork, pool, reactors, tokio).
    pub workers: usize,
    /// Edge- or level-triggered (epoll, reactors).
    pub trigger: Trigger,
    /// Close a connection idle this long.
    pub idle_timeout: Duration,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    pub grace: Duration,
    /// Connections over this many are accepted and closed at once.
    pub max_conns: Option<usize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            workers: 1,
            trigger: Trigger::Edge,
            idle_timeout: Duration::from_secs(60),
            grace: Duration::from_secs(5),
            max_conns: None,
        }
    }
}

/// Size of the buffer a connection reads into (an event loop's one buffer; the most a
/// connection's own buffer grows to, see [`ReadBuf`]).
pub const READ_BUF: usize = 64 * 1024;

/// Size of a connection's own read buffer while its reads are small.
pub const SMALL_READ: usize = 4 * 1024;

/// The read buffer of a connection that has one of its own (the blocking designs, tokio's
/// tasks): [`SMALL_READ`] bytes while reads are small, four times larger each time a read
/// fills it (up to [`READ_BUF`]), small again when the connection is idle. A `vec!` of
/// 64 KiB from the heap is zeroed, hence resident, at once: 2,000 idle tokio connections
/// cost 115 MiB with a fixed 64 KiB buffer each.
#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
}

impl Default for ReadBuf {
    fn default() -> Self {
        ReadBuf {
            buf: vec![0; SMALL_READ],
        }
    }
}

impl ReadBuf {
    /// The buffer to read into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `n` bytes, just read.
    pub fn data(&self, n: usize) -> &[u8] {
        &self.buf[..n.min(self.buf.len())]
    }

    /// A read returned `n` bytes, now consumed: if it filled the buffer, more is coming in
    /// large pieces, grow (the bytes read are gone then). Returns whether the read filled
    /// the buffer.
    pub fn filled(&mut self, n: usize) -> bool {
        let full = n == self.buf.len();
        if full && self.buf.len() < READ_BUF {
            self.buf = vec![0; (self.buf.len() * 4).min(READ_BUF)];
        }
        full
    }

    /// The connection waits for a new request: give a large buffer back.
    pub fn idle(&mut self) {
        if self.buf.len() > SMALL_READ {
            self.buf = vec![0; SMALL_READ];
        }
    }
}

/// How long a connection over `--max-conns` waits for a slot before it is closed. The count
/// lags a client's close by the time the server takes to see it (a loop's turn, another
/// thread, a child's exit and reaping): without this wait, strictly sequential clients
/// under `--max-conns 1` were refused most of the time.
pub const ADMIT_WAIT: Duration = Duration::from_millis(50);

/// What every model is given: the service, the options, and the live-connection count
/// (in shared memory, so forked processes count together).
#[derive(Debug)]
pub struct Ctx {
    /// The protocol to serve.
    pub service: ServiceConfig,
    /// The model options.
    pub opts: ServeOptions,
    /// Open connections: cell 0 for every model, plus one cell per preforked worker, so
    /// that the parent can take back the count of a worker that was killed.
    active: SharedCounter,
}

impl Ctx {
    /// A context for `service` under `opts`.
    ///
    /// # Errors
    /// When the shared counter cannot be mapped.
    pub fn new(service: ServiceConfig, opts: ServeOptions) -> io::Result<Ctx> {
        let cells = 1 + opts.workers.max(1);
        Ok(Ctx {
            service,
            opts,
            active: SharedCounter::with_cells(cells)?,
        })
    }

    /// Connections open now, in all processes of this server.
    pub fn active(&self) -> usize {
        self.active.total()
    }

    /// Take a slot for a new connection from `peer`, or `None` (and the connection closed
    /// by the caller dropping it, a warning logged) when `--max-conns` are already open.
    pub fn admit(&self, peer: &SockAddr) -> Option<Slot<'_>> {
        let slot = self.try_admit(peer);
        if slot.is_none() {
            self.refuse(peer);
        }
        slot
    }

    /// [`Ctx::admit`] without the warning: the caller may try again ([`ADMIT_WAIT`]).
    pub fn try_admit(&self, peer: &SockAddr) -> Option<Slot<'_>> {
        self.admit_in(0, peer)
    }

    /// Log that a connection from `peer` is closed for `--max-conns`.
    pub fn refuse(&self, peer: &SockAddr) {
        tracing::warn!(peer = %display_addr(peer), max = self.opts.max_conns, "connection limit reached: closing new connection");
    }

    /// Admission for an accept loop that has nothing else to do meanwhile (iterative,
    /// thread, pool, fork, a preforked worker): over the limit, try again every
    /// millisecond for up to [`ADMIT_WAIT`], calling `meanwhile` in between (the fork parent
    /// reaps its children there), then refuse. `worker` counts the slot in a preforked
    /// worker's own cell ([`Ctx::release_worker`]).
    pub fn admit_waiting(
        &self,
        worker: Option<usize>,
        peer: &SockAddr,
        mut meanwhile: impl FnMut(),
    ) -> Option<Slot<'_>> {
        let cell = worker.map_or(0, |w| 1 + w);
        let deadline = Instant::now() + ADMIT_WAIT;
        loop {
            if let Some(slot) = self.admit_in(cell, peer) {
                return Some(slot);
            }
            if Instant::now() >= deadline || signals::stop_requested() {
                self.refuse(peer);
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
            meanwhile();
        }
    }

    fn admit_in(&self, cell: usize, peer: &SockAddr) -> Option<Slot<'_>> {
        self.active.cell(cell).fetch_add(1, Ordering::SeqCst);
        if let Some(max) = self.opts.max_conns {
            // Every admission counts itself before looking at the total: two at once may
            // both be refused at the limit, never both admitted over it.
            if self.active.total() > max {
                self.active.cell(cell).fetch_sub(1, Ordering::SeqCst);
                return None;
            }
        }
        let peer = display_addr(peer);
        tracing::debug!(%peer, "connection open");
        Some(Slot {
            ctx: self,
            cell,
            peer,
            opened: Instant::now(),
            held: true,
        })
    }

    /// A preforked worker died (reaped by the parent): release the slots it held. Killed
    /// while serving, it could not release them itself, and `--max-conns` would otherwise
    /// refuse clients for good.
    pub fn release_worker(&self, worker: usize) {
        let held = self.active.cell(1 + worker).swap(0, Ordering::SeqCst);
        if held > 0 {
            tracing::warn!(
                worker,
                held,
                "released the connection slots of a dead worker"
            );
        }
    }
}

/// A connection's place in the count; released (and the close logged) when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    ctx: &'a Ctx,
    cell: usize,
    /// The peer's address, for logs.
    pub peer: String,
    opened: Instant,
    held: bool,
}

impl Slot<'_> {
    /// Hand the count over to someone else (the fork parent, which releases it when it
    /// reaps the child): dropping this slot will not decrement it.
    pub fn hand_over(mut self) {
        self.held = false;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            self.ctx
                .active
                .cell(self.cell)
                .fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(peer = %self.peer, secs = self.opened.elapsed().as_secs_f64(), "connection closed");
        }
    }
}

impl Ctx {
    /// Release a slot handed over with [`Slot::hand_over`] (a reaped fork child).
    pub fn release_handed_over(&self) {
        self.active.cell(0).fetch_sub(1, Ordering::SeqCst);
    }
}

/// What to do after `accept` failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptAction {
    /// Nothing pending after all (`EAGAIN`): wait for readiness again.
    Wait,
    /// A transient error for that one connection (`ECONNABORTED`, `EINTR`, `EPROTO`,
    /// `EPERM`...): accept again.
    Retry,
    /// Out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): stop accepting
    /// for this long, keep serving the open connections, then try again. Without this pause
    /// a level-triggered loop would spin on the still-pending connection and burn a core.
    Pause(Duration),
    /// The listener itself is broken (`EBADF`, `EINVAL`...): give up.
    Fatal,
}

/// How long to stop accepting when descriptors run out.
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Classify an `accept` error.
pub fn accept_action(err: &io::Error) -> AcceptAction {
    use nix::errno::Errno;
    match err.raw_os_error().map(Errno::from_raw) {
        Some(Errno::EAGAIN) => AcceptAction::Wait,
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM) => {
            tracing::warn!(error = %err, "accept: out of resources; pausing accepts");
            AcceptAction::Pause(ACCEPT_PAUSE)
        }
        Some(
            Errno::EBADF | Errno::EINVAL | Errno::ENOTSOCK | Errno::EOPNOTSUPP | Errno::EFAULT,
        ) => AcceptAction::Fatal,
        _ => {
            tracing::debug!(error = %err, "accept: transient error");
            AcceptAction::Retry
        }
    }
}

/// Accept one connection, non-blocking or not, close-on-exec in the same call.
///
/// # Errors
/// `accept4`'s errno, to be classified with [`accept_action`].
pub fn accept(listener: &Socket, nonblocking: bool) -> io::Result<(Socket, SockAddr)> {
    let mut flags = libc::SOCK_CLOEXEC;
    if nonblocking {
        flags |= libc::SOCK_NONBLOCK;
    }
    let (s, a) = listener.accept4(flags)?;
    if a.is_ipv4() || a.is_ipv6() {
        // Answers are small and written whole: do not let Nagle hold them back.
        let _ = s.set_tcp_nodelay(true);
    }
    Ok((s, a))
}

/// What [`accept_or_signal`] saw.
#[derive(Debug)]
pub enum Accepted {
    /// A new connection and its peer.
    Conn(Socket, SockAddr),
    /// SIGINT/SIGTERM: stop accepting.
    Stop,
    /// A signal other than stop woke us (SIGCHLD): let the caller look, then call again.
    Signal,
}

/// What [`wait_signal_or`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Woken {
    /// The signal pipe had a byte (already drained).
    pub signal: bool,
    /// The watched descriptor is readable.
    pub ready: bool,
}

/// Wait until the signal pipe or `fd` is readable, or `timeout` passes. `fd` may be
/// negative to wait for signals alone (`poll` skips negative descriptors). `EINTR` counts as
/// a signal.
///
/// # Errors
/// `poll`'s errno other than `EINTR`.
pub fn wait_signal_or(
    signals: &Signals,
    fd: RawFd,
    timeout: Option<Duration>,
) -> io::Result<Woken> {
    let pollfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [pollfd(signals.fd().as_raw_fd()), pollfd(fd)];
    match crate::sys::poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            return Ok(Woken {
                signal: true,
                ready: false,
            })
        }
        Err(e) => return Err(e),
    }
    if fds[0].revents != 0 {
        signals.drain();
    }
    Ok(Woken {
        signal: fds[0].revents != 0,
        ready: fds[1].revents != 0,
    })
}

/// The accept loop of the blocking designs: wait in `poll` for the listener *or* the signal
/// pipe, then accept (blocking sockets for the connection). Accept errors are handled here:
/// transient ones retried, descriptor exhaustion paused (not spun on).
///
/// # Errors
/// A fatal listener error.
pub fn accept_or_signal(listener: &Listener, signals: &Signals) -> io::Result<Accepted> {
    let mut paused_until: Option<Instant> = None;
    loop {
        if signals::stop_requested() {
            return Ok(Accepted::Stop);
        }
        let now = Instant::now();
        let (fd, timeout) = match paused_until {
            Some(t) if t > now => (-1, Some(t - now)),
            _ => (listener.socket.as_raw_fd(), None),
        };
        let woken = wait_signal_or(signals, fd, timeout)?;
        if woken.signal {
            if signals::stop_requested() {
                return Ok(Accepted::Stop);
            }
            return Ok(Accepted::Signal);
        }
        if !woken.ready {
            continue;
        }
        match accept(&listener.socket, false) {
            Ok((s, a)) => return Ok(Accepted::Conn(s, a)),
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => {}
                AcceptAction::Pause(d) => paused_until = Some(Instant::now() + d),
                AcceptAction::Fatal => return Err(e),
            },
        }
    }
}

/// Stop listening at once on a stop request: `shutdown(2)` on a listening socket makes the
/// kernel refuse new connections (`ECONNREFUSED`) instead of queueing them in a backlog
/// nobody will accept from during the grace period. (TCP connections already queued and not
/// yet accepted are reset.) The descriptor itself stays open until the server exits.
pub fn stop_listening(listener: &Socket) {
    if let Err(e) = listener.shutdown(std::net::Shutdown::Read) {
        tracing::debug!("shutdown of the listener: {e}");
    }
}

/// `loop { conn = accept(); handle(conn) }` until a stop request: the outer loop of the
/// iterative, thread and pool designs. Connections over `--max-conns` are closed here.
///
/// # Errors
/// A fatal listener error.
pub fn for_each_connection<'a>(
    listener: &Listener,
    ctx: &'a Ctx,
    signals: &Signals,
    mut handle: impl FnMut(Socket, Slot<'a>),
) -> io::Result<()> {
    loop {
        match accept_or_signal(listener, signals)? {
            Accepted::Stop => {
                stop_listening(&listener.socket);
                return Ok(());
            }
            Accepted::Signal => {}
            Accepted::Conn(sock, peer) => {
                if let Some(slot) = ctx.admit_waiting(None, &peer, || {}) {
                    handle(sock, slot);
                }
            }
        }
    }
}

/// A connection known to a [`Tracker`]: the socket, and whether a request is in flight.
#[derive(Debug)]
pub struct Tracked {
    /// The connection.
    pub socket: Socket,
    /// Set while part of a request has arrived and its answer is not fully sent.
    pub busy: AtomicBool,
    id: u64,
}

/// The open connections of a thread design, so that on shutdown the main thread can close
/// the idle ones (`shutdown(SHUT_RD)` wakes a thread blocked in `recv` with end-of-file)
/// and, when the grace period is over, all of them.
#[derive(Debug, Default)]
pub struct Tracker {
    conns: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Tracker {
    /// Record a new connection.
    pub fn add(&self, socket: Socket) -> Arc<Tracked> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let t = Arc::new(Tracked {
            socket,
            busy: AtomicBool::new(false),
            id,
        });
        self.lock().insert(id, t.clone());
        t
    }

    /// Forget a connection (its thread is done with it).
    pub fn remove(&self, t: &Arc<Tracked>) {
        self.lock().remove(&t.id);
    }

    /// Number of connections still open.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        // A panicking connection thread must not take shutdown down with it.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close the reading side of every idle connection: its thread sees end-of-file,
    /// answers what already arrived and exits.
    pub fn close_idle(&self) {
        for t in self.lock().values() {
            if !t.busy.load(Ordering::SeqCst) {
                let _ = t.socket.shutdown(std::net::Shutdown::Read);
            }
        }
    }

    /// Shut down every connection both ways (the grace period is over).
    pub fn close_all(&self) {
        for t in self.lock().values() {
            let _ = t.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// After a stop: close idle connections, wait up to `grace` for the busy ones to finish,
    /// then cut the rest.
    pub fn drain(&self, grace: Duration) {
        self.close_idle();
        let deadline = Instant::now() + grace;
        while !self.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !self.is_empty() {
            tracing::warn!(
                open = self.len(),
                "grace period over: closing remaining connections"
            );
            self.close_all();
            let deadline = Instant::now() + Duration::from_secs(1);
            while !self.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// How a connection ended, for the log.
#[derive(Debug)]
pub enum End {
    /// The peer closed between requests (or the session was done).
    Closed,
    /// Idle longer than `--idle-timeout`: no input while waiting for a request, or no byte
    /// of output accepted by the peer while answers waited.
    IdleTimeout,
    /// The session's own deadline passed (an HTTP request head too slow: 408 sent).
    Deadline,
    /// The server is stopping and the connection was idle, or the grace period is over.
    Shutdown,
    /// The peer sent something the protocol refuses.
    Protocol(ProtocolError),
    /// A send or receive failed (reset, broken pipe...).
    Io(io::Error),
    /// The connection's handling panicked (a bug in socklab): caught at the connection
    /// boundary by [`contain`].
    Panic(String),
}

impl End {
    /// Log the end of a connection at the right level: protocol errors are warnings (a
    /// client misbehaved), a panic is an error (socklab misbehaved), the rest is
    /// connection-level detail.
    pub fn log(&self, peer: &str) {
        match self {
            End::Closed => {}
            End::IdleTimeout => tracing::debug!(%peer, "idle timeout"),
            End::Deadline => tracing::debug!(%peer, "request deadline passed"),
            End::Shutdown => tracing::debug!(%peer, "closed for shutdown"),
            End::Protocol(e) => tracing::warn!(%peer, "protocol error: {e}; closing connection"),
            End::Io(e) => tracing::debug!(%peer, "connection error: {e}"),
            End::Panic(m) => tracing::error!(
                %peer,
                "connection handler panicked: {m}; closing that connection, serving the others"
            ),
        }
    }
}

/// Run one step of a connection's handling (opening its session, feeding it, flushing,
/// its deadline) and turn a panic into [`End::Panic`]: the boundary that keeps a bug
/// reached by one connection from taking down a loop, a worker thread or the server. The
/// caller closes that connection; its state is dropped, never used again, which is why
/// asserting unwind safety here is sound.
///
/// # Errors
/// [`End::Panic`] with the panic's message.
pub fn contain<T>(step: impl FnOnce() -> T) -> Result<T, End> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(step)).map_err(|payload| {
        let msg = if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic without a message".to_string()
        };
        End::Panic(msg)
    })
}

/// The earlier of two optional deadlines.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What [`wait_for`] saw.
enum Waited {
    /// The socket is ready (or in error: the next call reports it).
    Ready,
    /// A signal arrived (`EINTR`, or a byte on the wake-up pipe, drained).
    Signal,
    /// The deadline passed.
    Timeout,
}

/// Wait until `sock` has `events` (`POLLIN`/`POLLOUT`), a signal arrives (on `wake`, the
/// signal pipe, when the process serves one connection at a time), or `deadline` passes.
fn wait_for(
    sock: &Socket,
    events: i16,
    wake: Option<BorrowedFd<'_>>,
    deadline: Option<Instant>,
) -> io::Result<Waited> {
    let timeout = match deadline {
        Some(d) => match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Some(left),
            _ => return Ok(Waited::Timeout),
        },
        None => None,
    };
    let mut fds = [
        libc::pollfd {
            fd: sock.as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.map_or(-1, |w| w.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    match crate::sys::poll(&mut fds, timeout) {
        Ok(0) => Ok(Waited::Timeout),
        Ok(_) if fds[1].revents != 0 => {
            if let Some(w) = wake {
                signals::drain_fd(w);
            }
            Ok(Waited::Signal)
        }
        Ok(_) => Ok(Waited::Ready),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Waited::Signal),
        Err(e) => Err(e),
    }
}

/// Serve one connection until it ends: the loop of the course's `srv_rev_sec`, generalised
/// to any session. Used by iterative, fork, prefork, thread and pool, inside the panic
/// boundary ([`contain`]).
///
/// The thread blocks, as the course's blocking servers do, but in `poll(2)` rather than in
/// `recv`/`send`, so that every wait has a real deadline: the idle timeout while waiting for
/// a request, the session's own deadline (HTTP's request head), the idle timeout again while
/// the peer accepts no byte of output (a `SO_SNDTIMEO` restarts with every partial send, so
/// a peer trickling window updates was cut only after several timeouts), and the grace
/// period once the server is stopping. `wake`, the signal pipe, is watched too where the
/// process serves one connection at a time (iterative, fork, prefork): a stop request then
/// never waits for the next timeout; thread designs wake their connections through the
/// [`Tracker`] instead.
///
/// `busy` is kept equal to "a request is in flight", for a [`Tracker`]. On a stop request the
/// connection is closed as soon as it is idle; a request already in flight is finished,
/// within the grace period.
pub fn serve_blocking(
    sock: &Socket,
    ctx: &Ctx,
    busy: &AtomicBool,
    wake: Option<BorrowedFd<'_>>,
) -> End {
    contain(|| drive_blocking(sock, ctx, busy, wake)).unwrap_or_else(|end| end)
}

fn drive_blocking(
    sock: &Socket,
    ctx: &Ctx,
    busy: &AtomicBool,
    wake: Option<BorrowedFd<'_>>,
) -> End {
    if let Err(e) = sock.set_nonblocking(true) {
        return End::Io(e);
    }
    let idle = Some(ctx.opts.idle_timeout).filter(|d| !d.is_zero());
    let mut out = ctx.service.outbox();
    let mut session = ctx.service.open(&mut out);
    let mut buf = ReadBuf::default();
    let mut eof = false;
    let mut last_input = Instant::now();
    // The last read filled the buffer: more may be waiting, read again before waiting.
    let mut full_read = false;
    let mut stop_seen: Option<Instant> = None;
    loop {
        if stop_seen.is_none() && signals::stop_requested() {
            stop_seen = Some(Instant::now());
        }
        // Send everything queued; the peer must take a byte at least every idle timeout.
        let mut last_sent = Instant::now();
        loop {
            let before = out.pending();
            match out.flush(sock) {
                Ok(Flush::Done) => break,
                Ok(Flush::Blocked) => {}
                Err(e) => return End::Io(e),
            }
            if out.pending() < before {
                last_sent = Instant::now();
            }
            let grace_end = stop_seen.map(|t| t + ctx.opts.grace);
            match wait_for(
                sock,
                libc::POLLOUT,
                wake,
                earliest(idle.map(|i| last_sent + i), grace_end),
            ) {
                Ok(Waited::Ready) => {}
                Ok(Waited::Signal) => {
                    if stop_seen.is_none() && signals::stop_requested() {
                        stop_seen = Some(Instant::now());
                    }
                }
                Ok(Waited::Timeout) if grace_end.is_some_and(|g| g <= Instant::now()) => {
                    return End::Shutdown
                }
                Ok(Waited::Timeout) => return End::IdleTimeout,
                Err(e) => return End::Io(e),
            }
        }
        if session.has_backlog() {
            // Requests waited for the output to drain: answer the next batch.
            session.resume(&mut out);
            continue;
        }
        if eof || session.done() {
            return End::Closed;
        }
        let in_flight = session.mid_request();
        busy.store(in_flight, Ordering::SeqCst);
        if !in_flight && !full_read {
            buf.idle();
        }
        // Stopping with nothing in flight: answer only what has already arrived.
        let stopping_idle = stop_seen.is_some() && !in_flight;
        if !full_read && !stopping_idle {
            let grace_end = stop_seen.map(|t| t + ctx.opts.grace);
            let deadline = earliest(
                earliest(idle.map(|i| last_input + i), session.deadline()),
                grace_end,
            );
            match wait_for(sock, libc::POLLIN, wake, deadline) {
                Ok(Waited::Ready) => {}
                Ok(Waited::Signal) => continue,
                Ok(Waited::Timeout) => {
                    let now = Instant::now();
                    if session.deadline().is_some_and(|d| d <= now) {
                        session.on_deadline(&mut out);
                        let _ = out.flush(sock);
                        return End::Deadline;
                    }
                    if grace_end.is_some_and(|g| g <= now) {
                        return End::Shutdown;
                    }
                    return End::IdleTimeout;
                }
                Err(e) => return End::Io(e),
            }
        }
        let n = match recv(sock, buf.space(), 0) {
            Ok(0) => {
                eof = true;
                full_read = false;
                if let Err(e) = session.end_of_input() {
                    return End::Protocol(e);
                }
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                full_read = false;
                if stopping_idle {
                    return End::Shutdown;
                }
                continue;
            }
            Err(e) => return End::Io(e),
        };
        last_input = Instant::now();
        busy.store(true, Ordering::SeqCst);
        if let Err(e) = session.receive(buf.data(n), &mut out) {
            return End::Protocol(e);
        }
        full_read = buf.filled(n);
    }
}

/// `recv(2)` into an initialised buffer, with flags.
///
/// # Errors
/// `recv`'s errno.
pub fn recv(sock: &Socket, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let flags = nix::sys::socket::MsgFlags::from_bits_truncate(flags);
    nix::sys::socket::recv(sock.as_raw_fd(), buf, flags).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_buffer_grows_with_full_reads_and_shrinks_when_idle() {
        let mut b = ReadBuf::default();
        assert_eq!(b.space().len(), SMALL_READ);
        assert!(!b.filled(10));
        assert_eq!(b.space().len(), SMALL_READ);
        assert!(b.filled(SMALL_READ));
        assert_eq!(b.space().len(), 4 * SMALL_READ);
        assert!(b.filled(4 * SMALL_READ));
        assert!(b.filled(READ_BUF));
        assert_eq!(b.space().len(), READ_BUF, "never past READ_BUF");
        b.idle();
        assert_eq!(b.space().len(), SMALL_READ);
        assert_eq!(b.data(usize::MAX).len(), SMALL_READ);
    }
}
