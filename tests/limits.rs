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
        "fork", "thread", "pool", "poll", "epoll", "reactors", "tokio",
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
    for model in ["thread", "poll", "epoll", "reactors", "tokio"] {
        let cmd = format!(
            "ulimit -n 48; exec {BIN} serve reverse --model {model} --listen 127.0.0.1:0 --workers 1"
        );
        let mut child = Command::new("sh")
            .args(["-c", &cmd])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line.trim().to_string();
        let pid = child.id();
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
        signal(pid, libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(15)).expect("exit");
        assert!(status.success(), "{model}");
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
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
