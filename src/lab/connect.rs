//! Connection set-up: `connect` before `listen`, before `accept`, the backlog, the 5-tuple.

use super::diag::{self, TcpState};
use super::scene::{self, state};
use super::{Outcome, Timeline};
use anyhow::Context as _;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A bound socket that never called `listen` refuses connections.
pub fn connect_before_listen(tl: &Timeline) -> anyhow::Result<Outcome> {
    let server = scene::bound_socket()?;
    let addr = server
        .local_addr()?
        .as_socket()
        .context("bound socket has no inet address")?;
    tl.log(
        "server",
        "socket(); bind(127.0.0.1:0)",
        format!("bound to {addr}, no listen()"),
    );
    state(tl, "server socket", addr, None);
    let r = TcpStream::connect(addr);
    tl.call("client", &format!("connect({addr})"), &r, |_| "ok".into());
    Ok(match r {
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Outcome::new(
            true,
            "connect() failed ECONNREFUSED: a bound socket is not a server until it calls listen()",
        ),
        Err(e) => Outcome::new(
            false,
            format!("connect() failed, but with {e} instead of ECONNREFUSED"),
        ),
        Ok(_) => Outcome::new(false, "connect() succeeded without a listener"),
    })
}

/// `connect` returns as soon as the kernel finished the handshake; `accept` only dequeues.
pub fn connect_before_accept(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    state(tl, "listener", addr, None);
    let client = scene::connect(tl, "client", addr)?;
    let connected_at = tl.elapsed();
    let client_state = scene::stream_state(tl, "client", &client);
    let lst = state(tl, "listener", addr, None);
    std::thread::sleep(Duration::from_millis(100));
    let r = listener.accept();
    tl.call("server", "accept(s)", &r, |(_, peer)| {
        format!("connection from {peer}")
    });
    let accepted_at = tl.elapsed();
    r?;
    let ok = connected_at < accepted_at
        && scene::is(&client_state, TcpState::Established)
        && lst.is_some_and(|l| l.recv_q == 1);
    Ok(Outcome::new(
        ok,
        if ok {
            format!(
                "connect() completed at {:.1} ms, ESTABLISHED, and waited in the accept queue until accept() at {:.1} ms",
                connected_at.as_secs_f64() * 1e3,
                accepted_at.as_secs_f64() * 1e3
            )
        } else {
            "the client was not ESTABLISHED in the accept queue before accept()".into()
        },
    ))
}

/// With `listen(s, 2)` Linux queues backlog + 1 = 3 finished connections; the 4th client's
/// SYN is dropped and retried until `accept` makes room.
pub fn backlog(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/ipv4/tcp_abort_on_overflow");
    tl.setting("/proc/sys/net/core/somaxconn");
    tl.setting("/proc/sys/net/ipv4/tcp_syncookies");
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let mut early = Vec::new();
    for i in 1..=3 {
        early.push(scene::connect(tl, &format!("P{i}"), addr)?);
    }
    let lst = state(tl, "listener", addr, None);
    std::thread::scope(|scope| -> anyhow::Result<Outcome> {
        let p4 = scope.spawn(|| {
            tl.log("P4", &format!("connect({addr}) ..."), "blocks");
            let r = TcpStream::connect(addr);
            tl.call("P4", &format!("connect({addr})"), &r, |s| {
                match s.local_addr() {
                    Ok(a) => format!("ok (from {a}), returns"),
                    Err(_) => "ok".into(),
                }
            });
            (r, tl.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let waiting = diag::dump(false, false)
            .map(|all| {
                all.into_iter()
                    .filter(|s| s.peer == addr && s.state == TcpState::SynSent)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for s in &waiting {
            tl.log(
                "kernel",
                &format!("sock_diag: client {}", s.local),
                s.to_string(),
            );
        }
        let p4_blocked = !p4.is_finished();
        tl.log(
            "lab",
            "P4 still inside connect()?",
            if p4_blocked { "yes" } else { "no" },
        );
        let r = listener.accept();
        tl.call("server", "accept(s)", &r, |(_, peer)| {
            format!("connection from {peer}")
        });
        let first_accept = tl.elapsed();
        let (p4_result, p4_done) = p4.join().map_err(|_| anyhow::anyhow!("P4 panicked"))?;
        let p4_ok = p4_result.is_ok();
        for _ in 0..3 {
            let r = listener.accept();
            tl.call("server", "accept(s)", &r, |(_, peer)| {
                format!("connection from {peer}")
            });
        }
        let queue = lst.as_ref().map_or(0, |l| l.recv_q);
        let ok = queue == 3 && p4_blocked && waiting.len() == 1 && p4_ok && p4_done > first_accept;
        let text = format!(
            "3 connects completed with no accept (accept queue {queue}, backlog 2); P4 {} in SYN_SENT and connected {:.0} ms after the first accept (its SYN is retried)",
            if p4_blocked { "waited" } else { "did not wait" },
            (p4_done.saturating_sub(first_accept)).as_secs_f64() * 1e3
        );
        Ok(Outcome::new(
            ok,
            if ok {
                text
            } else {
                format!("expected 3 queued and the 4th waiting: {text}")
            },
        ))
    })
}

/// Two connections to one server port differ in their client's ephemeral port.
pub fn five_tuple(tl: &Timeline) -> anyhow::Result<Outcome> {
    let range = tl
        .setting("/proc/sys/net/ipv4/ip_local_port_range")
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .context("cannot read ip_local_port_range")?;
    let (listener, addr) = scene::listener(tl, "server", 8)?;
    let mut tuples: Vec<(SocketAddr, SocketAddr)> = Vec::new();
    let mut clients = Vec::new();
    for name in ["client A", "client B"] {
        let c = scene::connect(tl, name, addr)?;
        let local = c.local_addr()?;
        let peer = c.peer_addr()?;
        tl.log(name, "getsockname()", local.to_string());
        tl.log(name, "getpeername()", peer.to_string());
        tuples.push((local, peer));
        clients.push(c);
    }
    for _ in 0..2 {
        let (s, peer) = listener.accept()?;
        tl.log("server", "accept(s)", format!("connection from {peer}"));
        tl.log("server", "getsockname(conn)", s.local_addr()?.to_string());
    }
    for (i, (l, p)) in tuples.iter().enumerate() {
        tl.log(
            "lab",
            &format!("5-tuple {}", i + 1),
            format!("(TCP, {}, {}, {}, {})", l.ip(), l.port(), p.ip(), p.port()),
        );
    }
    let (a, b) = (tuples[0].0.port(), tuples[1].0.port());
    let in_range = |p: u16| (range.0..=range.1).contains(&p);
    let ok = a != b && in_range(a) && in_range(b) && tuples[0].1 == tuples[1].1;
    Ok(Outcome::new(
        ok,
        format!(
            "both clients reach {addr}; their ephemeral ports {a} and {b} {} and {} the range {}-{}",
            if a != b { "differ" } else { "are EQUAL" },
            if in_range(a) && in_range(b) { "lie in" } else { "are NOT in" },
            range.0,
            range.1
        ),
    ))
}
