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

use super::broker::{AllowAll, Broker, BrokerConfig, ConnId, Identity, Out};
use super::codec::PublishHeader;
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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const TCP: u64 = u64::MAX;
const UNIX: u64 = u64::MAX - 1;
const SIGNAL: u64 = u64::MAX - 2;
const INBOX: u64 = u64::MAX - 3;
const READ_BUF: usize = 64 * 1024;
/// Reads per connection per round, so one busy publisher cannot starve the others.
const READS_PER_ROUND: usize = 4;
/// Output bytes a connection may have waiting before QoS 0 deliveries to it are dropped.
const QOS0_OUT_CAP: usize = 4 << 20;
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
}

/// Changes for the store, with the acknowledgements to release once they are durable.
type StoreBatch = (Vec<StoreOp>, Vec<(ConnId, Out)>);

struct LoopShared {
    inbox: Mutex<Vec<(ConnId, Out)>>,
    wake: EventFd,
    pending_wake: AtomicBool,
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
    stats: Arc<super::broker::Stats>,
    loops: Vec<LoopShared>,
    store: Option<mpsc::Sender<StoreBatch>>,
    active: AtomicUsize,
    cfg: ServeConfig,
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

struct Conn {
    id: ConnId,
    sock: Socket,
    session: Session,
    sent: usize,
    peer: String,
    peer_uid: Option<u32>,
    readable: bool,
    /// Closing: flush what is queued, then close.
    closing: bool,
    /// Whether the broker must hear of the close as abnormal (will published).
    abnormal: bool,
    announced: bool,
    deadline: Option<Instant>,
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
    let mut broker_cfg = cfg.broker.clone();
    broker_cfg.durable = cfg.data.is_some();
    let mut broker = Broker::new(broker_cfg, Arc::new(AllowAll), Instant::now());
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
    let mut loops = Vec::with_capacity(workers);
    for _ in 0..workers {
        loops.push(LoopShared {
            inbox: Mutex::new(Vec::new()),
            wake: EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?,
            pending_wake: AtomicBool::new(false),
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
        loops,
        store: store_tx,
        active: AtomicUsize::new(0),
        cfg: cfg.clone(),
    });
    {
        let mut out = io::stdout().lock();
        if let Some(l) = &tcp {
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
            let tcp = tcp_socks.get(i);
            let unix = unix_sock.as_ref();
            let sig = signals.fd();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bus-loop-{i}"))
                    .spawn_scoped(scope, move || event_loop(i, &sh, tcp, unix, sig)),
            );
        }
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
    let shared = Arc::try_unwrap(shared).ok();
    drop(shared);
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

fn flags() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET
}

struct Loop<'a> {
    index: usize,
    shared: &'a Shared,
    epoll: Epoll,
    conns: Slab<Conn>,
    timers: Timers<(Instant, usize)>,
    generation: u64,
    events: Vec<(ConnId, Inbound)>,
    closed: Vec<(ConnId, bool)>,
    dirty: Vec<usize>,
    stalled: Vec<usize>,
    buf: Vec<u8>,
}

fn event_loop(
    index: usize,
    shared: &Shared,
    tcp: Option<&Socket>,
    unix: Option<&Socket>,
    signal: BorrowedFd<'_>,
) -> io::Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    if let Some(l) = tcp {
        epoll.add(l, EpollEvent::new(EpollFlags::EPOLLIN, TCP))?;
    }
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
            let t = next_tick.saturating_duration_since(now);
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
                        lp.accept_all(l, now);
                    }
                }
                UNIX => {
                    if let Some(l) = unix {
                        lp.accept_all(l, now);
                    }
                }
                SIGNAL => {
                    if signals::stop_requested() {
                        stopping = true;
                    }
                }
                INBOX => {}
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
            lp.shutdown(tcp, unix);
            return Ok(());
        }
        // Stalled readers whose reason cleared.
        for t in std::mem::take(&mut lp.stalled) {
            lp.read(t, now);
        }
        lp.expire(now);
        let tick = index == 0 && now >= next_tick;
        lp.route(now, tick, &mut next_tick);
        lp.take_inbox();
        lp.flush_dirty();
    }
}

