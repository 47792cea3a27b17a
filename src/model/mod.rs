//! The server designs ("models"), one file each, and what they all share.
//!
//! | model | file | design |
//! | --- | --- | --- |
//! | `iterative` | [`iterative`] | one connection at a time |
//! | `fork` | [`fork`] | a process per connection |
//! | `prefork` | [`prefork`] | N processes blocking in `accept` on one listener |
//! | `thread` | [`thread`] | a thread per connection |
//! | `pool` | [`pool`] | a dispatcher and N worker threads around a bounded queue |
//! | `poll` | [`poll`] | one thread, `poll(2)` |
//! | `epoll` | [`epoll`] | one thread, `epoll`, edge- or level-triggered |
//! | `reactors` | [`reactors`] | N epoll loops, each with its own `SO_REUSEPORT` listener |
//! | `tokio` | [`tokio`] | the same sessions on a tokio runtime: the reference point |
//!
//! Shared here: the [`Ctx`] every model receives (service, options, connection limit),
//! accepting with error handling ([`accept_action`]), the blocking connection driver
//! ([`serve_blocking`]) used by the blocking designs, and the [`Tracker`] thread designs use to
//! close idle connections on shutdown. The event loops share [`evloop`].

pub mod epoll;
pub mod evloop;
pub mod fork;
pub mod iterative;
pub mod poll;
pub mod pool;
pub mod prefork;
pub mod reactors;
pub mod thread;
pub mod tokio;

use crate::net::{display_addr, Listener};
use crate::output::Flush;
use crate::service::{ProtocolError, ServiceConfig};
use crate::signals::{self, Signals};
use crate::sys::SharedCounter;
use socket2::{SockAddr, Socket};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
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
    /// One thread, non-blocking sockets, `poll(2)`.
    Poll,
    /// One thread, non-blocking sockets, `epoll` (`--trigger edge|level`).
    Epoll,
    /// `--workers` epoll loops, each with its own `SO_REUSEPORT` listener.
    Reactors,
    /// The sessions driven by a tokio multi-threaded runtime.
    Tokio,
}

impl ModelKind {
    /// Every model, in the order the course introduces them.
    pub const ALL: [ModelKind; 9] = [
        ModelKind::Iterative,
        ModelKind::Fork,
        ModelKind::Prefork,
        ModelKind::Thread,
        ModelKind::Pool,
        ModelKind::Poll,
        ModelKind::Epoll,
        ModelKind::Reactors,
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
            ModelKind::Poll => "poll",
            ModelKind::Epoll => "epoll",
            ModelKind::Reactors => "reactors",
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

/// Size of the buffer a connection reads into.
pub const READ_BUF: usize = 64 * 1024;

/// What every model is given: the service, the options, and the live-connection count
/// (in shared memory, so forked processes count together).
#[derive(Debug)]
pub struct Ctx {
    /// The protocol to serve.
    pub service: ServiceConfig,
    /// The model options.
    pub opts: ServeOptions,
    active: SharedCounter,
}

impl Ctx {
    /// A context for `service` under `opts`.
    ///
    /// # Errors
    /// When the shared counter cannot be mapped.
    pub fn new(service: ServiceConfig, opts: ServeOptions) -> io::Result<Ctx> {
        Ok(Ctx {
            service,
            opts,
            active: SharedCounter::new()?,
        })
    }

    /// Connections open now, in all processes of this server.
    pub fn active(&self) -> usize {
        self.active.get().load(Ordering::SeqCst)
    }

    /// Take a slot for a new connection from `peer`, or `None` (and the connection closed
    /// by the caller dropping it) when `--max-conns` are already open.
    pub fn admit(&self, peer: &SockAddr) -> Option<Slot<'_>> {
        let n = self.active.get().fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(max) = self.opts.max_conns {
            if n > max {
                self.active.get().fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(peer = %display_addr(peer), max, "connection limit reached: closing new connection");
                return None;
            }
        }
        let peer = display_addr(peer);
        tracing::debug!(%peer, "connection open");
        Some(Slot {
            ctx: self,
            peer,
            opened: Instant::now(),
            held: true,
        })
    }
}

/// A connection's place in the count; released (and the close logged) when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    ctx: &'a Ctx,
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
            self.ctx.active.get().fetch_sub(1, Ordering::SeqCst);
            tracing::debug!(peer = %self.peer, secs = self.opened.elapsed().as_secs_f64(), "connection closed");
        }
    }
}

