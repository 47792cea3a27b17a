//! What only the `select` and `uring` designs have: select's descriptor limit, io_uring's
//! provided-buffer shortage, and io_uring missing from the system. (Everything every model
//! must do is checked for them in `serve.rs`, `limits.rs` and `http.rs`.)

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;
use util::*;

/// Raise this process's descriptor limit (the test holds over a thousand sockets).
fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    // Raising the hard limit needs privilege (CI runs as root); the soft one never does.
    if setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(want), hard).unwrap();
    }
}

/// One reverse request; `None` if the server closed the connection instead of answering.
fn try_reverse(s: &mut TcpStream, data: &[u8]) -> Option<Vec<u8>> {
    let mut msg = (data.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(data);
    s.write_all(&msg).ok()?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).ok()?;
    Some(got)
}

/// `select` cannot watch a descriptor at or above `FD_SETSIZE` (1024): with 1,100
/// connections open, the server serves those below the limit, refuses each one above it with
/// one log line (closing it, never touching an `fd_set` out of bounds), and goes on serving.
#[test]
fn select_refuses_descriptors_past_fd_setsize_and_serves_the_rest() {
    raise_nofile(4096);
    let srv = start_with_shell(
        "ulimit -n 4096",
        &["reverse", "--model", "select", "--listen", "127.0.0.1:0"],
    );
    let addr = srv.addr.clone();
    let n = 1100;
    let mut conns: Vec<TcpStream> = (0..n)
        .map(|_| {
            let s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s
        })
        .collect();
    let answered: Vec<bool> = conns
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            let d = bytes(i as u64, 10);
            match try_reverse(s, &d) {
                Some(got) => {
                    assert_eq!(got, reversed(&d), "connection {i}");
                    true
                }
                None => false,
            }
        })
        .collect();
    let served = answered.iter().filter(|&&a| a).count();
    // Connections are accepted in order and get the lowest free descriptor: the first ones
    // (below 1024, less the server's own few descriptors) are served, the rest refused.
    assert!(
        answered[..1000].iter().all(|&a| a),
        "a low connection was refused"
    );
    assert!(
        answered[1030..].iter().all(|&a| !a),
        "a connection past FD_SETSIZE was served"
    );
    assert!((1000..1024).contains(&served), "served {served}");
    // Closing served connections frees low descriptors: new connections are served again.
    conns.truncate(100);
    let mut fresh = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let ok = try_reverse(&mut s, b"again") == Some(b"niaga".to_vec());
            fresh = Some(s);
            ok
        }),
        "not served after descriptors were freed"
    );
    assert_eq!(
        try_reverse(&mut conns[0], b"first"),
        Some(b"tsrif".to_vec())
    );
    drop((conns, fresh));
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    let refusals = err.matches("select cannot watch descriptor").count();
    // (A retry of the fresh connection may have been refused too, before the server had seen
    // the others close.)
    assert!(
        refusals >= n - served,
        "one line per refused connection: {err}"
    );
    assert!(err.contains("FD_SETSIZE is 1024"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Many connections sending at once through a loop with only 16 receive buffers of 16 KiB
/// and a submission queue of 2 entries (completions: 32): the kernel runs out of buffers
/// again and again (each receive ends with ENOBUFS and is re-armed), the loop submits many
/// times a turn, and every byte still arrives, in order, and is answered exactly. (With
/// `DEFER_TASKRUN` this kernel runs completions in batches that fit the queue, so the queue
/// did not overflow here; an overflow would end multishot operations the same way ENOBUFS
/// does, and they are re-armed the same way.)
#[test]
fn uring_short_of_receive_buffers_loses_no_byte() {
    let srv = start_with_shell(
        "export SOCKLAB_URING_BUFFERS=16 SOCKLAB_URING_ENTRIES=2",
        &[
            "reverse",
            "--model",
            "uring",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "-v",
        ],
    );
    let addr = srv.addr.clone();
    let clients: Vec<_> = (0..256u64)
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                let data = bytes(c, 1 << 20);
                let got = reverse(&mut s, &data);
                assert!(got == reversed(&data), "connection {c}: answer differs");
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client failed");
    }
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
    assert!(
        err.contains("receive buffers ran out"),
        "the loop was never short of buffers: the test proved nothing"
    );

    assert!(!err.contains("panicked"), "{err}");
}

/// Build a tiny C program (as tests/clients.rs does with `cln_rev`) that installs a seccomp
/// filter making `io_uring_setup` fail with `errno`, then execs its arguments: a system
/// where io_uring is refused (`EPERM`: a sandbox, `kernel.io_uring_disabled`) or absent
/// (`ENOSYS`), without touching the machine's settings.
fn no_uring_wrapper(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("no_uring.c");
    std::fs::write(
        &src,
        r#"
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* usage: no_uring ERRNO PROGRAM ARGS... */
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    struct sock_filter code[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (atoi(argv[1]) & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { sizeof code / sizeof code[0], code };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        return 2;
    }
    execv(argv[2], argv + 2);
    perror("execv");
    return 2;
}
"#,
    )
    .unwrap();
    let exe = dir.join("no_uring");
    let cc = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("a C compiler (cc) is needed for this test");
    assert!(cc.success());
    exe
}

/// `--model uring` where io_uring is refused or missing: one line naming the cause and the
/// alternative, exit 2, nothing served -- never a silent fallback to another design.
#[test]
fn uring_unavailable_fails_at_start_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = no_uring_wrapper(dir.path());
    for (errno, cause) in [
        (libc::EPERM, "io_uring_disabled"),
        (libc::ENOSYS, "no io_uring"),
    ] {
        let out = Command::new(&wrapper)
            .arg(errno.to_string())
            .args([
                BIN,
                "serve",
                "echo",
                "--model",
                "uring",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "errno {errno}: {err}");
        assert!(out.stdout.is_empty(), "it listened: {:?}", out.stdout);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("io_uring is not available") && err.contains(cause),
            "{err}"
        );
        assert!(err.contains("--model reactors"), "{err}");
        // The same filter leaves the other designs alone.
        let ok = Command::new(&wrapper)
            .arg(errno.to_string())
            .args([BIN, "lab", "--list"])
            .output()
            .unwrap();
        assert!(ok.status.success());
    }
}

