//! Closing connections: TIME_WAIT, half-close, RST on unread data, and the whole state walk.

use super::diag::{self, TcpState};
use super::scene::{self, is, state, stream_state};
use super::sys;
use super::{Outcome, Timeline};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

/// Try to bind a new TCP socket to `addr`, with or without `SO_REUSEADDR`.
fn rebind(tl: &Timeline, addr: SocketAddr, reuse: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    let r = s.bind(&SockAddr::from(addr));
    let opt = if reuse { "SO_REUSEADDR; " } else { "" };
    tl.unit("new server", &format!("{opt}bind({addr})"), &r);
    r.map(|_| s)
}

/// Run a server on a fresh port (with or without `SO_REUSEADDR`), let it close one connection
/// first, then exit; return its address and the state its connection was left in.
fn leave_time_wait(
    tl: &Timeline,
    actor: &str,
    reuse: bool,
) -> anyhow::Result<(SocketAddr, Option<diag::TcpSock>)> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    s.bind(&SockAddr::from(scene::loopback_any()))?;
    s.listen(2)?;
    let listener: std::net::TcpListener = s.into();
    let addr = listener.local_addr()?;
    let opt = if reuse { "SO_REUSEADDR; " } else { "" };
    tl.log(
        actor,
        &format!("{opt}bind(127.0.0.1:0); listen(s, 2)"),
        addr.to_string(),
    );
    let mut client = scene::connect(tl, "client", addr)?;
    let (conn, peer) = listener.accept()?;
    tl.log(actor, "accept(s)", format!("connection from {peer}"));
    drop(conn);
    tl.log(actor, "close(conn)  [active close]", "ok");
    let mut buf = [0u8; 16];
    let r = client.read(&mut buf);
    tl.bytes("client", "recv(s)", &r);
    drop(client);
    tl.log("client", "close(s)  [passive close]", "ok");
    scene::wait_until(
        Duration::from_secs(2),
        || matches!(diag::find(addr, Some(peer)), Ok(Some(s)) if s.state == TcpState::TimeWait),
    );
    let tw = state(tl, &format!("{actor}'s connection"), addr, Some(peer));
    state(tl, "client's connection", peer, Some(addr));
    drop(listener);
    tl.log(actor, "close(s)  [listener; the server exits]", "ok");
    Ok((addr, tw))
}

/// The side that closes first ends in TIME_WAIT and keeps its port busy.
pub fn time_wait(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/ipv4/tcp_fin_timeout");
    tl.setting("/proc/sys/net/ipv4/tcp_tw_reuse");
    tl.note("TIME_WAIT lasts a fixed 60 s on Linux (TCP_TIMEWAIT_LEN), not tcp_fin_timeout");
    // A server that never set SO_REUSEADDR, restarted with and without it.
    let (addr, tw) = leave_time_wait(tl, "server A", false)?;
    let plain = rebind(tl, addr, false);
    let late = rebind(tl, addr, true);
    // A server that sets SO_REUSEADDR every time it starts, as servers should.
    let (addr_b, tw_b) = leave_time_wait(tl, "server B", true)?;
    let reused = rebind(tl, addr_b, true);
    let relisten = reused.as_ref().map(|s| s.listen(2));
    if let Ok(r) = &relisten {
        tl.unit("new server", "listen(s, 2)", r);
    }
    let in_use = matches!(&plain, Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE));
    let ok = is(&tw, TcpState::TimeWait)
        && is(&tw_b, TcpState::TimeWait)
        && in_use
        && matches!(relisten, Ok(Ok(())));
    let show = |r: &io::Result<Socket>| match r {
        Ok(_) => "succeeds".to_string(),
        Err(e) => format!("fails {}", super::timeline::ErrnoName::errno_name(e)),
    };
    Ok(Outcome::new(
        ok,
        format!(
            "the active closer's side is left in {}; rebinding its port without SO_REUSEADDR {}, with it {} — provided the old server had set it too (if only the new one sets it, bind {})",
            tw.map_or("no state".into(), |s| s.state.name()),
            show(&plain),
            show(&reused),
            show(&late)
        ),
    ))
}

