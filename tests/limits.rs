//! Limits and mistakes: `--max-conns`, `--idle-timeout`, descriptor exhaustion (EMFILE), and
//! user errors that must give one clear line and exit 2.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

#[test]
fn max_conns_closes_the_extra_connection_and_recovers() {
    for model in [
        "fork", "thread", "pool", "select", "poll", "epoll", "reactors", "uring", "tokio",
    ] {
        let srv = Server::tcp("reverse", model, &["--max-conns", "2"]);
        let mut a = srv.connect();
        let mut b = srv.connect();
        assert_eq!(reverse(&mut a, b"a"), b"a");
        assert_eq!(reverse(&mut b, b"b"), b"b");
        let mut c = srv.connect();
        assert!(
            closed_by_peer(&mut c),
            "{model}: third connection not closed"
        );
        drop(a);
        // Once a slot is free, new connections are served again.
        let ok = eventually(Duration::from_secs(5), || {
            let mut d = srv.connect();
            d.write_all(&[0, 0, 0, 1, b'z']).is_ok() && {
                let mut got = [0u8; 1];
                std::io::Read::read_exact(&mut d, &mut got).is_ok() && &got == b"z"
            }
        });
        assert!(ok, "{model}: not served after a slot was freed");
        drop(b);
        let (status, err) = srv.stop();
        assert!(status.success());
        assert!(err.contains("connection limit reached"), "{model}: {err}");
    }
}

#[test]
fn idle_connections_are_closed_after_the_timeout() {
    for model in MODELS {
        let srv = Server::tcp("reverse", model, &["--idle-timeout", "300ms"]);
        let mut s = srv.connect();
        assert_eq!(reverse(&mut s, b"x"), b"x");
        let t = Instant::now();
        assert!(closed_by_peer(&mut s), "{model}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "{model}: closed too early ({waited:?})"
        );
        assert!(
            waited < Duration::from_secs(5),
            "{model}: closed too late ({waited:?})"
        );
        assert!(srv.stop().0.success());
    }
}

/// With descriptors exhausted the server keeps serving its connections, does not spin on
/// the pending ones, and accepts them once descriptors are free again.
#[test]
fn descriptor_exhaustion_pauses_accepts_without_spinning() {
    for model in [
        "thread", "select", "poll", "epoll", "reactors", "uring", "tokio",
    ] {
        let srv = start_with_shell(
            "ulimit -n 48",
            &[
                "reverse",
                "--model",
                model,
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "1",
            ],
        );
        let (addr, pid) = (srv.addr.clone(), srv.pid());
        let connect = || {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s
        };
        let mut first = connect();
        assert_eq!(reverse(&mut first, b"1"), b"1");
        let mut conns: Vec<TcpStream> = (0..70).map(|_| connect()).collect();
        std::thread::sleep(Duration::from_millis(300));
        // Out of descriptors now; the first connection is still served...
        assert_eq!(reverse(&mut first, b"still"), b"llits", "{model}");
        // ...and the server is not burning a core on the pending ones.
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let used = cpu_ticks(pid) - before;
        assert!(
            used < 40,
            "{model}: {used} ticks of CPU in 1 s while out of descriptors"
        );
        // Free descriptors: the last, pending connection gets served.
        let mut last = conns.pop().unwrap();
        conns.truncate(10);
        assert_eq!(reverse(&mut last, b"later"), b"retal", "{model}");
        drop(conns);
        let (status, err) = srv.stop();
        assert!(status.success(), "{model}");
        assert!(err.contains("out of resources"), "{model}: {err}");
    }
}

fn run_fail(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), err)
}

