//! `socklab serve` under every model: the behaviour issue 2 asks of each design, checked
//! with real sockets against the real binary.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use util::*;

/// Many requests on one connection, sizes 0, 1, 7 bytes and 8 MiB.
fn many_requests_one_connection(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    let mut s = srv.connect();
    for (i, len) in [0usize, 1, 7, 8 << 20, 0, 3].into_iter().enumerate() {
        let data = bytes(i as u64, len);
        assert_eq!(
            reverse(&mut s, &data),
            reversed(&data),
            "{model}: request {i} of {len} bytes"
        );
    }
    drop(s);
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: exit {status:?}: {err}");
}

/// 64 clients at once, each with several requests of random sizes.
fn concurrent_clients(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    let addr = srv.addr.clone();
    let handles: Vec<_> = (0..64u64)
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                for r in 0..5u64 {
                    let len = (bytes(c * 31 + r, 4)
                        .iter()
                        .map(|&b| b as usize)
                        .sum::<usize>()
                        * 97)
                        % 100_000;
                    let data = bytes(c * 1000 + r, len);
                    assert_eq!(reverse(&mut s, &data), reversed(&data));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a client failed");
    }
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
}

/// A client that sends half a header and stalls does not hold up the others.
fn stalled_client_does_not_block_others(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    let mut stalled = srv.connect();
    stalled.write_all(&[0, 0]).unwrap();
    let mut mid_body = srv.connect();
    mid_body.write_all(&[0, 0, 0, 10, b'a']).unwrap();
    for i in 0..5 {
        let mut s = srv.connect();
        let data = bytes(i, 1000);
        assert_eq!(
            reverse(&mut s, &data),
            reversed(&data),
            "{model}: client {i} behind a stalled one"
        );
    }
    // The stalled clients can still finish.
    stalled.write_all(&[0, 2, b'x', b'y']).unwrap();
    let mut got = [0u8; 2];
    stalled.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"yx");
    drop((stalled, mid_body));
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
}

/// A client that vanishes mid-request is dropped and the next one is served.
fn disconnect_mid_request(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    for _ in 0..3 {
        let mut s = srv.connect();
        s.write_all(&1000u32.to_be_bytes()).unwrap();
        s.write_all(&[1; 300]).unwrap();
        drop(s);
    }
    let mut s = srv.connect();
    assert_eq!(reverse(&mut s, b"still here"), b"ereh llits");
    drop(s);
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
    // Each vanished client is logged as such, and nothing panicked.
    assert!(err.contains("in the middle of a request"), "{model}: {err}");
    assert!(!err.contains("panicked"), "{model}: {err}");
}

/// A declared length over the limit closes that connection (with a warning); memory stays
/// small even for declared-but-unsent bodies; the next client is served.
fn oversize_length(model: &str) {
    let srv = Server::tcp("reverse", model, &["--max-request", "1M"]);
    let mut bad = srv.connect();
    bad.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(
        closed_by_peer(&mut bad),
        "{model}: oversize request must close the connection"
    );
    // Declared at the limit, never sent: costs nothing up front. (An iterative server would
    // be held by the first of them: it gets none.)
    let hogs_n = if model == "iterative" { 0 } else { 4 };
    let mut hogs: Vec<TcpStream> = (0..hogs_n)
        .map(|_| {
            let mut s = srv.connect();
            s.write_all(&(1u32 << 20).to_be_bytes()).unwrap();
            s
        })
        .collect();
    let mut s = srv.connect();
    assert_eq!(reverse(&mut s, b"next"), b"txen");
    // The server (parent and workers) stays small.
    let mut pids = vec![srv.pid()];
    pids.extend(children_of(srv.pid()).into_iter().map(|c| c.0));
    for pid in pids {
        let kib = rss_kib(pid);
        assert!(kib < 16 * 1024, "{model}: pid {pid} uses {kib} KiB");
    }
    hogs.clear();
    drop(s);
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
    assert!(
        err.contains("exceeds the limit"),
        "{model}: no warning logged: {err}"
    );
}