impl Ctx {
    /// Release a slot handed over with [`Slot::hand_over`] (a reaped fork child).
    pub fn release_handed_over(&self) {
        self.active.get().fetch_sub(1, Ordering::SeqCst);
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
                if let Some(slot) = ctx.admit(&peer) {
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
    /// Idle longer than `--idle-timeout`.
    IdleTimeout,
    /// The session's own deadline passed (an HTTP request head too slow: 408 sent).
    Deadline,
    /// The server is stopping and the connection was idle.
    Shutdown,
    /// The peer sent something the protocol refuses.
    Protocol(ProtocolError),
    /// A send or receive failed (reset, broken pipe...).
    Io(io::Error),
}

impl End {
    /// Log the end of a connection at the right level: protocol errors are warnings (a
    /// client misbehaved), the rest is connection-level detail.
    pub fn log(&self, peer: &str) {
        match self {
            End::Closed => {}
            End::IdleTimeout => tracing::debug!(%peer, "idle timeout"),
            End::Deadline => tracing::debug!(%peer, "request deadline passed"),
            End::Shutdown => tracing::debug!(%peer, "closed for shutdown"),
            End::Protocol(e) => tracing::warn!(%peer, "protocol error: {e}; closing connection"),
            End::Io(e) => tracing::debug!(%peer, "connection error: {e}"),
        }
    }
}

/// Serve one connection on a blocking socket until it ends: the loop of the course's
/// `srv_rev_sec`, generalised to any session. Used by iterative, fork, prefork, thread and
/// pool.
///
/// `busy` is kept equal to "a request is in flight", for a [`Tracker`]. On a stop request the
/// connection is closed as soon as it is idle; a request already in flight is finished.
pub fn serve_blocking(sock: &Socket, ctx: &Ctx, busy: &AtomicBool) -> End {
    let idle = Some(ctx.opts.idle_timeout).filter(|d| !d.is_zero());
    if let Err(e) = sock
        .set_nonblocking(false)
        .and_then(|_| sock.set_read_timeout(idle))
        .and_then(|_| sock.set_write_timeout(idle))
    {
        return End::Io(e);
    }
    let mut out = ctx.service.outbox();
    let mut session = ctx.service.open(&mut out);
    let mut buf = vec![0u8; READ_BUF];
    let mut eof = false;
    // The receive timeout in force: the idle timeout, or less while the session has a
    // deadline of its own (HTTP's request head); changed only when it changes.
    let mut timeout = idle;
    loop {
        match out.flush(sock) {
            Ok(Flush::Done) => {}
            Ok(Flush::Blocked) => return End::Io(io::ErrorKind::TimedOut.into()),
            Err(e) => return End::Io(e),
        }
        if eof || session.done() {
            return End::Closed;
        }
        let in_flight = session.mid_request();
        busy.store(in_flight, Ordering::SeqCst);
        let mut flags = 0;
        if !in_flight && signals::stop_requested() {
            // Stopping: answer only what has already arrived, without waiting for more.
            flags = libc::MSG_DONTWAIT;
        }
        let wanted = match session.deadline() {
            Some(d) => {
                let left = d
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                Some(idle.map_or(left, |i| i.min(left)))
            }
            None => idle,
        };
        if wanted != timeout {
            if let Err(e) = sock.set_read_timeout(wanted) {
                return End::Io(e);
            }
            timeout = wanted;
        }
        let n = match recv(sock, &mut buf, flags) {
            Ok(0) => {
                eof = true;
                if let Err(e) = session.end_of_input() {
                    return End::Protocol(e);
                }
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && flags != 0 => return End::Shutdown,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if session.deadline().is_some_and(|d| d <= Instant::now()) {
                    session.on_deadline(&mut out);
                    let _ = out.flush(sock);
                    return End::Deadline;
                }
                return End::IdleTimeout;
            }
            Err(e) => return End::Io(e),
        };
        busy.store(true, Ordering::SeqCst);
        if let Err(e) = session.receive(&buf[..n], &mut out) {
            return End::Protocol(e);
        }
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