#[test]
fn user_mistakes_exit_2_with_one_clear_line() {
    let srv = Server::tcp("echo", "epoll", &[]);
    let (code, err) = run_fail(&["serve", "echo", "--model", "epoll", "--listen", &srv.addr]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot listen") && err.to_lowercase().contains("in use"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (code, err) = run_fail(&["serve", "echo", "--listen", "no-port-here"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot resolve"), "{err}");

    let (code, err) = run_fail(&["serve", "echo", "--model", "fibers"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("fibers"), "{err}");

    let (code, _) = run_fail(&["serve", "gopher"]);
    assert_eq!(code, 2);

    let (code, err) = run_fail(&["client", "echo", "127.0.0.1:1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot connect"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let (code, err) = run_fail(&["serve", "echo", "--unix", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert!(srv.stop().0.success());
}

#[test]
fn stale_unix_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let srv = Server::start(&["echo", "--model", "epoll", "--unix", path.to_str().unwrap()]);
    let mut s = srv.connect_unix();
    s.write_all(b"hi").unwrap();
    let mut got = [0u8; 2];
    std::io::Read::read_exact(&mut s, &mut got).unwrap();
    assert_eq!(&got, b"hi");
    assert!(srv.stop().0.success());
    assert!(!path.exists());
}

#[test]
fn sigint_stops_like_sigterm() {
    for model in ["fork", "prefork", "pool", "tokio"] {
        let srv = Server::tcp("echo", model, &[]);
        let _idle = srv.connect();
        let mut srv = srv;
        signal(srv.pid(), libc::SIGINT);
        let status = wait_timeout(&mut srv.child, Duration::from_secs(15));
        assert!(status.is_some_and(|s| s.success()), "{model}: {status:?}");
    }
}

/// `--backlog N` reaches `listen(2)`: the kernel reports a listener's backlog in its send
/// queue field (what `ss -lt` shows as Send-Q), read here through sock_diag.
#[test]
fn backlog_option_sets_the_listen_backlog() {
    for (model, backlog) in [
        ("epoll", "7"),
        ("thread", "33"),
        ("prefork", "5"),
        ("reactors", "9"),
        ("uring", "11"),
    ] {
        let srv = Server::tcp("echo", model, &["--backlog", backlog]);
        let addr: std::net::SocketAddr = srv.addr.parse().unwrap();
        let listener = socklab::lab::diag::find(addr, None)
            .expect("sock_diag")
            .expect("the listener is visible to sock_diag");
        assert_eq!(listener.send_q.to_string(), backlog, "{model}");
        assert!(srv.stop().0.success());
    }
}

/// A sparse file of `len` bytes in a fresh root, plus `small.txt` ("small\n").
fn http_root(big: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("big.bin"))
        .unwrap()
        .set_len(big)
        .unwrap();
    std::fs::write(dir.path().join("small.txt"), b"small\n").unwrap();
    dir
}

fn http(root: &std::path::Path, model: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    Server::tcp("http", model, &args)
}

/// One `GET` on a fresh connection; the body, or `None` if the connection failed.
fn get_small(addr: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut all).ok()?;
    let at = all.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(all[at..].to_vec())
}

/// Issue 13, items 2 and 3: a client pipelines thousands of requests for a large file or a
/// directory listing and never reads. The server answers only up to its per-connection
/// bound and stops reading that connection: its descriptors and memory stay bounded, and
/// other clients are served meanwhile.
#[test]
fn pipelined_requests_from_a_client_that_never_reads_are_bounded() {
    let dir = http_root(4 << 20);
    std::fs::create_dir(dir.path().join("m")).unwrap();
    for i in 0..300 {
        std::fs::write(dir.path().join(format!("m/file-number-{i:04}.txt")), b"x").unwrap();
    }
    for model in MODELS {
        let srv = http(dir.path(), model, &[]);
        let pid = srv.pid();
        std::thread::sleep(Duration::from_millis(200));
        let fds_before: usize = process_tree(pid).iter().map(|&p| fd_count(p)).sum();
        let mut floods = Vec::new();
        for (target, count) in [("/big.bin", 2000), ("/m/", 3000)] {
            let s = srv.connect();
            let mut w = s.try_clone().unwrap();
            let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").repeat(count);
            // The writer may block once the server stops reading: that is the point.
            std::thread::spawn(move || {
                let _ = w.write_all(req.as_bytes());
            });
            floods.push(s);
            if model == "iterative" {
                break; // one connection at a time: the second would only wait
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        let tree = process_tree(pid);
        let fds: usize = tree.iter().map(|&p| fd_count(p)).sum();
        let rss = tree.iter().map(|&p| rss_kib(p)).max().unwrap_or(0);
        assert!(
            fds < fds_before + 40,
            "{model}: {fds} descriptors open (was {fds_before} before the floods)"
        );
        assert!(rss < 48 * 1024, "{model}: {rss} KiB resident");
        if model != "iterative" {
            assert_eq!(
                get_small(&srv.addr).as_deref(),
                Some(&b"small\n"[..]),
                "{model}: another client was not served"
            );
        }
        drop(floods);
        let (status, err) = srv.stop();
        assert!(status.success(), "{model}: {err}");
    }
}

/// Item 5: a client that asks for a large file and never reads is cut at the idle timeout
/// in every model (tokio ignored it; thread and fork cut after several timeouts, since a
/// send timeout restarts with every partial send).
#[test]
fn a_client_that_never_reads_is_cut_at_the_idle_timeout() {
    let dir = http_root(1 << 30);
    for model in MODELS {
        let srv = http(dir.path(), model, &["--idle-timeout", "500ms"]);
        let mut s = srv.connect();
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        // Three timeouts: a send timeout restarted by partial sends would still wait.
        std::thread::sleep(Duration::from_millis(1500));
        // Cut: what was in flight arrives, then end-of-file, far short of the 1 GiB.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("{model}: {e} after {got} bytes"),
            }
            assert!(
                got < 256 << 20,
                "{model}: still sending after the idle timeout"
            );
        }
        let (status, err) = srv.stop();
        assert!(status.success(), "{model}: {err}");
    }
}

/// Item 9: SIGTERM during a slow download ends it within `--grace`, in every model (the
/// iterative server went on sending).
#[test]
fn a_slow_download_is_cut_at_the_end_of_the_grace_period() {
    let dir = http_root(1 << 30);
    for model in MODELS {
        let mut srv = http(dir.path(), model, &["--grace", "1s"]);
        let s = srv.connect();
        let mut w = s.try_clone().unwrap();
        w.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = s;
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 0u64;
            // A slow reader: 64 KiB every 20 ms, about 3 MB/s.
            while let Ok(n) = std::io::Read::read(&mut r, &mut buf) {
                if n == 0 {
                    break;
                }
                got += n as u64;
                std::thread::sleep(Duration::from_millis(20));
            }
            got
        });
        std::thread::sleep(Duration::from_millis(500));
        srv.term();
        let t = Instant::now();
        let status = wait_timeout(&mut srv.child, Duration::from_secs(8));
        assert!(
            status.is_some_and(|s| s.success()),
            "{model}: {status:?} {:?} after SIGTERM with --grace 1s",
            t.elapsed()
        );
        let got = reader.join().unwrap();
        assert!(got < 1 << 30, "{model}: the whole file was sent");
    }
}

