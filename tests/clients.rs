//! The clients end to end, foreign clients (a C `cln_rev`, `nc`, Python) against the
//! servers, and UDP.

mod util;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use util::*;

fn socklab(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn split_addr(addr: &str) -> (String, String) {
    let (h, p) = addr.rsplit_once(':').unwrap();
    (
        h.trim_matches(|c| c == '[' || c == ']').to_string(),
        p.to_string(),
    )
}

#[test]
fn reverse_client_sends_each_file_over_one_connection() {
    let srv = Server::tcp("reverse", "epoll", &["-v"]);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<(std::path::PathBuf, Vec<u8>)> = [0usize, 1, 4096, 3 << 20]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let p = dir.path().join(format!("f{i}"));
            let d = bytes(i as u64 + 50, n);
            std::fs::write(&p, &d).unwrap();
            (p, d)
        })
        .collect();
    let mut args = vec!["client", "reverse", srv.addr.as_str()];
    args.extend(files.iter().map(|f| f.0.to_str().unwrap()));
    let out = socklab(&args, b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: Vec<u8> = files.iter().flat_map(|f| reversed(&f.1)).collect();
    assert_eq!(out.stdout, want);
    let (status, err) = srv.stop();
    assert!(status.success());
    // One connection for all four files.
    assert_eq!(err.matches("connection open").count(), 1, "{err}");
}

#[test]
fn c_client_from_the_course_listing_is_wire_compatible() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("cln_rev");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/c/cln_rev.c");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(src)
        .status();
    let cc = cc.expect("a C compiler (cc) is needed for this test");
    assert!(cc.success());
    for model in ["iterative", "fork", "thread", "epoll", "tokio"] {
        let srv = Server::tcp("reverse", model, &[]);
        let (host, port) = split_addr(&srv.addr);
        let f1 = dir.path().join("a");
        let f2 = dir.path().join("b");
        std::fs::write(&f1, b"hola").unwrap();
        let big = bytes(3, 1 << 20);
        std::fs::write(&f2, &big).unwrap();
        let out = Command::new(&exe)
            .args([&host, &port])
            .arg(&f1)
            .arg(&f2)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut want = b"aloh".to_vec();
        want.extend(reversed(&big));
        assert_eq!(out.stdout, want, "{model}");
        assert!(srv.stop().0.success());
    }
}

#[test]
fn echo_client_copies_stdin_and_ends_on_eof() {
    let srv = Server::tcp("echo", "reactors", &[]);
    let input = bytes(9, 300_000);
    let out = socklab(&["client", "echo", &srv.addr], &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, input);
    assert!(srv.stop().0.success());
}

#[test]
fn clients_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let p = path.to_str().unwrap();
    let srv = Server::start(&["reverse", "--model", "thread", "--unix", p]);
    let f = dir.path().join("f");
    std::fs::write(&f, b"abc").unwrap();
    let out = socklab(
        &["client", "reverse", "--unix", p, f.to_str().unwrap()],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"cba");
    assert!(srv.stop().0.success());

    let srv = Server::start(&["daytime", "--model", "poll", "--unix", p]);
    let out = socklab(&["client", "daytime", "--unix", p], b"");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\r\n"));
    assert!(srv.stop().0.success());
}

#[test]
fn daytime_client_prints_the_line() {
    let srv = Server::tcp("daytime", "fork", &[]);
    let out = socklab(&["client", "daytime", &srv.addr], b"");
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert_eq!(line.split_whitespace().count(), 6, "{line:?}");
    assert!(srv.stop().0.success());
}

#[test]
fn udp_echo_reverse_daytime_and_the_udp_clients() {
    let srv = Server::start(&["echo", "--udp", "--listen", "127.0.0.1:0"]);
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.connect(&srv.addr).unwrap();
    let mut buf = [0u8; 65536];
    // Datagram boundaries are kept: two sends, two answers of the same sizes.
    sock.send(&[1; 50]).unwrap();
    sock.send(&[2; 60]).unwrap();
    assert_eq!(sock.recv(&mut buf).unwrap(), 50);
    assert_eq!(sock.recv(&mut buf).unwrap(), 60);
    let out = socklab(&["client", "echo", "--udp", &srv.addr], b"one\ntwo\n");
    assert_eq!(out.stdout, b"one\ntwo\n");
    assert!(srv.stop().0.success());

    let srv = Server::start(&[
        "reverse", "--udp", "--listen", "[::1]:0", "--model", "epoll",
    ]);
    let sock = std::net::UdpSocket::bind("[::1]:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.connect(&srv.addr).unwrap();
    let d = bytes(1, 60_000);
    sock.send(&d).unwrap();
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &reversed(&d)[..]);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"datagram").unwrap();
    let out = socklab(
        &["client", "reverse", "--udp", &srv.addr, f.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.stdout, b"margatad");
    let (status, err) = srv.stop();
    assert!(status.success());
    assert!(
        err.contains("does not apply"),
        "--model with --udp must say so: {err}"
    );

    let srv = Server::start(&["daytime", "--udp", "--listen", "127.0.0.1:0"]);
    let out = socklab(&["client", "daytime", "--udp", &srv.addr], b"");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\r\n"));
    // discard answers nothing: the client times out with a clear error.
    let srv2 = Server::start(&["discard", "--udp", "--listen", "127.0.0.1:0"]);
    let out = socklab(
        &["client", "echo", "--udp", "--timeout", "300ms", &srv2.addr],
        b"x\n",
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no answer"));
    assert!(srv.stop().0.success());
    assert!(srv2.stop().0.success());
}

#[test]
fn netcat_as_a_foreign_client() {
    let srv = Server::tcp("echo", "epoll", &[]);
    let (host, port) = split_addr(&srv.addr);
    // -N: shut down the write side at end of stdin, then wait for the server to close.
    let mut nc = Command::new("nc")
        .args(["-N", &host, &port])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("netcat (nc) is needed: .ci/run installs netcat-openbsd");
    nc.stdin
        .take()
        .unwrap()
        .write_all(b"through netcat\n")
        .unwrap();
    let out = nc.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"through netcat\n");
    assert!(srv.stop().0.success());

    let srv = Server::tcp("daytime", "prefork", &[]);
    let (host, port) = split_addr(&srv.addr);
    let out = Command::new("nc")
        .args(["-d", &host, &port])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("\r\n"));
    assert!(srv.stop().0.success());
}

