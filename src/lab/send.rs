//! Sending before the peer reads: small and big sends before `accept`, a big send whose
//! receiver dies, and a non-blocking big send.

use super::diag::TcpState;
use super::scene::{self, state, BIG};
use super::sys;
use super::{Outcome, Timeline};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// Three clients connect, send 1024 bytes and close, all before the server accepts anyone.
pub fn send_before_accept(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let msg = [b'x'; 1024];
    let mut all_sent = true;
    let mut locals = Vec::new();
    for i in 1..=3 {
        let actor = format!("P{i}");
        let mut c = scene::connect(tl, &actor, addr)?;
        let r = c.write(&msg);
        tl.bytes(&actor, "send(s, buf, 1024)", &r);
        all_sent &= matches!(r, Ok(1024));
        locals.push(c.local_addr()?);
        drop(c);
        tl.log(&actor, "close(s)", "ok");
    }
    for l in &locals {
        scene::wait_recv_q(addr, Some(*l), 1024);
        state(
            tl,
            &format!("server side of {l} (not accepted)"),
            addr,
            Some(*l),
        );
    }
    state(tl, "listener", addr, None);
    let mut reads = Vec::new();
    for _ in 0..3 {
        let (s, peer) = listener.accept()?;
        tl.log("server", "accept(s)", format!("connection from {peer}"));
        let (n, calls) = scene::drain(&s, 4096)?;
        tl.log(
            "server",
            "recv(...) until EOF",
            format!("{n} bytes in {calls} calls"),
        );
        reads.push(n);
    }
    let ok = all_sent && reads.iter().all(|&n| n == 1024);
    Ok(Outcome::new(
        ok,
        format!(
            "all 3 clients sent 1024 bytes and closed before any accept(); the server later read {reads:?} bytes from the kernel's buffers"
        ),
    ))
}

/// A 50 MB send cannot finish before someone reads; a small send from a second client can.
pub fn big_send_before_accept(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/ipv4/tcp_wmem");
    tl.setting("/proc/sys/net/ipv4/tcp_rmem");
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    std::thread::scope(|scope| -> anyhow::Result<Outcome> {
        let p1 = scope.spawn(|| -> anyhow::Result<(usize, Duration)> {
            let mut c = scene::connect(tl, "P1", addr)?;
            let local = c.local_addr()?;
            tl.log("P1", "send(s, buf, 50000000) ...", "blocks");
            let big = vec![0u8; BIG];
            let r = c.write(&big);
            tl.bytes("P1", "send(s, buf, 50000000)", &r);
            let done = tl.elapsed();
            drop(c);
            tl.log("P1", &format!("close(s) [{local}]"), "ok");
            Ok((r?, done))
        });
        std::thread::sleep(Duration::from_millis(300));
        let p1_blocked = !p1.is_finished();
        let mut p2 = scene::connect(tl, "P2", addr)?;
        let r = p2.write(&[b'y'; 1024]);
        tl.bytes("P2", "send(s, buf, 1024)", &r);
        drop(p2);
        tl.log("P2", "close(s)", "ok");
        let p2_done = tl.elapsed();
        let p1_still_blocked = !p1.is_finished();
        tl.log(
            "lab",
            "P1 still inside send() after P2 finished?",
            if p1_still_blocked { "yes" } else { "no" },
        );
        // The P1 connection waits in the accept queue with its receive buffer full.
        for s in super::diag::dump(false, false).unwrap_or_default() {
            if s.local == addr && s.state != TcpState::Listen && s.recv_q > 1024 {
                tl.log(
                    "kernel",
                    &format!("sock_diag: server side of {}", s.peer),
                    s.to_string(),
                );
            }
        }
        let (s1, peer) = listener.accept()?;
        tl.log("server", "accept(s)", format!("connection from {peer}"));
        let (n1, calls) = scene::drain(&s1, 1 << 20)?;
        tl.log(
            "server",
            "recv(...) until EOF",
            format!("{n1} bytes in {calls} calls"),
        );
        let (sent, p1_done) = p1.join().map_err(|_| anyhow::anyhow!("P1 panicked"))??;
        let (s2, peer) = listener.accept()?;
        tl.log("server", "accept(s)", format!("connection from {peer}"));
        let (n2, _) = scene::drain(&s2, 4096)?;
        tl.log("server", "recv(...) until EOF", format!("{n2} bytes"));
        let ok = p1_blocked
            && p1_still_blocked
            && sent == BIG
            && n1 == BIG
            && n2 == 1024
            && p2_done < p1_done;
        Ok(Outcome::new(
            ok,
            format!(
                "P1's 50 MB send {} until the server read (returned {sent} at {:.0} ms); P2 completed at {:.0} ms without any accept",
                if p1_blocked && p1_still_blocked { "blocked" } else { "did NOT block" },
                p1_done.as_secs_f64() * 1e3,
                p2_done.as_secs_f64() * 1e3
            ),
        ))
    })
}

