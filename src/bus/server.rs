//! `socklab bus serve`: the reactor driver around the sans-IO core.
//!
//! ```text
//! one epoll loop per --workers, each with its own SO_REUSEPORT listener (a Unix listener is
//! shared, EPOLLEXCLUSIVE), its connections, and an inbox (a Vec behind a mutex + an eventfd)
//! loop:
//!     epoll_wait(nearest keep-alive deadline)
//!     accept; read ready sockets, feed each connection's Session -> packets for the broker
//!     take the inbox (deliveries other loops or the store produced for our connections)
//!     lock the broker once for the whole round's packets; take its outputs; unlock
//!     our connections' outputs: encode into their buffers; other loops': append to their
//!     inbox, one eventfd write per loop per round (batching)
//!     acknowledgements that must be durable: to the store thread with the round's changes
//!     write every connection with output (one send per connection per round)
//! ```
//!
//! No lock is held while a socket is written: the broker lock covers routing only, an inbox
//! lock covers a `Vec` swap. Memory per connection is bounded: input by `--max-packet`,
//! output of QoS 0 by a byte cap (past it QoS 0 deliveries are dropped and counted), QoS 1/2
//! by the flight window, queues by `--max-queued`/byte caps in the broker; a client with too
//! many unacknowledged publications, or whose output is backed up, is not read from until
//! that clears.

use super::auth::tls::{CertIdentity, TlsConn};
use super::auth::{AuthConfig, Gate, Login, Outcome, Step};
use super::broker::{Broker, BrokerConfig, ConnId, Identity, Out};
use super::codec::{PublishHeader, Version};
use super::session::{Inbound, Phase, Session, SessionConfig};
use super::store::{Store, StoreOp};
use crate::model::evloop::Slab;
use crate::model::{accept, accept_action, AcceptAction};
use crate::net::{display_addr, Endpoint, ListenOptions, Listener};
use crate::signals::{self, Signals};
use crate::timer::Timers;
use mqtt_proto::v5::DisconnectReasonCode as Drc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use socket2::Socket;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const TCP: u64 = u64::MAX;
const UNIX: u64 = u64::MAX - 1;
const SIGNAL: u64 = u64::MAX - 2;
const INBOX: u64 = u64::MAX - 3;
const TLS: u64 = u64::MAX - 4;
const VERDICT: u64 = u64::MAX - 5;
const READ_BUF: usize = 64 * 1024;
/// Reads per connection per round, so one busy publisher cannot starve the others.
const READS_PER_ROUND: usize = 4;
/// Output bytes a connection may have waiting before QoS 0 deliveries to it are dropped.
const QOS0_OUT_CAP: usize = 4 << 20;
/// Connections over `--max-connections` answered with a refusing CONNACK at a time (more are
/// closed at once).
const MAX_REFUSING: usize = 256;
/// Output bytes above which a connection's input is not read until it drains.
const OUT_BACKPRESSURE: usize = 8 << 20;

/// Everything `bus serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// TCP address to listen on, if any.
    pub listen: Option<String>,
    /// Unix socket path to listen on, if any.
    pub unix: Option<PathBuf>,
    /// Event loops.
    pub workers: usize,
    /// Database directory (durable mode).
    pub data: Option<PathBuf>,
    /// Over this many connections, new ones are closed at once.
    pub max_connections: usize,
    /// Session limits.
    pub session: SessionConfig,
    /// Broker limits.
    pub broker: BrokerConfig,
    /// Who may connect and what they may do.
    pub auth: AuthConfig,
    /// A TLS listener's address, if any.
    pub tls_listen: Option<String>,
    /// Its configuration (certificate, key, client CAs).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Changes for the store, with the acknowledgements to release once they are durable.
type StoreBatch = (Vec<StoreOp>, Vec<(ConnId, Out)>);

struct LoopShared {
    inbox: Mutex<Vec<(ConnId, Out)>>,
    wake: EventFd,
    pending_wake: AtomicBool,
    verdicts: Arc<Verdicts>,
}

/// A CONNECT waiting for its password check.
type Waiting = (Version, Box<mqtt_proto::v5::Connect>);

/// Outcomes of password checks, handed back to a loop by the verifier threads.
struct Verdicts {
    items: Mutex<Vec<(ConnId, Outcome, Waiting)>>,
    wake: EventFd,
}