/// `shutdown(SHUT_WR)` after the requests: the answers still come, then end-of-file.
fn half_close_then_read(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    let mut s = srv.connect();
    let mut msg = Vec::new();
    for d in [&b"abc"[..], b"", b"hello"] {
        msg.extend_from_slice(&(d.len() as u32).to_be_bytes());
        msg.extend_from_slice(d);
    }
    s.write_all(&msg).unwrap();
    half_close(&s);
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"cbaolleh", "{model}");
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
}

/// IPv6 loopback and a Unix socket path.
fn ipv6_and_unix(model: &str) {
    let srv = Server::start(&[
        "reverse",
        "--model",
        model,
        "--listen",
        "[::1]:0",
        "--workers",
        "2",
    ]);
    assert!(srv.addr.starts_with("[::1]:"), "{}", srv.addr);
    let mut s = srv.connect();
    assert_eq!(reverse(&mut s, b"six"), b"xis");
    drop(s);
    assert!(srv.stop().0.success());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rev.sock");
    let p = path.to_str().unwrap();
    let srv = Server::start(&["reverse", "--model", model, "--unix", p, "--workers", "2"]);
    assert_eq!(srv.addr, p);
    let mut s = srv.connect_unix();
    assert_eq!(reverse(&mut s, b"unix"), b"xinu");
    drop(s);
    assert!(srv.stop().0.success());
    assert!(!path.exists(), "{model}: socket file left behind");
}

/// SIGTERM while a request is in flight: its answer is delivered, then exit 0; an idle
/// connection is closed by the server.
fn sigterm_in_flight(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    // An iterative server serves one connection at a time: no idle companion there.
    let mut idle = (model != "iterative").then(|| {
        let mut c = srv.connect();
        assert_eq!(reverse(&mut c, b"ab"), b"ba");
        c
    });
    let mut s = srv.connect();
    let data = bytes(7, 2 << 20);
    s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
    s.write_all(&data[..1000]).unwrap();
    // Let the server read the start of the request (so it is in flight), then signal.
    std::thread::sleep(Duration::from_millis(300));
    srv.term();
    std::thread::sleep(Duration::from_millis(200));
    if model != "iterative" {
        // Stopping servers refuse new connections rather than queue them unserved.
        let refused = std::net::TcpStream::connect(&srv.addr)
            .map(|mut c| closed_by_peer(&mut c))
            .unwrap_or(true);
        assert!(
            refused,
            "{model}: a stopping server still accepts connections"
        );
    }
    s.write_all(&data[1000..]).unwrap();
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, reversed(&data), "{model}: in-flight answer");
    drop(s);
    // The idle connection is closed by the server on shutdown.
    if let Some(idle) = idle.as_mut() {
        assert!(closed_by_peer(idle), "{model}: idle connection kept open");
    }
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: exit {status:?}: {err}");
}

