//! Small helpers the experiments share to set up their scenes: loopback listeners with a
//! chosen backlog, state snapshots into the timeline, waiting for a condition.

use super::diag::{self, TcpSock, TcpState};
use super::timeline::Timeline;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Size of the course's big transfers: 50 MB.
pub const BIG: usize = 50_000_000;

/// The loopback address with port 0: the kernel picks a free port.
pub fn loopback_any() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A TCP socket bound to `127.0.0.1:0` but not listening.
///
/// # Errors
///
/// The `socket`/`bind` error.
pub fn bound_socket() -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SockAddr::from(loopback_any()))?;
    Ok(s)
}

/// A listener on `127.0.0.1:0` with the given backlog, recording the calls in the timeline.
///
/// # Errors
///
/// The `socket`/`bind`/`listen` error.
pub fn listener(tl: &Timeline, actor: &str, backlog: i32) -> io::Result<(TcpListener, SocketAddr)> {
    let s = bound_socket()?;
    let r = s.listen(backlog);
    tl.unit(actor, &format!("listen(s, {backlog})"), &r);
    r?;
    let l: TcpListener = s.into();
    let addr = l.local_addr()?;
    tl.log(actor, "getsockname(s)", addr.to_string());
    Ok((l, addr))
}

/// Connect to `addr`, recording the call and the local address it got.
///
/// # Errors
///
/// The `connect` error.
pub fn connect(tl: &Timeline, actor: &str, addr: SocketAddr) -> io::Result<TcpStream> {
    let r = TcpStream::connect(addr);
    tl.call(actor, &format!("connect({addr})"), &r, |s| {
        match s.local_addr() {
            Ok(a) => format!("ok (from {a})"),
            Err(_) => "ok".into(),
        }
    });
    r
}

/// Ask the kernel for the state of the socket `local` (→ `peer`) and record it; `None` if the
/// kernel lists no such socket. A sock_diag failure is recorded too, and returned as `None`.
pub fn state(
    tl: &Timeline,
    label: &str,
    local: SocketAddr,
    peer: Option<SocketAddr>,
) -> Option<TcpSock> {
    let call = format!("sock_diag: {label}");
    match diag::find(local, peer) {
        Ok(Some(s)) => {
            tl.log("kernel", &call, s.to_string());
            Some(s)
        }
        Ok(None) => {
            tl.log("kernel", &call, "(no such socket: closed)");
            None
        }
        Err(e) => {
            tl.log("kernel", &call, format!("unavailable: {e}"));
            None
        }
    }
}

/// The state of a connection seen from `stream`'s side.
pub fn stream_state(tl: &Timeline, label: &str, stream: &TcpStream) -> Option<TcpSock> {
    let local = stream.local_addr().ok()?;
    let peer = stream.peer_addr().ok();
    state(tl, label, local, peer)
}

/// Whether the state snapshot is `want`.
pub fn is(s: &Option<TcpSock>, want: TcpState) -> bool {
    s.as_ref().is_some_and(|s| s.state == want)
}

/// Poll `cond` every millisecond until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Wait until the kernel reports the socket `local` (→ `peer`) with `recv_q >= n` (bytes
/// waiting, or connections in an accept queue).
pub fn wait_recv_q(local: SocketAddr, peer: Option<SocketAddr>, n: u32) -> bool {
    wait_until(
        Duration::from_secs(3),
        || matches!(diag::find(local, peer), Ok(Some(s)) if s.recv_q >= n),
    )
}

/// Wait for a child process to end; after `timeout`, kill it (SIGKILL) so an experiment whose
/// child got stuck still ends, and report how it ended.
///
/// # Errors
///
/// The `waitpid` error.
pub fn reap(child: Pid, timeout: Duration) -> nix::Result<WaitStatus> {
    let end = Instant::now() + timeout;
    loop {
        match waitpid(child, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::StillAlive if Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2));
            }
            WaitStatus::StillAlive => {
                let _ = kill(child, Signal::SIGKILL);
                return waitpid(child, None);
            }
            done => return Ok(done),
        }
    }
}

/// Bytes as space-separated hex pairs.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Read until EOF, counting bytes and calls; at most `cap` bytes per call.
///
/// # Errors
///
/// The first `read` error.
pub fn drain(mut r: impl io::Read, cap: usize) -> io::Result<(usize, usize)> {
    let mut buf = vec![0u8; cap];
    let (mut total, mut calls) = (0, 0);
    loop {
        calls += 1;
        match r.read(&mut buf) {
            Ok(0) => return Ok((total, calls)),
            Ok(n) => total += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