/// `shutdown(SHUT_WR)` sends FIN but keeps the socket readable for the answer.
pub fn half_close(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let mut client = scene::connect(tl, "client", addr)?;
    let (mut conn, _) = listener.accept()?;
    tl.log("server", "accept(s)", "ok");
    let r = client.write(b"hola");
    tl.bytes("client", "send(s, \"hola\", 4)", &r);
    let r = client.shutdown(Shutdown::Write);
    tl.unit("client", "shutdown(s, SHUT_WR)", &r);
    r?;
    let local = client.local_addr()?;
    scene::wait_until(
        Duration::from_secs(2),
        || matches!(diag::find(local, Some(addr)), Ok(Some(s)) if s.state == TcpState::FinWait2),
    );
    let c1 = stream_state(tl, "client", &client);
    let s1 = stream_state(tl, "server", &conn);
    let mut request = Vec::new();
    let r = conn.read_to_end(&mut request);
    tl.call("server", "recv(conn) until it returns 0", &r, |n| {
        format!(
            "{n} bytes \"{}\", then 0 (EOF)",
            String::from_utf8_lossy(&request)
        )
    });
    let answer: Vec<u8> = request.iter().rev().copied().collect();
    let r = conn.write(&answer);
    tl.bytes(
        "server",
        &format!("send(conn, \"{}\")", String::from_utf8_lossy(&answer)),
        &r,
    );
    drop(conn);
    tl.log("server", "close(conn)", "ok");
    let mut reply = Vec::new();
    let r = client.read_to_end(&mut reply);
    tl.call("client", "recv(s) until it returns 0", &r, |n| {
        format!(
            "{n} bytes \"{}\", then 0 (EOF)",
            String::from_utf8_lossy(&reply)
        )
    });
    let ok = request == b"hola"
        && reply == b"aloh"
        && is(&c1, TcpState::FinWait2)
        && is(&s1, TcpState::CloseWait);
    Ok(Outcome::new(
        ok,
        format!(
            "after SHUT_WR the client was {} and the server {}; the server read \"{}\" then EOF, and still sent \"{}\", which the client read",
            c1.map_or("gone".into(), |s| s.state.name()),
            s1.map_or("gone".into(), |s| s.state.name()),
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&reply)
        ),
    ))
}

/// Closing a socket that still has unread input aborts the connection with RST.
pub fn close_with_unread_data(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let mut client = scene::connect(tl, "client", addr)?;
    let (conn, peer) = listener.accept()?;
    tl.log("server", "accept(s)", "ok");
    let r = client.write(b"datos");
    tl.bytes("client", "send(s, \"datos\", 5)", &r);
    scene::wait_recv_q(addr, Some(peer), 5);
    stream_state(tl, "server", &conn);
    drop(conn);
    tl.log("server", "close(conn) without reading the 5 bytes", "ok");
    std::thread::sleep(Duration::from_millis(20));
    let s_after = state(tl, "server's connection", addr, Some(peer));
    let c_after = state(tl, "client's connection", peer, Some(addr));
    let mut buf = [0u8; 16];
    let r1 = client.read(&mut buf);
    tl.bytes("client", "recv(s, buf, 16)", &r1);
    let r2 = client.write(b"more");
    tl.bytes("client", "send(s, \"more\", 4)", &r2);
    let reset = matches!(&r1, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET));
    // After an RST neither side is left in any state (no FIN_WAIT, no TIME_WAIT).
    let ok = reset && s_after.is_none() && c_after.is_none();
    let show = |r: &io::Result<usize>| match r {
        Ok(n) => format!("returned {n}"),
        Err(e) => super::timeline::ErrnoName::errno_name(e),
    };
    Ok(Outcome::new(
        ok,
        format!(
            "the server closed with 5 unread bytes: the kernel sent RST, both sockets vanished (no TIME_WAIT), and the client's recv {} then send {}",
            show(&r1),
            show(&r2)
        ),
    ))
}