impl Verdicts {
    fn take(&self) -> Vec<(ConnId, Outcome, Waiting)> {
        let _ = self.wake.read();
        std::mem::take(&mut *self.items.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl LoopShared {
    fn push(&self, items: &mut Vec<(ConnId, Out)>) {
        if items.is_empty() {
            return;
        }
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(items);
        self.wake();
    }

    /// One eventfd write per batch, and none while a wake-up is already pending.
    fn wake(&self) {
        if !self.pending_wake.swap(true, Ordering::AcqRel) {
            let _ = self.wake.write(1);
        }
    }
}

struct Shared {
    broker: Mutex<Broker>,
    gate: Arc<Gate>,
    stats: Arc<super::broker::Stats>,
    loops: Vec<LoopShared>,
    active: AtomicUsize,
    /// Connections over `--max-connections` being answered CONNACK "quota exceeded".
    refusing: AtomicUsize,
    cfg: ServeConfig,
    /// When the earliest method call times out (nanoseconds after `epoch`, `u64::MAX`:
    /// none); loop 0 wakes for it, and is woken when a loop adds an earlier one.
    call_deadline: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn call_deadline(&self) -> Option<Instant> {
        match self.call_deadline.load(Ordering::Acquire) {
            u64::MAX => None,
            n => Some(self.epoch + Duration::from_nanos(n)),
        }
    }

    /// Under the broker lock: publish its earliest call deadline; true if it moved earlier
    /// (loop 0 must wake to keep it).
    fn set_call_deadline(&self, d: Option<Instant>) -> bool {
        let n = d.map_or(u64::MAX, |d| {
            d.saturating_duration_since(self.epoch)
                .as_nanos()
                .min(u64::MAX as u128 - 1) as u64
        });
        let old = self.call_deadline.swap(n, Ordering::AcqRel);
        n < old
    }
}

fn loop_of(id: ConnId) -> usize {
    (id >> 56) as usize
}

impl Shared {
    /// Under the broker lock: our loop's outputs to `mine`, the others' appended to their
    /// inboxes (a `Vec` append each), noting which loops to wake once the lock is released.
    fn append(
        &self,
        outs: Vec<(ConnId, Out)>,
        own: usize,
        mine: &mut Vec<(ConnId, Out)>,
        wake: &mut Vec<usize>,
    ) {
        if outs.is_empty() {
            return;
        }
        let n = self.loops.len();
        if n == 1 {
            mine.extend(outs);
            return;
        }
        let mut per: Vec<Vec<(ConnId, Out)>> = (0..n).map(|_| Vec::new()).collect();
        for (id, o) in outs {
            let l = loop_of(id);
            if l == own {
                mine.push((id, o));
            } else if l < n {
                per[l].push((id, o));
            }
        }
        for (l, mut items) in per.into_iter().enumerate() {
            if !items.is_empty() {
                self.loops[l]
                    .inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .append(&mut items);
                if !wake.contains(&l) {
                    wake.push(l);
                }
            }
        }
    }

    /// Hand outputs to the loops they belong to (`own`'s are returned for direct use).
    fn dispatch(
        &self,
        outs: Vec<(ConnId, Out)>,
        own: Option<usize>,
        mine: &mut Vec<(ConnId, Out)>,
    ) {
        let n = self.loops.len();
        if n == 1 && own == Some(0) {
            mine.extend(outs);
            return;
        }
        let mut per: Vec<Vec<(ConnId, Out)>> = (0..n).map(|_| Vec::new()).collect();
        for (id, o) in outs {
            let l = loop_of(id);
            if Some(l) == own {
                mine.push((id, o));
            } else if l < n {
                per[l].push((id, o));
            }
        }
        for (l, mut items) in per.into_iter().enumerate() {
            self.loops[l].push(&mut items);
        }
    }
}

/// A connection on a loop. Its peer's address is not kept (it is asked of the socket when a
/// log line needs it): idle connections are what a broker has most of.
struct Conn {
    id: ConnId,
    sock: Socket,
    session: Session,
    sent: usize,
    /// Over `--max-connections`: its CONNECT gets a refusing CONNACK.
    refused: bool,
    /// Already in this round's list of connections to flush.
    marked: bool,
    peer_uid: Option<u32>,
    /// TLS, for a connection that came through the TLS listener.
    tls: Option<Box<TlsConn>>,
    /// Its password is being checked: nothing more is read, and what came after CONNECT
    /// waits here.
    auth_wait: bool,
    held: Vec<Inbound>,
    readable: bool,
    /// Closing: flush what is queued, then close.
    closing: bool,
    /// Whether the broker must hear of the close as abnormal (will published).
    abnormal: bool,
    /// TLS close_notify queued.
    close_notify: bool,
    announced: bool,
    deadline: Option<Instant>,
}

impl Conn {
    /// Send what the session has waiting from `sent` on, through TLS if the connection has
    /// it: how much was taken.
    fn send_some(&mut self) -> io::Result<usize> {
        let out = &self.session.out[self.sent..];
        match &mut self.tls {
            Some(tls) => tls.send(&self.sock, out),
            None => self.sock.send(out),
        }
    }
}

/// Run `bus serve` until SIGINT/SIGTERM. Prints the bound address(es) first on stdout.
///
/// # Errors
/// A bad or busy address ([`crate::net::NetError`]), an unusable `--data` directory, or a
/// failure of the loops.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let workers = cfg.workers.max(1);
    let opts = ListenOptions {
        backlog: 4096,
        reuse_port: true,
    };
    let tcp = match (&cfg.listen, &cfg.unix) {
        (Some(a), _) => Some(Listener::open(&Endpoint::Inet(a.clone()), opts)?),
        (None, Some(_)) => None,
        (None, None) if cfg.tls_listen.is_some() => None,
        (None, None) => Some(Listener::open(
            &Endpoint::Inet("127.0.0.1:1883".into()),
            opts,
        )?),
    };
    let unix = match &cfg.unix {
        Some(p) => Some(Listener::open(
            &Endpoint::Unix(p.clone()),
            ListenOptions {
                reuse_port: false,
                ..opts
            },
        )?),
        None => None,
    };
    let tls = match (&cfg.tls_listen, &cfg.tls) {
        (Some(a), Some(_)) => Some(Listener::open(&Endpoint::Inet(a.clone()), opts)?),
        _ => None,
    };
    let gate = Gate::start(
        cfg.auth.clone(),
        if cfg.auth.passwords.is_some() { 2 } else { 1 },
    )?;
    signals::hup_reloads();
    let mut broker_cfg = cfg.broker.clone();
    broker_cfg.durable = cfg.data.is_some();
    let mut broker = Broker::new(broker_cfg, gate.policy(), Instant::now());
    let mut store = None;
    if let Some(dir) = &cfg.data {
        let (s, loaded) = Store::open(dir)?;
        tracing::info!(
            sessions = loaded.sessions.len(),
            queued = loaded.queued.len(),
            retained = loaded.retained.len(),
            "restored from {}",
            dir.display()
        );
        broker.restore(
            loaded.sessions,
            loaded.queued,
            loaded.retained,
            loaded.rx_qos2,
            Instant::now(),
        );
        broker.ops.clear();
        store = Some(s);
    }
    let mut tcp_socks = Vec::new();
    if let Some(l) = &tcp {
        for i in 0..workers {
            tcp_socks.push(if i == 0 {
                l.try_clone()?
            } else {
                l.sibling(opts)?.try_clone()?
            });
        }
    }
    let mut tls_socks = Vec::new();
    if let Some(l) = &tls {
        for i in 0..workers {
            tls_socks.push(if i == 0 {
                l.try_clone()?
            } else {
                l.sibling(opts)?.try_clone()?
            });
        }
    }
    let mut loops = Vec::with_capacity(workers);
    for _ in 0..workers {
        loops.push(LoopShared {
            inbox: Mutex::new(Vec::new()),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            pending_wake: AtomicBool::new(false),
            verdicts: Arc::new(Verdicts {
                items: Mutex::new(Vec::new()),
                wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            }),
        });
    }
    let (store_tx, store_rx) = match store {
        Some(_) => {
            let (tx, rx) = mpsc::channel();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let shared = Arc::new(Shared {
        stats: broker.stats.clone(),
        broker: Mutex::new(broker),
        gate: gate.clone(),
        loops,
        active: AtomicUsize::new(0),
        refusing: AtomicUsize::new(0),
        cfg: cfg.clone(),
        call_deadline: AtomicU64::new(u64::MAX),
        epoch: Instant::now(),
    });
    {
        let mut out = io::stdout().lock();
        if let Some(l) = &tcp {
            writeln!(out, "{}", l.local)?;
        }
        if let Some(l) = &tls {
            writeln!(out, "{}", l.local)?;
        }
        if let Some(l) = &unix {
            writeln!(out, "{}", l.local)?;
        }
        out.flush()?;
    }
    let store_thread = match (store, store_rx) {
        (Some(store), Some(rx)) => {
            let sh = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("bus-store".into())
                    .spawn(move || store_loop(store, rx, &sh))?,
            )
        }
        _ => None,
    };
    let unix_sock = unix.as_ref().map(|l| l.try_clone()).transpose()?;
    let result = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for i in 0..workers {
            let sh = shared.clone();
            let listeners = Listeners {
                tcp: tcp_socks.get(i),
                tls: tls_socks.get(i),
                unix: unix_sock.as_ref(),
            };
            let sig = signals.fd();
            // Each loop has its own sender: when the loops are gone, the store thread's
            // channel closes and it finishes.
            let store = store_tx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bus-loop-{i}"))
                    .spawn_scoped(scope, move || event_loop(i, &sh, store, listeners, sig)),
            );
        }
        drop(store_tx);
        let mut result: io::Result<()> = Ok(());
        for h in handles {
            match h {
                Ok(h) => match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => result = Err(e),
                    Err(_) => result = Err(io::Error::other("a bus loop panicked")),
                },
                Err(e) => result = Err(e),
            }
        }
        result
    });
    // The loops are gone: let the store finish what it was given, then stop.
    gate.stop();
    if let Some(t) = store_thread {
        let _ = t.join();
    }
    result?;
    Ok(())
}