#[test]
fn python_as_a_foreign_client() {
    let srv = Server::tcp("reverse", "pool", &[]);
    let (host, port) = split_addr(&srv.addr);
    let script = r#"
import socket, struct, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
for msg in [b"", b"Python", bytes(range(256)) * 100]:
    s.sendall(struct.pack("!I", len(msg)) + msg)
    got = b""
    while len(got) < len(msg):
        chunk = s.recv(65536)
        assert chunk, "server closed early"
        got += chunk
    assert got == msg[::-1], (len(got), len(msg))
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b""
print("ok")
"#;
    python_ok(script, &[&host, &port]);
    assert!(srv.stop().0.success());
}

#[test]
fn discard_reads_and_drops() {
    let srv = Server::tcp("discard", "thread", &[]);
    let mut s = srv.connect();
    s.write_all(&bytes(2, 1 << 20)).unwrap();
    half_close(&s);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(srv.stop().0.success());
}

/// A TCP server that accepts and reads, but never sends a byte nor closes: a client owed
/// an answer must give up after `--timeout` (issue 12, item 11).
fn silent_server() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            let mut r = s.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while matches!(r.read(&mut b), Ok(n) if n > 0) {}
            });
            held.push(s);
        }
    });
    addr
}

#[test]
fn every_client_gives_up_on_a_silent_server() {
    let addr = silent_server();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    std::fs::write(&f, b"abc").unwrap();
    let cases: [(&[&str], &[u8]); 3] = [
        (&["client", "daytime", &addr], b""),
        (&["client", "echo", &addr], b"hello\n"),
        (&["client", "reverse", &addr, f.to_str().unwrap()], b""),
    ];
    for (args, input) in cases {
        let mut args = args.to_vec();
        args.extend(["--timeout", "500ms"]);
        let mut child = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep stdin open after the input, as a terminal would: the client must not wait
        // for its end to notice the silence.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        let Some(status) = wait_timeout(&mut child, Duration::from_secs(5)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} hung on a silent server");
        };
        drop(stdin);
        assert_eq!(status.code(), Some(1), "{args:?}");
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(
            err.contains("sent nothing for 0.5 s") && err.lines().count() == 1,
            "{err}"
        );
    }
    // Without --timeout there is still a limit, and it is said.
    let help = socklab(&["client", "daytime", "--help"], b"");
    assert!(String::from_utf8_lossy(&help.stdout).contains("[default: 10s]"));
}

#[test]
fn echo_client_waits_while_nothing_is_owed() {
    // A person typing slowly: nothing is owed between lines, so no timeout fires.
    let srv = Server::tcp("echo", "epoll", &[]);
    let mut child = Command::new(BIN)
        .args(["client", "echo", &srv.addr, "--timeout", "300ms"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(b"one\n").unwrap();
    std::thread::sleep(Duration::from_millis(900));
    input.write_all(b"two\n").unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"one\ntwo\n");
    assert!(srv.stop().0.success());
}

#[test]
fn reverse_client_reads_stdin_for_dash_and_refuses_missing_files_before_sending() {
    let srv = Server::tcp("reverse", "epoll", &["-v"]);
    let out = socklab(&["client", "reverse", &srv.addr, "-"], b"stdin!");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"!nidts");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("present");
    std::fs::write(&f, b"x").unwrap();
    let missing = dir.path().join("missing");
    for bad in [missing.to_str().unwrap(), dir.path().to_str().unwrap()] {
        let out = socklab(
            &["client", "reverse", &srv.addr, f.to_str().unwrap(), bad],
            b"",
        );
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("socklab: error: cannot read") && err.lines().count() == 1,
            "{err}"
        );
        assert!(out.stdout.is_empty(), "nothing was sent for {bad}");
    }
    let (status, err) = srv.stop();
    assert!(status.success());
    // Only the stdin run connected: the refused ones sent nothing.
    assert_eq!(err.matches("connection open").count(), 1, "{err}");
}