/// Item 10: `--send read` kept a 256 KiB block for ever per connection that had sent a
/// file: 1,000 keep-alive connections that each fetched a 6-byte file cost 256 MiB. (And
/// tokio's tasks kept a 64 KiB read buffer each, resident: 57 MiB per 1,000.)
#[test]
fn keepalive_connections_that_fetched_a_file_stay_cheap() {
    raise_own_fd_limit();
    let dir = http_root(0);
    for model in ["epoll", "thread", "tokio"] {
        let srv = http(dir.path(), model, &["--send", "read"]);
        let mut conns = Vec::new();
        let mut first = srv.connect();
        let fetch = |s: &mut TcpStream| {
            s.write_all(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 512];
            while !got.ends_with(b"small\n") {
                let n = std::io::Read::read(s, &mut b).unwrap();
                assert!(n > 0, "{model}: closed");
                got.extend_from_slice(&b[..n]);
            }
        };
        fetch(&mut first);
        std::thread::sleep(Duration::from_millis(200));
        let base = rss_kib(srv.pid());
        for _ in 0..1000 {
            let mut s = srv.connect();
            fetch(&mut s);
            conns.push(s);
        }
        let grown = rss_kib(srv.pid()).saturating_sub(base);
        assert!(
            grown < 32 * 1024,
            "{model}: {grown} KiB more for 1,000 idle keep-alive connections"
        );
        drop(conns);
        assert!(srv.stop().0.success());
    }
}