/// The store thread: commit everything that arrived while the previous commit ran in one
/// transaction (group commit), then release the acknowledgements that waited for it.
fn store_loop(store: Store, rx: mpsc::Receiver<StoreBatch>, shared: &Arc<Shared>) {
    let mut ops = Vec::new();
    let mut acks = Vec::new();
    while let Ok((o, a)) = rx.recv() {
        ops.extend(o);
        acks.extend(a);
        while let Ok((o, a)) = rx.try_recv() {
            ops.extend(o);
            acks.extend(a);
            if ops.len() > 100_000 {
                break;
            }
        }
        if !ops.is_empty() {
            if let Err(e) = store.commit(&ops) {
                // Nothing of the batch is acknowledged: the clients will send it again.
                tracing::error!("{e}: {} acknowledgements withheld", acks.len());
                acks.clear();
            }
            ops.clear();
        }
        let mut none = Vec::new();
        shared.dispatch(std::mem::take(&mut acks), None, &mut none);
    }
}

/// Queue connection `t`'s deadline if it is earlier than the one queued (a later one is
/// re-armed lazily when the queued one comes up); drop the queued one if it has none (no
/// keep-alive: the CONNECT deadline goes now, not when it comes up).
fn arm(timers: &mut Timers<usize>, c: &mut Conn, t: usize) {
    match c.session.deadline() {
        Some(d) if c.deadline.is_none_or(|q| d < q) => {
            if let Some(old) = c.deadline.replace(d) {
                timers.remove(old, t);
            }
            timers.insert(d, t);
        }
        None => {
            if let Some(old) = c.deadline.take() {
                timers.remove(old, t);
            }
        }
        Some(_) => {}
    }
}