/// The receiver process reads 1 MB and exits; the sender's 50 MB `write` returns a short count,
/// the next write fails; with SIGPIPE at its default action a process dies of it.
pub fn big_send_peer_dies(tl: &Timeline) -> anyhow::Result<Outcome> {
    sys::ignore_signal(Signal::SIGPIPE)?;
    tl.log("sender", "signal(SIGPIPE, SIG_IGN)", "ok");
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let client = scene::connect(tl, "sender", addr)?;
    let (conn, _) = listener.accept()?;
    tl.log("server", "accept(s)", "ok");
    // SAFETY: the child only calls read (into a stack buffer), then returns to _exit.
    let child = unsafe {
        sys::fork_child(&[conn.as_raw_fd()], || {
            let mut buf = [0u8; 65536];
            let mut got = 0usize;
            while got < 1 << 20 {
                match nix::unistd::read(conn.as_fd(), &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            0
        })
    }?;
    drop(conn);
    tl.log(
        "server",
        "fork(): receiver child reads 1 MB, then exits",
        format!("child pid {child}"),
    );
    let big = vec![0u8; BIG];
    let r1 = nix::unistd::write(&client, &big);
    tl.bytes("sender", "write(s, buf, 50000000)", &r1);
    let status = scene::reap(child, Duration::from_secs(5));
    tl.call("server", "waitpid(receiver)", &status, |s| format!("{s:?}"));
    let r2 = nix::unistd::write(&client, &big[..1024]);
    tl.bytes("sender", "write(s, buf, 1024)", &r2);
    let r3 = nix::unistd::write(&client, &big[..1024]);
    tl.bytes("sender", "write(s, buf, 1024)", &r3);
    tl.log("sender", "still alive", "yes (SIGPIPE ignored)");

    // The same, in a child that leaves SIGPIPE at its default action.
    let (listener2, addr2) = scene::listener(tl, "server", 2)?;
    let mut c2 = TcpStream::connect(addr2)?;
    let (s2, _) = listener2.accept()?;
    c2.write_all(b"unread")?;
    scene::wait_recv_q(addr2, Some(c2.local_addr()?), 6);
    drop(s2);
    tl.log("server", "close(conn) with 6 unread bytes", "RST sent");
    // SAFETY: the child only calls sigaction and write, then _exit.
    let child2 = unsafe {
        sys::fork_child(&[c2.as_raw_fd()], || {
            if sys::default_signal(Signal::SIGPIPE).is_err() {
                return 3;
            }
            for _ in 0..3 {
                let _ = nix::unistd::write(&c2, b"hello");
            }
            0
        })
    }?;
    tl.log(
        "child",
        "signal(SIGPIPE, SIG_DFL); write(s) x3",
        format!("pid {child2}"),
    );
    let st2 = scene::reap(child2, Duration::from_secs(5));
    tl.call("sender", "waitpid(child)", &st2, |s| format!("{s:?}"));
    let child_killed = matches!(st2, Ok(WaitStatus::Signaled(_, Signal::SIGPIPE, _)));

    let short = matches!(r1, Ok(n) if n > 0 && n < BIG);
    let is_pipe_or_reset =
        |r: &nix::Result<usize>| matches!(r, Err(Errno::EPIPE) | Err(Errno::ECONNRESET));
    let next_fails = is_pipe_or_reset(&r2) && is_pipe_or_reset(&r3);
    let ok = short && next_fails && child_killed;
    let show = |r: &nix::Result<usize>| match r {
        Ok(n) => format!("returned {n}"),
        Err(e) => format!("{e:?}"),
    };
    Ok(Outcome::new(
        ok,
        format!(
            "the 50 MB write {}; the next writes: {} then {}; the sender survived with SIGPIPE ignored, a child with SIGPIPE default {}",
            show(&r1),
            show(&r2),
            show(&r3),
            if child_killed { "was killed by SIGPIPE" } else { "was NOT killed by SIGPIPE" }
        ),
    ))
}

/// A non-blocking 50 MB send copies what fits, then fails `EAGAIN`; `poll` for `POLLOUT` tells
/// when to go on.
pub fn nonblocking_send(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/ipv4/tcp_wmem");
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let client = scene::connect(tl, "sender", addr)?;
    let (conn, _) = listener.accept()?;
    tl.log("receiver", "accept(s)", "ok (does not read yet)");
    client.set_nonblocking(true)?;
    tl.log("sender", "fcntl(s, F_SETFL, O_NONBLOCK)", "ok");
    let big = vec![0u8; BIG];
    std::thread::scope(|scope| -> anyhow::Result<Outcome> {
        // The receiver starts reading only once the sender has met EAGAIN.
        let (go, wait_go) = std::sync::mpsc::channel::<()>();
        let receiver = scope.spawn(move || -> std::io::Result<usize> {
            let _ = wait_go.recv_timeout(Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(50));
            tl.log("receiver", "starts reading", "");
            let (n, calls) = scene::drain(&conn, 1 << 20)?;
            tl.log(
                "receiver",
                "recv(...) until EOF",
                format!("{n} bytes in {calls} calls"),
            );
            Ok(n)
        });
        let mut sent = 0usize;
        let (mut calls, mut eagains, mut polls) = (0usize, 0usize, 0usize);
        let mut first_partial = None;
        let mut second_eagain = false;
        let mut client = client;
        while sent < BIG {
            calls += 1;
            let r = client.write(&big[sent..]);
            let verbose = calls <= 3;
            if verbose {
                tl.bytes("sender", &format!("send(s, buf, {})", BIG - sent), &r);
            }
            match r {
                Ok(n) => {
                    if calls == 1 && n < BIG {
                        first_partial = Some(n);
                    }
                    sent += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if calls == 2 {
                        second_eagain = true;
                        let _ = go.send(());
                    }
                    eagains += 1;
                    polls += 1;
                    let mut fds = [PollFd::new(client.as_fd(), PollFlags::POLLOUT)];
                    let p = poll(&mut fds, PollTimeout::from(5000u16));
                    if polls <= 2 {
                        tl.call("sender", "poll(POLLOUT)", &p, |n| {
                            format!("= {n} (writable)")
                        });
                    }
                    if !matches!(p, Ok(n) if n > 0) {
                        anyhow::bail!("poll(POLLOUT) did not report the socket writable in 5 s");
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        tl.log(
            "sender",
            "... loop of send + poll until all sent",
            format!("{sent} bytes in {calls} sends, {eagains} EAGAIN, {polls} polls"),
        );
        drop(client);
        tl.log("sender", "close(s)", "ok");
        let received = receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        let ok = first_partial.is_some() && second_eagain && received == BIG;
        Ok(Outcome::new(
            ok,
            format!(
                "the first non-blocking send copied {} bytes, the next failed {}; after {polls} POLLOUT waits all {sent} bytes were sent and {received} received",
                first_partial.map_or("ALL".to_string(), |n| n.to_string()),
                if second_eagain { "EAGAIN" } else { "differently" }
            ),
        ))
    })
}