/// Echo and daytime under the same model (daytime closes after its line).
fn echo_and_daytime(model: &str) {
    let srv = Server::tcp("echo", model, &[]);
    let mut s = srv.connect();
    s.write_all(b"hello\r\n").unwrap();
    let mut got = [0u8; 7];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello\r\n");
    half_close(&s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(srv.stop().0.success());

    let srv = Server::tcp("daytime", model, &[]);
    let mut s = srv.connect();
    let mut line = String::new();
    s.read_to_string(&mut line).unwrap();
    assert!(
        line.ends_with("\r\n") && line.len() > 20,
        "{model}: {line:?}"
    );
    assert!(srv.stop().0.success());
}

/// Process models leave no zombie while running and no process after exit.
fn no_zombies(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    for i in 0..10 {
        let mut s = srv.connect();
        assert_eq!(reverse(&mut s, &bytes(i, 10)), reversed(&bytes(i, 10)));
    }
    let pid = srv.pid();
    assert!(
        eventually(Duration::from_secs(5), || children_of(pid)
            .iter()
            .all(|c| c.1 != 'Z')),
        "{model}: zombies {:?}",
        children_of(pid)
    );
    let kids: Vec<u32> = children_of(pid).into_iter().map(|c| c.0).collect();
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
    for k in kids {
        assert!(
            eventually(Duration::from_secs(2), || !std::path::Path::new(&format!(
                "/proc/{k}"
            ))
            .exists()
                || std::fs::read_to_string(format!("/proc/{k}/stat"))
                    .is_ok_and(|s| s.contains(") Z"))),
            "{model}: child {k} outlived the server"
        );
    }
}

/// A client that asks for 8 MiB and resets the connection without reading: the server logs
/// it and goes on serving.
fn client_resets_during_answer(model: &str) {
    let srv = Server::tcp("reverse", model, &[]);
    for i in 0..3 {
        let mut s = srv.connect();
        let data = bytes(i, 8 << 20);
        s.write_all(&(data.len() as u32).to_be_bytes()).unwrap();
        s.write_all(&data).unwrap();
        // Unread data in our receive queue: close() sends RST.
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    let mut s = srv.connect();
    assert_eq!(reverse(&mut s, b"fine"), b"enif", "{model}");
    drop(s);
    let (status, err) = srv.stop();
    assert!(status.success(), "{model}: {err}");
}

/// An echo client that sends 64 MiB before reading anything: the server's memory stays
/// bounded (it stops reading while its output backs up), and every byte comes back in order.
fn echo_flood_is_bounded_and_exact(model: &str) {
    echo_flood_with(model, &[]);
    if model == "epoll" {
        echo_flood_with(model, &["--trigger", "level"]);
    }
}

fn echo_flood_with(model: &str, extra: &[&str]) {
    let srv = Server::tcp("echo", model, extra);
    let s = srv.connect();
    let data = bytes(5, 64 << 20);
    let mut w = s.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    std::thread::sleep(Duration::from_millis(300));
    let mut pids = vec![srv.pid()];
    pids.extend(children_of(srv.pid()).into_iter().map(|c| c.0));
    // Blocked on a client that does not read, the server waits: no memory growth, and no
    // spinning (a level-triggered loop that kept asking for input it will not read would).
    let ticks = |pids: &[u32]| pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>();
    let before = ticks(&pids);
    std::thread::sleep(Duration::from_millis(500));
    let used = ticks(&pids) - before;
    assert!(
        used < 20,
        "{model}: {used} CPU ticks in 0.5 s while blocked on a slow reader"
    );
    let kib: u64 = pids.iter().map(|&p| rss_kib(p)).max().unwrap_or(0);
    assert!(kib < 24 * 1024, "{model}: {kib} KiB resident while flooded");
    let mut got = vec![0u8; data.len()];
    let mut r = s;
    r.read_exact(&mut got).unwrap();
    writer.join().unwrap().unwrap();
    assert!(got == data, "{model}: echoed bytes differ");
    drop(r);
    assert!(srv.stop().0.success());
}

macro_rules! per_model {
    ($($model:ident),*) => {$(
        mod $model {
            #[test] fn many_requests_one_connection() { super::many_requests_one_connection(stringify!($model)) }
            #[test] fn disconnect_mid_request() { super::disconnect_mid_request(stringify!($model)) }
            #[test] fn oversize_length() { super::oversize_length(stringify!($model)) }
            #[test] fn half_close_then_read() { super::half_close_then_read(stringify!($model)) }
            #[test] fn ipv6_and_unix() { super::ipv6_and_unix(stringify!($model)) }
            #[test] fn sigterm_in_flight() { super::sigterm_in_flight(stringify!($model)) }
            #[test] fn echo_and_daytime() { super::echo_and_daytime(stringify!($model)) }
            #[test] fn no_zombies() { super::no_zombies(stringify!($model)) }
            #[test] fn client_resets_during_answer() { super::client_resets_during_answer(stringify!($model)) }
            #[test] fn echo_flood_is_bounded_and_exact() { super::echo_flood_is_bounded_and_exact(stringify!($model)) }
        }
    )*};
}

macro_rules! per_concurrent_model {
    ($($model:ident),*) => {$(
        mod $model {
            #[test] fn concurrent_clients() { super::super::concurrent_clients(stringify!($model)) }
            #[test] fn stalled_client_does_not_block_others() { super::super::stalled_client_does_not_block_others(stringify!($model)) }
        }
    )*};
}

per_model!(iterative, fork, prefork, thread, pool, select, poll, epoll, reactors, uring, tokio);

mod concurrent {
    per_concurrent_model!(fork, prefork, thread, pool, select, poll, epoll, reactors, uring, tokio);
}

/// The level-triggered epoll variant passes the same core checks.
mod epoll_level {
    use super::*;

    #[test]
    fn many_requests_and_concurrency() {
        let srv = Server::tcp("reverse", "epoll", &["--trigger", "level"]);
        let mut s = srv.connect();
        for len in [0usize, 1, 7, 8 << 20] {
            let data = bytes(len as u64, len);
            assert_eq!(reverse(&mut s, &data), reversed(&data));
        }
        drop(s);
        assert!(srv.stop().0.success());
        concurrent_level();
    }

    fn concurrent_level() {
        let srv = Server::tcp("reverse", "reactors", &["--trigger", "level"]);
        let addr = srv.addr.clone();
        let hs: Vec<_> = (0..32u64)
            .map(|c| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(&addr).unwrap();
                    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                    let data = bytes(c, 50_000 + c as usize);
                    assert_eq!(reverse(&mut s, &data), reversed(&data));
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(srv.stop().0.success());
    }
}

/// Data and FIN arriving together, many times: the edge-triggered short-read shortcut must
/// still see the end-of-file (no edge announces it again), under every event loop.
#[test]
fn request_with_fin_in_one_burst_is_answered_and_closed() {
    for (model, extra) in [
        ("epoll", &[][..]),
        ("epoll", &["--trigger", "level"][..]),
        ("reactors", &[][..]),
        ("poll", &[][..]),
        ("select", &[][..]),
        ("uring", &[][..]),
        ("tokio", &[][..]),
    ] {
        let srv = Server::tcp("reverse", model, extra);
        for i in 0..200u64 {
            let mut s = srv.connect();
            let d = bytes(i, (i as usize * 37) % 3000);
            let mut msg = (d.len() as u32).to_be_bytes().to_vec();
            msg.extend_from_slice(&d);
            s.write_all(&msg).unwrap();
            half_close(&s);
            let mut all = Vec::new();
            s.read_to_end(&mut all).unwrap();
            assert_eq!(all, reversed(&d), "{model} {extra:?} round {i}");
        }
        assert!(srv.stop().0.success());
    }
}

/// A process server killed outright (SIGKILL, no chance to clean up) takes its workers and
/// children with it: nothing is left accepting on the port.
#[test]
fn workers_die_with_a_killed_parent() {
    for model in ["prefork", "fork"] {
        let mut srv = Server::tcp("reverse", model, &[]);
        let mut conn = srv.connect();
        assert_eq!(reverse(&mut conn, b"hi"), b"ih");
        let kids: Vec<u32> = children_of(srv.pid()).into_iter().map(|c| c.0).collect();
        assert!(!kids.is_empty(), "{model}: no worker or child process seen");
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
        for k in kids {
            let gone = eventually(Duration::from_secs(5), || {
                std::fs::read_to_string(format!("/proc/{k}/stat")).map_or(true, |s| {
                    s.rsplit_once(')')
                        .is_some_and(|r| r.1.trim_start().starts_with('Z'))
                })
            });
            assert!(gone, "{model}: process {k} outlived its killed parent");
        }
        assert!(
            closed_by_peer(&mut conn),
            "{model}: connection still served"
        );
    }
}