/// The peer's address, for logs and the broker's identity.
fn peer(sock: &Socket) -> String {
    sock.peer_addr()
        .map_or_else(|_| "(gone)".to_string(), |a| display_addr(&a))
}

fn flags() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET
}

struct Loop<'a> {
    index: usize,
    shared: &'a Shared,
    store: Option<mpsc::Sender<StoreBatch>>,
    epoll: Epoll,
    conns: Slab<Conn>,
    timers: Timers<usize>,
    generation: u64,
    events: Vec<(ConnId, Inbound)>,
    closed: Vec<(ConnId, bool)>,
    dirty: Vec<usize>,
    stalled: Vec<usize>,
    buf: Vec<u8>,
}

/// One loop's listeners.
#[derive(Clone, Copy)]
struct Listeners<'a> {
    tcp: Option<&'a Socket>,
    tls: Option<&'a Socket>,
    unix: Option<&'a Socket>,
}

fn event_loop(
    index: usize,
    shared: &Shared,
    store: Option<mpsc::Sender<StoreBatch>>,
    listeners: Listeners<'_>,
    signal: BorrowedFd<'_>,
) -> io::Result<()> {
    let Listeners { tcp, tls, unix } = listeners;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    if let Some(l) = tcp {
        epoll.add(l, EpollEvent::new(EpollFlags::EPOLLIN, TCP))?;
    }
    if let Some(l) = tls {
        epoll.add(l, EpollEvent::new(EpollFlags::EPOLLIN, TLS))?;
    }
    epoll.add(
        shared.loops[index].verdicts.wake.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, VERDICT),
    )?;
    if let Some(l) = unix {
        epoll.add(
            l,
            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE, UNIX),
        )?;
    }
    epoll.add(signal, EpollEvent::new(EpollFlags::EPOLLIN, SIGNAL))?;
    epoll.add(
        shared.loops[index].wake.as_fd(),
        EpollEvent::new(EpollFlags::EPOLLIN, INBOX),
    )?;
    let mut lp = Loop {
        index,
        shared,
        store,
        epoll,
        conns: Slab::new(),
        timers: Timers::new(),
        generation: 0,
        events: Vec::new(),
        closed: Vec::new(),
        dirty: Vec::new(),
        stalled: Vec::new(),
        buf: vec![0u8; READ_BUF],
    };
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut next_tick = Instant::now();
    let mut stopping = false;
    loop {
        let now = Instant::now();
        let mut timeout = lp.timers.timeout(now);
        if index == 0 {
            let wake = shared
                .call_deadline()
                .map_or(next_tick, |d| d.min(next_tick));
            let t = wake.saturating_duration_since(now);
            timeout = Some(timeout.map_or(t, |x| x.min(t)));
        }
        if !lp.stalled.is_empty() {
            timeout = Some(Duration::from_millis(1).min(timeout.unwrap_or(Duration::MAX)));
        }
        if !lp.closed.is_empty() || !lp.events.is_empty() {
            timeout = Some(Duration::ZERO);
        }
        let timeout =
            EpollTimeout::try_from(crate::sys::timeout_ms(timeout)).unwrap_or(EpollTimeout::NONE);
        let n = match lp.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        for ev in &events[..n] {
            match ev.data() {
                TCP => {
                    if let Some(l) = tcp {
                        lp.accept_all(l, false, now);
                    }
                }
                TLS => {
                    if let Some(l) = tls {
                        lp.accept_all(l, true, now);
                    }
                }
                UNIX => {
                    if let Some(l) = unix {
                        lp.accept_all(l, false, now);
                    }
                }
                SIGNAL => {
                    signals::drain_fd(signal);
                    if signals::stop_requested() {
                        stopping = true;
                        // The byte this loop drained was every loop's: put one back so
                        // that the others wake and stop too.
                        signals::request_stop();
                    }
                    if signals::take_reload() {
                        lp.reload(now);
                    }
                }
                INBOX | VERDICT => {}
                token => {
                    let t = token as usize;
                    if let Some(c) = lp.conns.get_mut(t) {
                        let f = ev.events();
                        if f.intersects(
                            EpollFlags::EPOLLIN
                                | EpollFlags::EPOLLRDHUP
                                | EpollFlags::EPOLLHUP
                                | EpollFlags::EPOLLERR,
                        ) {
                            c.readable = true;
                            lp.read(t, now);
                        }
                        if f.contains(EpollFlags::EPOLLOUT) {
                            lp.dirty.push(t);
                        }
                    }
                }
            }
        }
        if stopping {
            lp.shutdown(&[tcp, tls, unix], now);
            return Ok(());
        }
        // Stalled readers whose reason cleared.
        for t in std::mem::take(&mut lp.stalled) {
            lp.read(t, now);
        }
        lp.expire(now);
        let tick =
            index == 0 && (now >= next_tick || shared.call_deadline().is_some_and(|d| now >= d));
        lp.route(now, tick, &mut next_tick);
        lp.take_inbox();
        lp.flush_dirty();
    }
}

