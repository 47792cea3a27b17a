//! What only the `select` and `uring` designs have: select's descriptor limit, io_uring's
//! provided-buffer shortage, and io_uring missing from the system. (Everything every model
//! must do is checked for them in `serve.rs`, `limits.rs` and `http.rs`.)

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
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
    let (mut child, addr) = start_with_nofile(4096, "reverse --model select --listen 127.0.0.1:0");
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
    signal(child.id(), libc::SIGTERM);
    let status = wait_timeout(&mut child, Duration::from_secs(15)).expect("exit");
    assert!(status.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
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
