//! Helpers shared by the integration tests: start a real `socklab serve` process on an
//! ephemeral port, talk the protocols, inspect processes through `/proc`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The socklab binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_socklab");

/// Every server design, by its `--model` name.
pub const MODELS: [&str; 11] = [
    "iterative",
    "fork",
    "prefork",
    "thread",
    "pool",
    "select",
    "poll",
    "epoll",
    "reactors",
    "uring",
    "tokio",
];

/// Run a Python 3 script with arguments; it must succeed and print exactly `ok`.
pub fn python_ok(script: &str, args: &[&str]) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 is needed: .ci/run installs it");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"ok\n");
}

/// Default timeout for any socket operation in tests.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `socklab serve`, killed (SIGKILL) if a test forgets to stop it.
pub struct Server {
    pub child: Child,
    /// The first stdout line: the bound address or the Unix path.
    pub addr: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    /// Start `socklab serve <args...>` and wait for its address line.
    pub fn start(args: &[&str]) -> Server {
        Server::start_as(&[], args)
    }

    /// Start `WRAPPER... socklab serve <args...>` (`setpriv --reuid ...` to drop root) and
    /// wait for its address line.
    pub fn start_as(wrapper: &[&str], args: &[&str]) -> Server {
        let (program, before) = match wrapper.split_first() {
            Some((p, rest)) => (*p, rest),
            None => (BIN, &[][..]),
        };
        let mut child = Command::new(program)
            .args(before)
            .args(if wrapper.is_empty() {
                &[][..]
            } else {
                &[BIN][..]
            })
            .arg("serve")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklab");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        assert!(
            !line.trim().is_empty(),
            "server printed no address: {args:?}"
        );
        Server {
            child,
            addr: line.trim().to_string(),
            stderr: Some(stderr),
        }
    }

    /// A TCP server of `service` under `model` on 127.0.0.1:0, with extra arguments.
    pub fn tcp(service: &str, model: &str, extra: &[&str]) -> Server {
        let mut args = vec![service, "--model", model, "--listen", "127.0.0.1:0"];
        if !extra.contains(&"--workers") {
            // Process and thread pools serve one connection per worker: give them room for
            // the stalled clients some tests hold open.
            args.extend([
                "--workers",
                if matches!(model, "pool" | "prefork") {
                    "8"
                } else {
                    "2"
                },
            ]);
        }
        args.extend_from_slice(extra);
        Server::start(&args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    pub fn connect_unix(&self) -> UnixStream {
        let s = UnixStream::connect(&self.addr).expect("connect unix");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s
    }

    /// Send SIGTERM.
    pub fn term(&self) {
        signal(self.pid(), libc::SIGTERM);
    }

    /// SIGTERM and wait for the exit (at most `limit`); returns the status and stderr.
    pub fn stop(mut self) -> (ExitStatus, String) {
        self.term();
        let status = wait_timeout(&mut self.child, Duration::from_secs(15))
            .expect("server did not exit within 15 s of SIGTERM");
        let err = self.stderr.take().unwrap().join().unwrap();
        (status, err)
    }
}

impl Server {
    /// The exit status and stderr of a server that exits by itself (within 15 s), without
    /// signalling it.
    pub fn stop_waited(mut self) -> (ExitStatus, String) {
        let status = wait_timeout(&mut self.child, Duration::from_secs(15))
            .expect("server did not exit within 15 s");
        let err = self.stderr.take().unwrap().join().unwrap();
        (status, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    let sig = nix::sys::signal::Signal::try_from(sig).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One reverse request: header + data, then exactly `data.len()` bytes back.
pub fn reverse<S: Read + Write>(s: &mut S, data: &[u8]) -> Vec<u8> {
    let mut msg = (data.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).unwrap();
    got
}

pub fn reversed(data: &[u8]) -> Vec<u8> {
    data.iter().rev().copied().collect()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether the peer closed: a read returns 0 or a reset within the timeout.
pub fn closed_by_peer(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

pub fn half_close(s: &TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
}

/// Processes whose parent is `pid`, with their state letter (`Z` = zombie).
pub fn children_of(pid: u32) -> Vec<(u32, char)> {
    processes_with(1, pid)
}

/// Processes in process group `pgid` that are not zombies.
pub fn process_group_members(pgid: u32) -> Vec<u32> {
    processes_with(2, pgid)
        .into_iter()
        .filter(|p| p.1 != 'Z')
        .map(|p| p.0)
        .collect()
}

/// Processes whose `/proc/PID/stat` field `field` (counted after the command name: state 0,
/// ppid 1, pgrp 2) is `value`, with their state letter.
fn processes_with(field: usize, value: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > field && fields[field].parse::<u32>().ok() == Some(value) {
            out.push((p, fields[0].chars().next().unwrap_or('?')));
        }
    }
    out
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(0) ppid(1) ... utime is field 14 of stat, i.e. index 11 here.
    let utime: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Poll `cond` until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Open descriptors of a process (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The server process and its children (workers, per-connection processes).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    pids.extend(children_of(pid).into_iter().map(|c| c.0));
    pids
}

/// Raise this test process's soft descriptor limit to its hard limit (tests that hold
/// hundreds of connections).
pub fn raise_own_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

/// A server started through `sh -c` (to set a `ulimit` first): `socklab serve ARGS`.
pub fn start_with_shell(prefix: &str, args: &[&str]) -> Server {
    let cmd = format!("{prefix}; exec {BIN} serve {}", args.join(" "));
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    assert!(!line.trim().is_empty(), "server printed no address: {cmd}");
    Server {
        child,
        addr: line.trim().to_string(),
        stderr: Some(stderr),
    }
}

/// Every descendant of `pid` (children, their children...), as `/proc` shows them now.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for (c, _) in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|r| r.1.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// A `socklab` run in the background whose descendants are recorded while it runs, so a
/// test can check that none outlives it.
pub struct Watched {
    pub child: Child,
    /// Every descendant seen so far.
    pub seen: Vec<u32>,
}

impl Watched {
    /// Start `socklab ARGS` with stdout and stderr captured.
    pub fn start(args: &[&str]) -> Watched {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn socklab");
        Watched {
            child,
            seen: Vec::new(),
        }
    }

    /// Record the current descendants.
    pub fn look(&mut self) {
        for p in descendants_of(self.child.id()) {
            if !self.seen.contains(&p) {
                self.seen.push(p);
            }
        }
    }

    /// Keep looking until `cond(descendants seen)` holds or `limit` passes.
    pub fn wait_for(&mut self, limit: Duration, mut cond: impl FnMut(&[u32]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            self.look();
            if cond(&self.seen) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Wait for the exit (looking at descendants meanwhile); status, stdout, stderr.
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, String, String, Vec<u32>) {
        let mut out = self.child.stdout.take().unwrap();
        let mut err = self.child.stderr.take().unwrap();
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + limit;
        let status = loop {
            self.look();
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("socklab did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status,
            o.join().unwrap(),
            e.join().unwrap(),
            self.seen.clone(),
        )
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Assert that none of `pids` is alive within `limit` (they may take a moment to exit).
#[track_caller]
pub fn assert_all_gone(pids: &[u32], limit: Duration, what: &str) {
    let ok = eventually(limit, || pids.iter().all(|&p| !alive(p)));
    let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(ok, "{what}: processes left running: {left:?}");
}