impl Loop<'_> {
    fn accept_all(&mut self, listener: &Socket, tls: bool, now: Instant) {
        for _ in 0..256 {
            let (sock, addr) = match accept(listener, true) {
                Ok(x) => x,
                Err(e) => match accept_action(&e) {
                    AcceptAction::Retry => continue,
                    AcceptAction::Wait | AcceptAction::Pause(_) | AcceptAction::Fatal => return,
                },
            };
            let max = self.shared.cfg.max_connections;
            let mut refused = false;
            if self.shared.active.fetch_add(1, Ordering::Relaxed) >= max {
                self.shared.active.fetch_sub(1, Ordering::Relaxed);
                // Over the limit: its CONNECT is answered "quota exceeded" (3.1.1: "server
                // unavailable") so the client knows why; past a few of those at a time, the
                // connection is just closed.
                if self.shared.refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
                    self.shared.refusing.fetch_sub(1, Ordering::Relaxed);
                    tracing::warn!(peer = %display_addr(&addr), max, "connection limit reached: closing new connection");
                    continue;
                }
                tracing::warn!(peer = %display_addr(&addr), max, "connection limit reached: refusing the CONNECT");
                refused = true;
            }
            let peer_uid = if addr.is_unix() {
                nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.uid())
            } else {
                None
            };
            let tls = match (tls, &self.shared.cfg.tls) {
                (true, Some(cfg)) => match TlsConn::new(cfg) {
                    Ok(t) => Some(Box::new(t)),
                    Err(e) => {
                        tracing::warn!("TLS: {e}");
                        self.shared.active.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                },
                _ => None,
            };
            self.generation += 1;
            let session = Session::new(self.shared.cfg.session, now);
            let deadline = session.deadline();
            let t = self.conns.insert(Conn {
                id: 0,
                sock,
                session,
                sent: 0,
                refused,
                marked: false,
                peer_uid,
                tls,
                auth_wait: false,
                held: Vec::new(),
                close_notify: false,
                readable: true,
                closing: false,
                abnormal: true,
                announced: false,
                deadline,
            });
            // Loop in the top byte, a generation so that a reused token never receives
            // what was meant for its previous connection, the token in the low bits.
            let conn = self.conns.get_mut(t).expect("just added");
            conn.id =
                ((self.index as u64) << 56) | ((self.generation & 0xff_ffff) << 32) | t as u64;
            if let Some(d) = deadline {
                self.timers.insert(d, t);
            }
            if let Err(e) = self
                .epoll
                .add(conn.sock.as_fd(), EpollEvent::new(flags(), t as u64))
            {
                tracing::warn!("epoll add: {e}");
                self.drop_conn(t, true);
                continue;
            }
            tracing::debug!(peer = %display_addr(&addr), "bus connection open");
            self.read(t, now);
        }
    }

    /// Read what the socket has (a few reads' worth), feed the session.
    fn read(&mut self, t: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if !c.readable || c.closing || c.auth_wait {
            return;
        }
        let receive_max = self.shared.cfg.session.receive_max as usize;
        for _ in 0..READS_PER_ROUND {
            if c.session.unacked_in() >= receive_max
                || c.session.out.len() - c.sent > OUT_BACKPRESSURE
            {
                // Read on once acknowledgements went out or the output drained.
                self.stalled.push(t);
                return;
            }
            let got = match &mut c.tls {
                Some(tls) => tls.recv(&c.sock, &mut self.buf),
                None => crate::model::recv(&c.sock, &mut self.buf, 0),
            };
            if c.tls.as_ref().is_some_and(|t| t.pending()) {
                self.dirty.push(t); // handshake messages to finish sending
            }
            match got {
                Ok(0) => {
                    c.readable = false;
                    c.closing = true;
                    self.dirty.push(t);
                    return;
                }
                Ok(n) => {
                    self.shared
                        .stats
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let mut fresh = Vec::new();
                    let r = c.session.receive(&self.buf[..n], now, &mut fresh);
                    for e in fresh {
                        if c.refused {
                            if let Inbound::Connect(..) = e {
                                let code = mqtt_proto::v5::ConnectReasonCode::QuotaExceeded;
                                let mut ack = mqtt_proto::v5::Connack::new(false, code);
                                ack.properties.reason_string =
                                    Some("the server's connection limit is reached".into());
                                c.session.send(&mqtt_proto::v5::Packet::Connack(ack));
                                c.closing = true;
                                c.readable = false;
                                self.dirty.push(t);
                                return;
                            }
                            continue;
                        }
                        if let Inbound::Packet(mqtt_proto::v5::Packet::Disconnect(_)) = &e {
                            c.abnormal = false;
                        }
                        self.events.push((c.id, e));
                    }
                    if !c.session.out.is_empty() {
                        self.dirty.push(t);
                    }
                    // CONNECT replaces the connect timeout by the keep-alive deadline.
                    arm(&mut self.timers, c, t);
                    if let Err(v) = r {
                        tracing::info!(peer = %peer(&c.sock), reason = ?v.reason, "protocol violation: {}", v.message);
                        c.session.violation(&v);
                        c.closing = true;
                        c.readable = false;
                        self.dirty.push(t);
                        return;
                    }
                    if c.session.phase() == Phase::Closed {
                        // DISCONNECT received: the broker closes it.
                        c.readable = false;
                        return;
                    }
                    if n < self.buf.len() {
                        c.readable = false;
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %peer(&c.sock), "recv: {e}");
                    c.readable = false;
                    c.closing = true;
                    c.session.out.clear();
                    c.sent = 0;
                    self.dirty.push(t);
                    return;
                }
            }
        }
        // Still readable: continue next round (fairness).
        self.stalled.push(t);
    }
}