/// Item 11: started with a soft descriptor limit of 256 (and a higher hard one), the server
/// raises it and serves 600 connections at once.
#[test]
fn serve_raises_its_soft_descriptor_limit() {
    raise_own_fd_limit();
    for model in ["epoll", "thread"] {
        let srv = start_with_shell(
            "ulimit -Sn 256",
            &["reverse", "--model", model, "--listen", "127.0.0.1:0"],
        );
        let mut conns = Vec::new();
        for i in 0..600u32 {
            let mut s = srv.connect();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let data = i.to_be_bytes();
            assert_eq!(
                reverse(&mut s, &data),
                reversed(&data),
                "{model}: connection {i}"
            );
            conns.push(s);
        }
        drop(conns);
        assert!(srv.stop().0.success());
    }
}

/// Item 8: prefork under `--max-conns 2` with both slots held by busy workers that are
/// then killed: the parent releases their slots when it reaps them, new clients are served.
#[test]
fn prefork_releases_the_slots_of_killed_workers() {
    let srv = Server::tcp(
        "reverse",
        "prefork",
        &["--workers", "3", "--max-conns", "2"],
    );
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = srv.connect();
        // Half a request: the worker is busy with it.
        s.write_all(&[0, 0, 0, 10, b'a', b'b']).unwrap();
        busy.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    for (worker, _) in children_of(srv.pid()) {
        signal(worker, libc::SIGKILL);
    }
    let served = eventually(Duration::from_secs(5), || {
        let Ok(mut s) = TcpStream::connect(&srv.addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        s.write_all(&[0, 0, 0, 2, b'o', b'k']).is_ok() && {
            let mut got = [0u8; 2];
            std::io::Read::read_exact(&mut s, &mut got).is_ok() && &got == b"ko"
        }
    });
    assert!(
        served,
        "new clients refused after the busy workers were killed"
    );
    drop(busy);
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    assert!(err.contains("released the connection slots"), "{err}");
}

/// Item 12: SIGUSR1 and SIGUSR2 are logged and ignored (they killed the server); SIGHUP
/// drains and stops like SIGTERM, an in-flight request answered first.
#[test]
fn sighup_drains_and_stops_usr_signals_are_ignored() {
    for model in MODELS {
        let mut srv = Server::tcp("reverse", model, &[]);
        let mut s = srv.connect();
        assert_eq!(reverse(&mut s, b"one"), b"eno", "{model}");
        signal(srv.pid(), libc::SIGUSR1);
        signal(srv.pid(), libc::SIGUSR2);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(reverse(&mut s, b"two"), b"owt", "{model}: after SIGUSR1/2");
        // A request in flight when SIGHUP arrives is answered, then the server exits 0.
        s.write_all(&[0, 0, 0, 5, b'h', b'e']).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        signal(srv.pid(), libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(b"llo").unwrap();
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut s, &mut got).unwrap();
        assert_eq!(&got, b"olleh", "{model}: in-flight answer");
        drop(s);
        let status = wait_timeout(&mut srv.child, Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "{model}: {status:?}");
        let (_, err) = srv.stop_waited();
        assert!(
            err.contains("SIGUSR1") && err.contains("SIGUSR2"),
            "{model}: {err}"
        );
    }
}

/// Item 12: with `--max-conns 1`, strictly sequential clients (each closes before the next
/// connects) are all served: the server waits a moment for the slot of a connection whose
/// close it has not yet seen before refusing a new one.
#[test]
fn max_conns_1_serves_sequential_clients() {
    let mut failures = Vec::new();
    for model in MODELS {
        let srv = Server::tcp("reverse", model, &["--max-conns", "1"]);
        let mut refused = 0;
        for i in 0..100u32 {
            let mut s = srv.connect();
            let data = i.to_be_bytes();
            let mut msg = 4u32.to_be_bytes().to_vec();
            msg.extend_from_slice(&data);
            let ok = s.write_all(&msg).is_ok() && {
                let mut got = [0u8; 4];
                std::io::Read::read_exact(&mut s, &mut got).is_ok()
                    && got[..] == reversed(&data)[..]
            };
            refused += usize::from(!ok);
        }
        let (status, err) = srv.stop();
        assert!(status.success(), "{model}: {err}");
        if refused > 0 {
            failures.push(format!("{model}: {refused} of 100 refused"));
        }
    }
    assert!(
        failures.is_empty(),
        "sequential clients refused: {failures:?}"
    );
}