impl Loop<'_> {
    fn accept_all(&mut self, listener: &Socket, now: Instant) {
        for _ in 0..256 {
            let (sock, addr) = match accept(listener, true) {
                Ok(x) => x,
                Err(e) => match accept_action(&e) {
                    AcceptAction::Retry => continue,
                    AcceptAction::Wait | AcceptAction::Pause(_) | AcceptAction::Fatal => return,
                },
            };
            let max = self.shared.cfg.max_connections;
            if self.shared.active.fetch_add(1, Ordering::Relaxed) >= max {
                self.shared.active.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(peer = %display_addr(&addr), max, "connection limit reached: closing new connection");
                continue;
            }
            let peer_uid = if addr.is_unix() {
                nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)
                    .ok()
                    .map(|c| c.uid())
            } else {
                None
            };
            self.generation += 1;
            let session = Session::new(self.shared.cfg.session, now);
            let deadline = session.deadline();
            let t = self.conns.insert(Conn {
                id: 0,
                sock,
                session,
                sent: 0,
                peer: display_addr(&addr),
                peer_uid,
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
                self.timers.insert(d, (d, t));
            }
            if let Err(e) = self
                .epoll
                .add(conn.sock.as_fd(), EpollEvent::new(flags(), t as u64))
            {
                tracing::warn!("epoll add: {e}");
                self.drop_conn(t, true);
                continue;
            }
            tracing::debug!(peer = %self.conns.get_mut(t).map_or("", |c| &c.peer), "bus connection open");
            self.read(t, now);
        }
    }

    /// Read what the socket has (a few reads' worth), feed the session.
    fn read(&mut self, t: usize, now: Instant) {
        let Some(c) = self.conns.get_mut(t) else {
            return;
        };
        if !c.readable || c.closing {
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
            match crate::model::recv(&c.sock, &mut self.buf, 0) {
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
                        if let Inbound::Packet(mqtt_proto::v5::Packet::Disconnect(_)) = &e {
                            c.abnormal = false;
                        }
                        self.events.push((c.id, e));
                    }
                    if !c.session.out.is_empty() {
                        self.dirty.push(t);
                    }
                    // CONNECT replaces the connect timeout by the keep-alive deadline, which
                    // may be earlier: queue it (later ones are re-armed lazily).
                    if let Some(d) = c.session.deadline() {
                        if c.deadline.is_none_or(|q| d < q) {
                            if let Some(old) = c.deadline.replace(d) {
                                self.timers.remove(old, (old, t));
                            }
                            self.timers.insert(d, (d, t));
                        }
                    }
                    if let Err(v) = r {
                        tracing::info!(peer = %c.peer, reason = ?v.reason, "protocol violation: {}", v.message);
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
                    tracing::debug!(peer = %c.peer, "recv: {e}");
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
        while let Some((_, (at, t))) = self.timers.pop_due(now) {
            let Some(c) = self.conns.get_mut(t) else {
                continue;
            };
            if c.deadline != Some(at) {
                continue;
            }
            match c.session.deadline() {
                Some(d) if d > now => {
                    c.deadline = Some(d);
                    self.timers.insert(d, (d, t));
                }
                Some(_) => {
                    tracing::info!(peer = %c.peer, "keep-alive expired: closing");
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
        if self.events.is_empty() && self.closed.is_empty() && !tick {
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
            for (id, ev) in events {
                match ev {
                    Inbound::Connect(version, connect) => {
                        let t = (id & 0xffff_ffff) as usize;
                        let (peer, peer_uid) = self
                            .conns
                            .get_mut(t)
                            .filter(|c| c.id == id)
                            .map_or((String::new(), None), |c| (c.peer.clone(), c.peer_uid));
                        if let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) {
                            c.announced = true;
                        }
                        b.connect(
                            id,
                            version,
                            *connect,
                            Identity {
                                peer,
                                peer_uid,
                                ..Default::default()
                            },
                            now,
                        );
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
            let ops = std::mem::take(&mut b.ops);
            let gated = std::mem::take(&mut b.gated);
            let outs = std::mem::take(&mut b.out);
            if let Some(store) = &self.shared.store {
                if !ops.is_empty() || !gated.is_empty() {
                    // Sent under the broker lock so the store sees changes in their order.
                    let _ = store.send((ops, gated));
                }
            } else {
                self.shared.append(gated, self.index, &mut mine, &mut wake);
            }
            self.shared.append(outs, self.index, &mut mine, &mut wake);
        }
        for l in wake {
            self.shared.loops[l].wake();
        }
        self.apply(mine);
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
        for (id, o) in items {
            let t = (id & 0xffff_ffff) as usize;
            let Some(c) = self.conns.get_mut(t).filter(|c| c.id == id) else {
                continue;
            };
            match o {
                Out::Packet(p) => c.session.send(&p),
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
                        expiry: d.msg.expiry_left(Instant::now()),
                    };
                    if c.session.deliver(&d.msg, h) {
                        stats.msgs_out.fetch_add(1, Ordering::Relaxed);
                    }
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
            self.dirty.push(t);
        }
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
            let mut failed = false;
            while c.sent < c.session.out.len() {
                match c.sock.send(&c.session.out[c.sent..]) {
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
                        tracing::debug!(peer = %c.peer, "send: {e}");
                        failed = true;
                        break;
                    }
                }
            }
            if c.sent == c.session.out.len() {
                c.sent = 0;
                c.session.out.clear();
                if c.session.out.capacity() > (256 << 10) {
                    c.session.out = Vec::new();
                }
                if c.readable {
                    self.stalled.push(t);
                }
            }
            if failed || (c.closing && c.session.out.is_empty()) {
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
            self.timers.remove(d, (d, t));
        }
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(peer = %c.peer, "bus connection closed");
        if c.announced || c.session.phase() != Phase::AwaitConnect {
            self.closed.push((c.id, abnormal));
        }
    }

    /// Stop: no more accepts, 5.0 clients are told the server is shutting down, every
    /// connection is flushed (briefly) and closed.
    fn shutdown(&mut self, tcp: Option<&Socket>, unix: Option<&Socket>) {
        if let Some(l) = tcp {
            let _ = self.epoll.delete(l);
        }
        if let Some(l) = unix {
            let _ = self.epoll.delete(l);
        }
        for t in self.conns.tokens() {
            if let Some(c) = self.conns.get_mut(t) {
                c.session.disconnect(Drc::ServerShuttingDown);
                let _ = c.sock.send(&c.session.out[c.sent..]);
            }
            self.conns.remove(t);
        }
    }
}