impl Loop<'_> {
    /// Keep-alive and CONNECT deadlines (re-armed lazily: a connection that spoke since its
    /// deadline was queued gets a new one).
    fn expire(&mut self, now: Instant) {
        while let Some((at, t)) = self.timers.pop_due(now) {
            let Some(c) = self.conns.get_mut(t) else {
                continue;
            };
            if c.deadline != Some(at) {
                continue;
            }
            match c.session.deadline() {
                Some(d) if d > now => {
                    c.deadline = Some(d);
                    self.timers.insert(d, t);
                }
                Some(_) => {
                    tracing::info!(peer = %peer(&c.sock), "keep-alive expired: closing");
                    c.deadline = None;
                    c.session.disconnect(Drc::KeepAliveTimeout);
                    c.closing = true;
                    c.readable = false;
                    self.dirty.push(t);
                }
                None => c.deadline = None,
            }
        }
    }

    /// One broker round: this round's packets and closes in, outputs out.
    fn route(&mut self, now: Instant, tick: bool, next_tick: &mut Instant) {
        // Connections closing with nothing left to flush are closed before routing, so
        // the broker hears of the close in the same round.
        let verdicts = self.shared.loops[self.index].verdicts.take();
        if self.events.is_empty() && self.closed.is_empty() && !tick && verdicts.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.events);
        let closed = std::mem::take(&mut self.closed);
        let mut mine = Vec::new();
        let mut wake = Vec::new();
        {
            let mut b = self.shared.broker.lock().unwrap_or_else(|e| e.into_inner());
            // What other loops routed to our connections before this round goes first: the
            // broker lock orders every delivery, and each connection's outputs are applied
            // in that order.
            mine.append(
                &mut self.shared.loops[self.index]
                    .inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            for (id, outcome, (version, connect)) in verdicts {
                let t = (id & 0xffff_ffff) as usize;
                let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) else {
                    continue; // gone while its password was checked
                };
                c.auth_wait = false;
                let held = std::mem::take(&mut c.held);
                if self.admit(&mut b, id, version, connect, outcome, now) {
                    for ev in held {
                        if let Inbound::Packet(p) = ev {
                            b.packet(id, p, now);
                        }
                    }
                    self.stalled.push(t); // read on
                }
            }
            for (id, ev) in events {
                let t = (id & 0xffff_ffff) as usize;
                if let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id && c.auth_wait) {
                    c.held.push(ev); // after a CONNECT whose password is being checked
                    continue;
                }
                match ev {
                    Inbound::Connect(version, connect) => {
                        self.login(&mut b, id, version, connect, now);
                    }
                    Inbound::Packet(p) => b.packet(id, p, now),
                }
            }
            for (id, abnormal) in closed {
                b.closed(id, abnormal, now);
            }
            if tick {
                *next_tick = b.tick(now);
            }
            if self.shared.set_call_deadline(b.next_call_deadline()) && self.index != 0 {
                wake.push(0);
            }
            self.hand_out(&mut b, &mut mine, &mut wake);
        }
        for l in wake {
            self.shared.loops[l].wake();
        }
        self.apply(mine);
    }

    /// A CONNECT arrived: ask the gate; admit or refuse now, or wait for the verifier.
    fn login(
        &mut self,
        b: &mut Broker,
        id: ConnId,
        version: Version,
        connect: Box<mqtt_proto::v5::Connect>,
        now: Instant,
    ) {
        let t = (id & 0xffff_ffff) as usize;
        let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) else {
            return;
        };
        let identity = self.shared.cfg.auth.cert_identity;
        let login = Login {
            username: connect.username.clone(),
            password: connect.password.clone(),
            peer: peer(&c.sock),
            peer_uid: c.peer_uid,
            cert_user: c
                .tls
                .as_ref()
                .filter(|_| identity != CertIdentity::None)
                .and_then(|t| t.peer_user(identity)),
        };
        match self.shared.gate.start_login(login, now) {
            Step::Done(outcome) => {
                self.admit(b, id, version, connect, outcome, now);
            }
            Step::Verify(job) => {
                c.auth_wait = true;
                let verdicts = self.shared.loops[self.index].verdicts.clone();
                let waiting = Some((version, connect));
                self.shared.gate.submit(job, move |outcome| {
                    let mut waiting = waiting;
                    if let Some(w) = waiting.take() {
                        verdicts
                            .items
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((id, outcome, w));
                        let _ = verdicts.wake.write(1);
                    }
                });
            }
        }
    }

    /// Hand an authenticated CONNECT to the broker, or refuse it; whether it was admitted.
    fn admit(
        &mut self,
        b: &mut Broker,
        id: ConnId,
        version: Version,
        connect: Box<mqtt_proto::v5::Connect>,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        let t = (id & 0xffff_ffff) as usize;
        let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) else {
            return false;
        };
        match outcome {
            Ok((username, verified)) => {
                c.announced = true;
                let identity = Identity {
                    peer: peer(&c.sock),
                    peer_uid: c.peer_uid,
                    username,
                    verified,
                    ..Default::default()
                };
                b.connect(id, version, *connect, identity, now);
                true
            }
            Err(r) => {
                tracing::info!(peer = %peer(&c.sock), code = ?r.code, "connection refused: {}", r.why);
                c.session.send(&mqtt_proto::v5::Packet::Connack(
                    mqtt_proto::v5::Connack::new(false, r.code),
                ));
                c.abnormal = false;
                c.closing = true;
                c.readable = false;
                self.dirty.push(t);
                false
            }
        }
    }

    /// SIGHUP: reread the password and ACL files; the broker withdraws what is no longer
    /// allowed. Bad files leave the old ones in force.
    fn reload(&mut self, now: Instant) {
        let policy = match self.shared.gate.reload() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("reload: {e}; the previous files stay in force");
                return;
            }
        };
        let mut mine = Vec::new();
        let mut wake = Vec::new();
        {
            let mut b = self.shared.broker.lock().unwrap_or_else(|e| e.into_inner());
            b.set_authorizer(policy, now);
            self.hand_out(&mut b, &mut mine, &mut wake);
        }
        for l in wake {
            self.shared.loops[l].wake();
        }
        self.apply(mine);
        tracing::info!("reloaded the password and ACL files");
    }

    /// Under the broker lock: the round's changes to the store (with the acknowledgements
    /// that wait for them), the outputs to the loops they belong to.
    fn hand_out(&self, b: &mut Broker, mine: &mut Vec<(ConnId, Out)>, wake: &mut Vec<usize>) {
        let ops = std::mem::take(&mut b.ops);
        let gated = std::mem::take(&mut b.gated);
        let outs = std::mem::take(&mut b.out);
        if let Some(store) = &self.store {
            if !ops.is_empty() || !gated.is_empty() {
                // Sent under the broker lock so the store sees changes in their order.
                let _ = store.send((ops, gated));
            }
        } else {
            self.shared.append(gated, self.index, mine, wake);
        }
        self.shared.append(outs, self.index, mine, wake);
    }

    fn take_inbox(&mut self) {
        let me = &self.shared.loops[self.index];
        if me.pending_wake.swap(false, Ordering::AcqRel) {
            let _ = me.wake.read();
        }
        let items = std::mem::take(&mut *me.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        if !items.is_empty() {
            self.apply(items);
        }
    }

    /// Encode outputs for this loop's connections.
    fn apply(&mut self, items: Vec<(ConnId, Out)>) {
        let stats = &self.shared.stats;
        let now = Instant::now();
        let mut sent = 0;
        for (id, o) in items {
            let t = (id & 0xffff_ffff) as usize;
            let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) else {
                continue;
            };
            match o {
                Out::Packet(p) => {
                    c.session.send(&p);
                    // A CONNACK's Server Keep Alive may have set (or shortened) it.
                    arm(&mut self.timers, c, t);
                }
                Out::Publish(d) => {
                    if c.closing {
                        continue;
                    }
                    if d.qos == 0 && c.session.out.len() - c.sent > QOS0_OUT_CAP {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let h = PublishHeader {
                        qos: d.qos,
                        pid: d.pid,
                        dup: d.dup,
                        retain: d.retain,
                        sub_ids: &d.sub_ids,
                        alias: None,
                        expiry: d.msg.expiry_left(now),
                    };
                    sent += c.session.deliver(&d.msg, h) as u64;
                }
                Out::Close(reason) => {
                    if let Some(r) = reason {
                        c.session.disconnect(r);
                    }
                    c.abnormal = false;
                    c.announced = false; // the broker already knows
                    c.closing = true;
                    c.readable = false;
                }
            }
            // Once per connection per round, however many deliveries it got.
            if !c.marked {
                c.marked = true;
                self.dirty.push(t);
            }
        }
        stats.msgs_out.fetch_add(sent, Ordering::Relaxed);
    }

    /// Send what each connection has waiting (one `send` per connection per round); close
    /// connections that are closing and have nothing left.
    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for t in dirty {
            let Some(c) = self.conns.get_mut(t) else {
                continue;
            };
            c.marked = false;
            let mut failed = false;
            while c.sent < c.session.out.len() {
                match c.send_some() {
                    Ok(n) => {
                        c.sent += n;
                        self.shared
                            .stats
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(peer = %peer(&c.sock), "send: {e}");
                        failed = true;
                        break;
                    }
                }
            }
            if let Some(tls) = &mut c.tls {
                if c.closing && c.sent == c.session.out.len() && !c.close_notify {
                    c.close_notify = true;
                    tls.close();
                }
                match tls.flush(&c.sock) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        tracing::debug!(peer = %peer(&c.sock), "TLS send: {e}");
                        failed = true;
                    }
                }
            }
            let tls_pending = c.tls.as_ref().is_some_and(|t| t.pending());
            if c.sent == c.session.out.len() {
                c.sent = 0;
                c.session.out.clear();
                // A large buffer is not kept for a burst that passed, nor a small one for a
                // connection that may now sit idle (a CONNACK, a PINGRESP).
                if c.session.out.capacity() > (256 << 10) || c.session.out.capacity() <= 64 {
                    c.session.out = Vec::new();
                }
                if c.readable {
                    self.stalled.push(t);
                }
            }
            if failed || (c.closing && c.session.out.is_empty() && !tls_pending) {
                let abnormal = c.abnormal;
                self.drop_conn(t, abnormal);
            }
        }
    }

    fn drop_conn(&mut self, t: usize, abnormal: bool) {
        let Some(c) = self.conns.remove(t) else {
            return;
        };
        if let Some(d) = c.deadline {
            self.timers.remove(d, t);
        }
        if c.refused {
            self.shared.refusing.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(peer = %peer(&c.sock), "bus connection closed");
        if c.announced || c.session.phase() != Phase::AwaitConnect {
            self.closed.push((c.id, abnormal));
        }
    }

    /// Stop: no more accepts; the broker ends every session's connection as lost (wills go
    /// out, to connections still open too); 5.0 clients are told the server is shutting
    /// down; what is queued is flushed for up to a second, then every connection is closed
    /// (TLS ones after a close_notify).
    fn shutdown(&mut self, listeners: &[Option<&Socket>], now: Instant) {
        for l in listeners.iter().flatten() {
            let _ = self.epoll.delete(l);
        }
        let mut mine = Vec::new();
        let mut wake = Vec::new();
        {
            let mut b = self.shared.broker.lock().unwrap_or_else(|e| e.into_inner());
            mine.append(
                &mut self.shared.loops[self.index]
                    .inbox
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            // Every loop does this; the first one ends all sessions, the later ones what
            // connected since (a repeated call finds nothing else to do).
            b.shutdown(now);
            self.hand_out(&mut b, &mut mine, &mut wake);
        }
        for l in wake {
            self.shared.loops[l].wake();
        }
        self.apply(mine);
        let tokens = self.conns.tokens();
        for &t in &tokens {
            if let Some(c) = self.conns.get_mut(t) {
                c.session.disconnect(Drc::ServerShuttingDown);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let mut left = false;
            for &t in &tokens {
                let Some(c) = self.conns.get_mut(t) else {
                    continue;
                };
                while c.sent < c.session.out.len() {
                    match c.send_some() {
                        Ok(n) => c.sent += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            left = true;
                            break;
                        }
                        Err(_) => {
                            c.sent = c.session.out.len(); // gone: nothing more to do
                        }
                    }
                }
                if let Some(tls) = &mut c.tls {
                    if c.sent == c.session.out.len() && !c.close_notify {
                        c.close_notify = true;
                        tls.close();
                    }
                    match tls.flush(&c.sock) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => left = true,
                        _ => {}
                    }
                }
            }
            if !left || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in tokens {
            self.conns.remove(t);
        }
    }
}
