//! `socklab ipc`: every mechanism in both modes, both ways of running, at the sizes that
//! matter; the verifier catching injected faults end to end; the limits; cleanup after
//! success, failure and Ctrl-C; producer/consumer counts; the JSON and the chart.
//!
//! Counts are small and nothing asserts a speed: the machine is shared.

mod util;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use util::{children_of, eventually, python_ok, signal, wait_timeout, BIN};

const MECHANISMS: [&str; 17] = [
    "pipe",
    "fifo",
    "socketpair",
    "socketpair-dgram",
    "socketpair-seqpacket",
    "unix",
    "unix-dgram",
    "tcp",
    "tcp6",
    "udp",
    "posix-mq",
    "sysv-mq",
    "shm-futex",
    "shm-eventfd",
    "shm-signal",
    "shm-sem",
    "shm-spin",
];

const SIZES: [usize; 4] = [0, 1, 65536, 1 << 20];

/// A private temp dir for one socklab run (its FIFOs and socket paths go there), so the
/// cleanup checks see only that run's leftovers.
struct Tmp(PathBuf);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("socklab-test-ipc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    fn entries(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn socklab_in(tmp: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ipc")
        .args(args)
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .output()
        .expect("run socklab")
}

fn socklab(args: &[&str]) -> Output {
    let tmp = Tmp::new("run");
    socklab_in(&tmp.0, args)
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}); stdout {}; stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn proc_value(path: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Whether `mechanism` refuses `size` on this machine (the limits the issue names): POSIX mq
/// above `fs.mqueue.msgsize_max`, SysV above `kernel.msgmax`, UDP above 65,507, a Unix
/// datagram above the send buffer (twice `net.core.wmem_max`, less 32 bytes).
fn over_limit(mechanism: &str, size: usize) -> bool {
    let len = size + 16;
    match mechanism {
        "posix-mq" => len > proc_value("/proc/sys/fs/mqueue/msgsize_max"),
        "sysv-mq" => len > proc_value("/proc/sys/kernel/msgmax"),
        "udp" => len > 65_507,
        "unix-dgram" | "socketpair-dgram" | "socketpair-seqpacket" => {
            len + 32 > 2 * proc_value("/proc/sys/net/core/wmem_max")
        }
        _ => false,
    }
}

/// Run one mechanism at one size in both modes and check the counts; a size over its limit
/// must be refused with exit 2 and a one-line reason.
#[track_caller]
fn check(mechanism: &str, between: &str, size: usize) {
    for mode in ["rtt", "stream"] {
        let size_arg = size.to_string();
        let out = socklab(&[
            mechanism,
            "--between",
            between,
            "--mode",
            mode,
            "--size",
            &size_arg,
            "-n",
            "12",
            "--warmup",
            "3",
            "--json",
        ]);
        let what = format!("{mechanism} {between} {mode} {size} B");
        if over_limit(mechanism, size) {
            assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
            let err = stderr(&out);
            assert_eq!(err.lines().count(), 1, "{what}: {err}");
            assert!(err.contains("at most"), "{what}: {err}");
            assert!(out.stdout.is_empty());
            return;
        }
        assert_eq!(out.status.code(), Some(0), "{what}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["mechanism"], mechanism, "{what}");
        assert_eq!(r["mode"], mode);
        assert_eq!(r["between"], between);
        assert_eq!(r["size"], size);
        assert_eq!(r["messages"], 12, "{what}");
        // Both sides verified every message: warm-up + measured, each side.
        assert_eq!(r["verified"], 2 * 15, "{what}");
        if mode == "rtt" {
            assert!(r["rtt_us"]["p50"].as_f64().unwrap() > 0.0, "{what}");
            assert!(r["throughput"].is_null());
        } else {
            assert!(
                r["throughput"]["msgs_per_s"].as_f64().unwrap() > 0.0,
                "{what}"
            );
            assert!(r["rtt_us"].is_null());
        }
    }
}

fn every_size(mechanism: &str) {
    for between in ["processes", "threads"] {
        for size in SIZES {
            check(mechanism, between, size);
        }
    }
}

#[test]
fn pipe_and_fifo() {
    every_size("pipe");
    every_size("fifo");
}

#[test]
fn socketpairs() {
    every_size("socketpair");
    every_size("socketpair-dgram");
    every_size("socketpair-seqpacket");
}

#[test]
fn unix_sockets() {
    every_size("unix");
    every_size("unix-dgram");
}

#[test]
fn inet_sockets() {
    every_size("tcp");
    every_size("tcp6");
    every_size("udp");
}

#[test]
fn message_queues() {
    every_size("posix-mq");
    every_size("sysv-mq");
    // The largest sizes they carry.
    check(
        "posix-mq",
        "processes",
        proc_value("/proc/sys/fs/mqueue/msgsize_max") - 16,
    );
    check(
        "sysv-mq",
        "processes",
        proc_value("/proc/sys/kernel/msgmax") - 16,
    );
}

#[test]
fn shared_memory_rings() {
    for m in [
        "shm-futex",
        "shm-eventfd",
        "shm-signal",
        "shm-sem",
        "shm-spin",
    ] {
        every_size(m);
    }
}

#[test]
fn rust_channels_between_threads() {
    for m in ["mpsc", "crossbeam"] {
        for size in SIZES {
            check(m, "threads", size);
        }
        let out = socklab(&[m, "-n", "5"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains("between threads only"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_longer_stream_with_backpressure_and_credits() {
    // Enough messages to fill every buffer several times (64 KiB pipe, 10-message queues,
    // UDP's credit window).
    for m in [
        "pipe",
        "posix-mq",
        "sysv-mq",
        "udp",
        "shm-futex",
        "unix-dgram",
    ] {
        let out = socklab(&[
            m, "--mode", "stream", "--size", "1k", "-n", "3000", "--warmup", "10", "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{m}: {}", stderr(&out));
        assert_eq!(json(&out)["verified"], 2 * 3010, "{m}");
    }
}

/// A fault injected on the sending side fails the run with the message number.
#[track_caller]
fn fault(mechanism: &str, between: &str, mode: &str, fault: &str, expect: &str) {
    let out = socklab(&[
        mechanism,
        "--between",
        between,
        "--mode",
        mode,
        "-n",
        "50",
        "--warmup",
        "0",
        "--fault",
        fault,
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{mechanism} {fault}: {err}");
    assert!(
        err.contains(expect),
        "{mechanism} {between} {mode} {fault}: {err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn verifier_catches_injected_faults_end_to_end() {
    fault(
        "pipe",
        "processes",
        "rtt",
        "corrupt@5",
        "message #5: checksum mismatch",
    );
    fault(
        "shm-futex",
        "processes",
        "stream",
        "corrupt@7",
        "message #7: checksum mismatch",
    );
    fault(
        "socketpair-dgram",
        "threads",
        "rtt",
        "drop@4",
        "expected message #4, got #5",
    );
    fault(
        "posix-mq",
        "processes",
        "stream",
        "duplicate@9",
        "expected message #9, got #8 again",
    );
    fault(
        "tcp",
        "threads",
        "stream",
        "reorder@3",
        "expected message #3, got #4",
    );
    fault(
        "shm-spin",
        "processes",
        "rtt",
        "corrupt@2",
        "message #2: checksum mismatch",
    );
    fault(
        "crossbeam",
        "threads",
        "stream",
        "drop@6",
        "expected message #6, got #7",
    );
}

#[test]
fn limits_are_one_line_errors_naming_the_setting() {
    let mq = (proc_value("/proc/sys/fs/mqueue/msgsize_max") + 1).to_string();
    let msgmax = (proc_value("/proc/sys/kernel/msgmax") + 1).to_string();
    let dgram = (2 * proc_value("/proc/sys/net/core/wmem_max")).to_string();
    for (args, needle) in [
        (vec!["posix-mq", "--size", &mq], "fs.mqueue.msgsize_max"),
        (vec!["sysv-mq", "--size", &msgmax], "kernel.msgmax"),
        (vec!["udp", "--size", "65492"], "65507"),
        (vec!["unix-dgram", "--size", &dgram], "net.core.wmem_max"),
        (
            vec!["socketpair-seqpacket", "--size", &dgram],
            "net.core.wmem_max",
        ),
    ] {
        let out = socklab(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // The largest UDP payload still goes through.
    let out = socklab(&["udp", "--size", "65491", "-n", "3", "--warmup", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

fn mqueue_dir() -> Option<PathBuf> {
    let dir = PathBuf::from("/dev/mqueue");
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/dev/mqueue"));
    if !mounted {
        let _ = std::fs::create_dir_all(&dir);
        let ok = Command::new("mount")
            .args(["-t", "mqueue", "none", "/dev/mqueue"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
    }
    Some(dir)
}

/// What a socklab process with this pid left behind: POSIX queues, SysV queues (keys
/// 0x51PPPPnn), private directories.
fn leftovers(pid: u32, tmp: &Tmp) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(dir) = mqueue_dir() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("socklab-{pid}-")) {
                left.push(format!("/dev/mqueue/{name}"));
            }
        }
    } else {
        left.push("(cannot mount /dev/mqueue to look)".into());
    }
    let prefix = 0x5100_0000u32 | ((pid & 0xffff) << 8);
    let sysv = std::fs::read_to_string("/proc/sysvipc/msg").unwrap_or_default();
    for line in sysv.lines().skip(1) {
        if let Some(key) = line
            .split_whitespace()
            .next()
            .and_then(|k| k.parse::<i64>().ok())
        {
            if (key as u32) & 0xffff_ff00 == prefix {
                left.push(format!("SysV queue key {key:#x}"));
            }
        }
    }
    left.extend(tmp.entries());
    left
}

/// Run socklab to completion and return its pid with its output.
fn run_tracked(tmp: &Tmp, args: &[&str]) -> (u32, Output) {
    let child = Command::new(BIN)
        .arg("ipc")
        .args(args)
        .env("TMPDIR", &tmp.0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

#[test]
fn cleanup_after_success_and_after_failure() {
    for m in ["fifo", "unix", "unix-dgram", "posix-mq", "sysv-mq"] {
        let tmp = Tmp::new(m);
        let (pid, out) = run_tracked(&tmp, &[m, "-n", "20", "--warmup", "2"]);
        assert!(out.status.success(), "{m}: {}", stderr(&out));
        assert_eq!(
            leftovers(pid, &tmp),
            Vec::<String>::new(),
            "{m} after success"
        );
        let (pid, out) = run_tracked(&tmp, &[m, "-n", "20", "--fault", "corrupt@3"]);
        assert_eq!(out.status.code(), Some(1), "{m}: {}", stderr(&out));
        assert_eq!(
            leftovers(pid, &tmp),
            Vec::<String>::new(),
            "{m} after failure"
        );
    }
    // A size over the limit is refused before anything is made.
    let tmp = Tmp::new("limit");
    let (pid, out) = run_tracked(&tmp, &["sysv-mq", "--size", "1M"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(leftovers(pid, &tmp), Vec::<String>::new());
}

#[test]
fn cleanup_after_ctrl_c() {
    for m in ["sysv-mq", "posix-mq", "fifo", "shm-spin"] {
        let tmp = Tmp::new(&format!("int-{m}"));
        let mut child = Command::new(BIN)
            .args(["ipc", m, "-d", "60s"])
            .env("TMPDIR", &tmp.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait until the peer process exists: the run is under way.
        assert!(
            eventually(Duration::from_secs(10), || !children_of(pid).is_empty()),
            "{m}: no peer process"
        );
        let peers: Vec<u32> = children_of(pid).into_iter().map(|c| c.0).collect();
        std::thread::sleep(Duration::from_millis(200));
        signal(pid, libc::SIGINT);
        let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("exits after SIGINT");
        assert_eq!(status.code(), Some(130), "{m}");
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(err.contains("interrupted"), "{m}: {err}");
        assert_eq!(
            leftovers(pid, &tmp),
            Vec::<String>::new(),
            "{m} after SIGINT"
        );
        for p in peers {
            assert!(
                eventually(Duration::from_secs(5), || !Path::new(&format!("/proc/{p}"))
                    .exists()
                    || std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .is_ok_and(|s| s.contains(") Z"))),
                "{m}: peer {p} still running"
            );
        }
    }
}

#[test]
fn producer_consumer_counts_are_exact_for_every_implementation() {
    for imp in ["condvar", "semaphore", "channel", "pipe", "mq"] {
        let out = socklab(&[
            "producer-consumer",
            "--impl",
            imp,
            "--producers",
            "4",
            "--consumers",
            "4",
            "-n",
            "20000",
            "--json",
        ]);
        assert_eq!(out.status.code(), Some(0), "{imp}: {}", stderr(&out));
        let r = json(&out);
        assert_eq!(r["items"], 20000, "{imp}");
        assert_eq!(r["producers"], 4);
        assert_eq!(r["consumers"], 4);
        assert_eq!(r["exactly_once"], true, "{imp}");
        assert_eq!(r["in_order"], true, "{imp}");
        assert!(r["items_per_s"].as_f64().unwrap() > 0.0);
        if imp == "condvar" {
            assert!(r["woken_empty"].as_u64().is_some(), "{r}");
            assert!(r["waits"].as_u64().unwrap() >= r["woken_empty"].as_u64().unwrap());
        } else {
            assert!(r["woken_empty"].is_null());
        }
    }
    // Uneven shares, one consumer, a buffer of one.
    let out = socklab(&[
        "producer-consumer",
        "--impl",
        "semaphore",
        "-P",
        "3",
        "-C",
        "1",
        "--capacity",
        "1",
        "-n",
        "1001",
        "--json",
    ]);
    assert_eq!(json(&out)["items"], 1001);
    // A queue deeper than fs.mqueue.msg_max is a limit error.
    let out = socklab(&["producer-consumer", "--impl", "mq", "--capacity", "100000"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("fs.mqueue.msg_max"));
}

#[test]
fn json_and_text_reports_name_the_machine_and_the_pinning() {
    let out = socklab(&["pipe", "-n", "50", "--json"]);
    let r = json(&out);
    for key in [
        "mechanism",
        "between",
        "mode",
        "size",
        "header_bytes",
        "messages",
        "warmup",
        "seconds",
        "verified",
        "rtt_us",
        "throughput",
        "cpu_us_per_msg",
        "switches_per_msg",
        "pinning",
        "machine",
        "setup",
    ] {
        assert!(r.get(key).is_some(), "missing {key}: {r}");
    }
    for key in ["p50", "p90", "p99", "p99_9", "max", "mean"] {
        assert!(r["rtt_us"][key].as_f64().is_some(), "rtt_us.{key}");
    }
    for key in ["measurer", "peer", "total"] {
        assert!(
            r["cpu_us_per_msg"][key].as_f64().is_some(),
            "cpu_us_per_msg.{key}"
        );
    }
    assert!(r["switches_per_msg"]["voluntary"].as_f64().is_some());
    assert!(!r["machine"]["kernel"].as_str().unwrap().is_empty());
    assert!(!r["machine"]["cpu_model"].as_str().unwrap().is_empty());
    let cpus = r["machine"]["cpus"].as_u64().unwrap();
    if cpus >= 2 {
        assert_eq!(r["pinning"]["mode"], "cross");
        assert_ne!(r["pinning"]["measurer_cpu"], r["pinning"]["peer_cpu"]);
    }
    let out = socklab(&[
        "shm-futex",
        "--mode",
        "stream",
        "--pin",
        "same",
        "-n",
        "100",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("(same)"), "{text}");
    assert!(text.contains("machine: "), "{text}");
    assert!(text.contains("throughput: "), "{text}");
    assert!(text.contains("verified (sequence + CRC-32)"), "{text}");
    let out = socklab(&["pipe", "--pin", "none", "-n", "10", "--json"]);
    assert_eq!(json(&out)["pinning"]["mode"], "none");
}

#[test]
fn usage_errors_exit_2() {
    let out = socklab(&[]);
    assert_eq!(out.status.code(), Some(2));
    let out = socklab(&["carrier-pigeon"]);
    assert_eq!(out.status.code(), Some(2));
    let out = socklab(&["pipe", "--compare"]);
    assert_eq!(out.status.code(), Some(2));
    // Payloads past 256 MiB are refused before anything is allocated.
    for args in [
        &["pipe", "--size", "300M", "-n", "1"][..],
        &["--compare", "--sizes", "64,512M", "--quick"][..],
    ] {
        let out = socklab(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains("256 MiB"), "{}", stderr(&out));
        assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    }
    // One CPU allowed: cross-CPU pinning cannot be honoured.
    let out = Command::new("taskset")
        .args(["-c", "0", BIN, "ipc", "pipe", "--pin", "cross", "-n", "5"])
        .output();
    if let Ok(out) = out {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("--pin cross needs two CPUs"));
    }
}

#[test]
fn compare_quick_writes_a_table_json_and_a_valid_svg() {
    let tmp = Tmp::new("compare");
    let chart = tmp.0.join("ipc.svg");
    let chart_arg = chart.to_str().unwrap();
    let out = socklab_in(
        &tmp.0,
        &["--compare", "--quick", "--chart", chart_arg, "--json"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let c = json(&out);
    let cells = c["cells"].as_array().unwrap();
    assert_eq!(cells.len(), MECHANISMS.len() * 4);
    for cell in cells {
        let (m, size) = (
            cell["mechanism"].as_str().unwrap(),
            cell["size"].as_u64().unwrap() as usize,
        );
        let want = if over_limit(m, size) { "limit" } else { "ok" };
        assert_eq!(cell["status"], want, "{m} {size}: {cell}");
        if want == "ok" {
            assert!(cell["rtt_p50_us"].as_f64().unwrap() > 0.0);
            assert!(cell["mb_per_s"].as_f64().unwrap() > 0.0);
        }
    }
    assert!(c["machine"]["kernel"].is_string());
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.contains("<svg"));
    // Well-formed XML, a line per mechanism in each panel, every mechanism in the legend.
    let mut args = vec![chart_arg];
    args.extend(MECHANISMS);
    python_ok(
        "import sys, xml.etree.ElementTree as E\nroot = E.parse(sys.argv[1]).getroot()\nassert root.tag.endswith('svg'), root.tag\nlines = [e for e in root.iter() if e.tag.endswith('polyline') or e.tag.endswith('path')]\nassert len(lines) >= 2 * 17, len(lines)\ntexts = {(e.text or '').strip() for e in root.iter() if e.tag.endswith('text')}\nmissing = [m for m in sys.argv[2:] if m not in texts]\nassert not missing, missing\nprint('ok')",
        &args,
    );
    // The text form: one row per cell, limits as n/a (limit).
    let out = socklab_in(
        &tmp.0,
        &[
            "--compare",
            "--quick",
            "--mechanisms",
            "pipe,posix-mq",
            "--sizes",
            "64,64k",
            "--chart",
            chart_arg,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("posix-mq") && l.contains("n/a (limit)")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pipe") && l.contains("µs")),
        "{text}"
    );
    assert!(text.contains("fs.mqueue.msgsize_max"), "{text}");
}

#[test]
fn a_peer_killed_mid_run_fails_the_run_and_leaves_nothing() {
    // Mechanisms where the peer's death makes no EOF: only the watchdog notices.
    for m in ["sysv-mq", "shm-futex", "shm-spin"] {
        let tmp = Tmp::new(&format!("kill-{m}"));
        let mut child = Command::new(BIN)
            .args(["ipc", m, "-d", "60s"])
            .env("TMPDIR", &tmp.0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(
            eventually(Duration::from_secs(10), || !children_of(pid).is_empty()),
            "{m}: no peer process"
        );
        std::thread::sleep(Duration::from_millis(200));
        for (peer, _) in children_of(pid) {
            signal(peer, libc::SIGKILL);
        }
        let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("notices the death");
        assert_eq!(status.code(), Some(1), "{m}");
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            err.contains("the peer process ended unexpectedly"),
            "{m}: {err}"
        );
        assert!(err.contains("SIGKILL"), "{m}: {err}");
        assert_eq!(leftovers(pid, &tmp), Vec::<String>::new(), "{m}");
    }
}