/// Walk one connection through the TCP states, reading each from the kernel.
pub fn tcp_states(tl: &Timeline) -> anyhow::Result<Outcome> {
    let mut seen: Vec<(String, TcpState)> = Vec::new();
    let mut note = |who: &str, s: &Option<diag::TcpSock>| {
        if let Some(s) = s {
            seen.push((who.to_owned(), s.state));
        }
    };
    let s = scene::bound_socket()?;
    // TCP_DEFER_ACCEPT keeps the server's half of the handshake in SYN_RECV until data
    // arrives; without it, on loopback, SYN_RECV lasts microseconds.
    sys::set_int_option(&s, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, 2)?;
    tl.log("server", "setsockopt(TCP_DEFER_ACCEPT, 2 s)", "ok");
    let r = s.listen(8);
    tl.unit("server", "listen(s, 8)", &r);
    r?;
    let listener: std::net::TcpListener = s.into();
    let addr = listener.local_addr()?;
    note("listener", &state(tl, "listener", addr, None));

    let mut client = scene::connect(tl, "client", addr)?;
    let local = client.local_addr()?;
    note("client", &state(tl, "client", local, Some(addr)));
    note("server", &state(tl, "server's half", addr, Some(local)));
    let r = client.write(b"x");
    tl.bytes("client", "send(s, \"x\", 1)", &r);
    let (mut conn, _) = listener.accept()?;
    tl.log("server", "accept(s)", "returns once data arrived");
    let mut one = [0u8; 1];
    conn.read_exact(&mut one)?;
    note("server", &stream_state(tl, "server", &conn));

    let r = client.shutdown(Shutdown::Write);
    tl.unit("client", "shutdown(s, SHUT_WR)  [active close]", &r);
    scene::wait_until(
        Duration::from_secs(2),
        || matches!(diag::find(local, Some(addr)), Ok(Some(s)) if s.state == TcpState::FinWait2),
    );
    note("client", &state(tl, "client", local, Some(addr)));
    note("server", &state(tl, "server", addr, Some(local)));

    // Fill the client's receive buffer (it does not read), so the server's FIN must wait
    // behind unsent data: that keeps the server in LAST_ACK long enough to be seen.
    conn.set_nonblocking(true)?;
    let chunk = vec![0u8; 1 << 16];
    let mut queued = 0usize;
    loop {
        match conn.write(&chunk) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    tl.log(
        "server",
        "send(conn, ...) until EAGAIN (client does not read)",
        format!("{queued} bytes"),
    );
    drop(conn);
    tl.log("server", "close(conn)  [passive close]", "ok");
    note("server", &state(tl, "server", addr, Some(local)));

    let (n, _) = scene::drain(&client, 1 << 20)?;
    tl.log(
        "client",
        "recv(s) until it returns 0",
        format!("{n} bytes, then EOF"),
    );
    scene::wait_until(
        Duration::from_secs(2),
        || matches!(diag::find(local, Some(addr)), Ok(Some(s)) if s.state == TcpState::TimeWait),
    );
    note("client", &state(tl, "client", local, Some(addr)));
    let gone = state(tl, "server", addr, Some(local)).is_none();
    drop(client);

    let walk: Vec<String> = seen.iter().map(|(w, s)| format!("{w} {s}")).collect();
    let want = [
        ("listener", TcpState::Listen),
        ("client", TcpState::Established),
        ("server", TcpState::SynRecv),
        ("server", TcpState::Established),
        ("client", TcpState::FinWait2),
        ("server", TcpState::CloseWait),
        ("server", TcpState::LastAck),
        ("client", TcpState::TimeWait),
    ];
    let ok = gone
        && seen.len() == want.len()
        && seen
            .iter()
            .zip(want)
            .all(|((w, s), (ww, ws))| w == ww && *s == ws);
    Ok(Outcome::new(
        ok,
        format!("{}, server CLOSED", walk.join(" → ")),
    ))
}