/// Files larger than a pipe, a read block and a mapping window, to a reader that takes its
/// time (so sends complete partly and resume), under every `--send` strategy, byte for byte;
/// and an HTTP head that never completes gets its 408, under both new designs.
#[test]
fn new_models_send_big_files_with_every_strategy_and_time_out_slow_heads() {
    let dir = tempfile::tempdir().unwrap();
    let data = bytes(9, 9 << 20);
    std::fs::write(dir.path().join("big.bin"), &data).unwrap();
    let root = dir.path().to_str().unwrap();
    for model in ["uring", "select"] {
        for send in ["read", "mmap", "sendfile"] {
            let srv = Server::start(&[
                "http",
                "--root",
                root,
                "--model",
                model,
                "--send",
                send,
                "--workers",
                "2",
                "--header-timeout",
                "500ms",
                "--listen",
                "127.0.0.1:0",
            ]);
            let mut s = srv.connect();
            s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let mut answer = Vec::new();
            let mut chunk = vec![0u8; 256 << 10];
            loop {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&chunk[..n]);
                if answer.len() < 2 << 20 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let head_end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            assert!(answer.starts_with(b"HTTP/1.1 200 OK"), "{model}/{send}");
            assert!(
                answer[head_end..] == data[..],
                "{model}/{send}: body differs"
            );

            let mut slow = srv.connect();
            slow.write_all(b"GET /big.bin HTTP/1.1\r\nHost: sl")
                .unwrap();
            let mut rest = Vec::new();
            slow.read_to_end(&mut rest).unwrap();
            assert!(
                rest.starts_with(b"HTTP/1.1 408"),
                "{model}/{send}: {:?}",
                String::from_utf8_lossy(&rest)
            );
            let (status, err) = srv.stop();
            assert!(status.success(), "{model}/{send}: {err}");
        }
    }
}

/// `--send sendfile` under uring splices into the socket on kernel worker threads: the
/// sockets are non-blocking, so a client that does not read makes the splice return at once
/// (and the loop wait for room with a poll) instead of holding a worker thread. 64 clients
/// that request a big file and never read leave the server with a handful of threads, not
/// one per client, and it goes on serving everyone else.
#[test]
fn uring_sendfile_to_readers_that_stall_holds_no_thread_per_client() {
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join("big.img")).unwrap();
    f.set_len(256 << 20).unwrap();
    std::fs::write(dir.path().join("small.txt"), b"small\n").unwrap();
    let srv = Server::start(&[
        "http",
        "--root",
        dir.path().to_str().unwrap(),
        "--model",
        "uring",
        "--send",
        "sendfile",
        "--workers",
        "2",
        "--listen",
        "127.0.0.1:0",
    ]);
    let stalled: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = srv.connect();
            s.write_all(b"GET /big.img HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let threads = std::fs::read_dir(format!("/proc/{}/task", srv.pid()))
        .unwrap()
        .count();
    assert!(threads < 32, "{threads} threads for 64 stalled readers");
    let mut s = srv.connect();
    s.write_all(b"GET /small.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.ends_with("small\n"), "{answer}");
    drop(stalled);
    let (status, err) = srv.stop();
    assert!(status.success(), "{err}");
}

/// A request still incomplete when the grace period ends is cut: the server closes it, logs
/// how many it cut, and exits 0 soon after `--grace`, under both new designs.
#[test]
fn new_models_cut_unfinished_requests_when_the_grace_period_ends() {
    for model in ["select", "uring"] {
        let srv = Server::tcp("reverse", model, &["--grace", "500ms"]);
        let mut s = srv.connect();
        s.write_all(&1000u32.to_be_bytes()).unwrap();
        s.write_all(&[7; 10]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let t = std::time::Instant::now();
        let (status, err) = srv.stop();
        let took = t.elapsed();
        assert!(status.success(), "{model}: {err}");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(5),
            "{model}: exited after {took:?}"
        );
        assert!(err.contains("grace period over"), "{model}: {err}");
        assert!(
            closed_by_peer(&mut s),
            "{model}: the cut connection is open"
        );
    }
}
