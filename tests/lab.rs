//! `socklab lab`: every experiment is a test that the kernel still behaves as the course says.
//!
//! Each test runs the built binary (`socklab lab NAME --json`) in its own process, so the
//! experiments' signals, forks and sockets never mix with other tests' threads, and asserts
//! both the verdict and the observation in the timeline.

use serde_json::Value;
use std::process::{Command, Output};

/// The experiment names, exactly as the issue lists them (they are part of the interface).
const NAMES: [&str; 32] = [
    "connect-before-listen",
    "connect-before-accept",
    "backlog",
    "send-before-accept",
    "big-send-before-accept",
    "big-send-peer-dies",
    "nonblocking-send",
    "stream-merges-messages",
    "partial-recv",
    "recv-full",
    "multiple-send",
    "pointer-send",
    "length-prefix",
    "dgram-boundaries",
    "dgram-truncation",
    "dgram-max-size",
    "time-wait",
    "half-close",
    "close-with-unread-data",
    "fork-shared-socket",
    "five-tuple",
    "socketpair-vs-pipe",
    "signal-interrupts-recv",
    "shared-memory-signal",
    "tcp-states",
    "pipe-capacity",
    "pipe-atomic-writes",
    "pipe-no-reader",
    "fifo-open-blocks",
    "pipe-fd-refcount",
    "pipe-length-prefix",
    "signal-handler",
];

fn socklab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_socklab"))
        .args(args)
        .output()
        .expect("run socklab")
}

/// One experiment's report; panics with the whole report unless it matched the course.
struct Run {
    report: Value,
}

impl Run {
    #[track_caller]
    fn of(name: &str) -> Run {
        let out = socklab(&["lab", name, "--json"]);
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{name}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(
            report["status"], "matches",
            "{name} did not match the course:\n{report:#}"
        );
        assert_eq!(out.status.code(), Some(0), "{name}: exit code");
        assert_eq!(report["name"], name);
        Run { report }
    }

    fn events(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.report["timeline"].as_array().unwrap().iter().map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["call"].as_str().unwrap(),
                e["result"].as_str().unwrap(),
            )
        })
    }

    /// The result of the first event whose actor is `actor` and whose call starts with `call`.
    #[track_caller]
    fn result(&self, actor: &str, call: &str) -> String {
        self.results(actor, call)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no `{actor}: {call}` in\n{:#}", self.report))
    }

    fn results(&self, actor: &str, call: &str) -> Vec<String> {
        self.events()
            .filter(|(a, c, _)| *a == actor && c.starts_with(call))
            .map(|(_, _, r)| r.to_owned())
            .collect()
    }

    fn conclusion(&self) -> &str {
        self.report["conclusion"].as_str().unwrap()
    }
}

#[test]
fn connect_before_listen() {
    let run = Run::of("connect-before-listen");
    assert_eq!(run.result("client", "connect("), "ECONNREFUSED");
}

#[test]
fn connect_before_accept() {
    let run = Run::of("connect-before-accept");
    assert!(run.result("client", "connect(").starts_with("ok"));
    let states = run.results("kernel", "sock_diag: ");
    assert!(states.contains(&"ESTABLISHED recv-q=0 send-q=0".to_owned()));
    assert!(states.contains(&"LISTEN accept-queue=1 backlog=2".to_owned()));
}

#[test]
fn backlog() {
    let run = Run::of("backlog");
    for p in ["P1", "P2", "P3"] {
        assert!(run.result(p, "connect(").starts_with("ok"));
    }
    assert_eq!(
        run.result("kernel", "sock_diag: listener"),
        "LISTEN accept-queue=3 backlog=2"
    );
    assert!(run
        .result("kernel", "sock_diag: client")
        .starts_with("SYN_SENT"));
    assert_eq!(run.result("lab", "P4 still inside connect()?"), "yes");
    assert!(run
        .results("P4", "connect(")
        .iter()
        .any(|r| r.starts_with("ok")));
    assert_eq!(run.results("server", "accept(s)").len(), 4);
}

#[test]
fn send_before_accept() {
    let run = Run::of("send-before-accept");
    for p in ["P1", "P2", "P3"] {
        assert_eq!(run.result(p, "send("), "= 1024");
    }
    // Each connection sits unaccepted with its data (and the FIN) queued in the kernel.
    let queued = run.results("kernel", "sock_diag: server side of");
    assert_eq!(queued.len(), 3);
    assert!(
        queued.iter().all(|s| s.contains("recv-q=1025")),
        "{queued:?}"
    );
    assert!(run
        .results("server", "recv(")
        .iter()
        .all(|r| r.starts_with("1024 bytes")));
}

#[test]
fn big_send_before_accept() {
    let run = Run::of("big-send-before-accept");
    assert_eq!(run.result("lab", "P1 still inside send()"), "yes");
    assert_eq!(run.result("P2", "send("), "= 1024");
    assert_eq!(run.result("P1", "send(s, buf, 50000000)"), "blocks");
    assert_eq!(run.results("P1", "send(s, buf, 50000000)")[1], "= 50000000");
}

#[test]
fn big_send_peer_dies() {
    let run = Run::of("big-send-peer-dies");
    let first: usize = run.result("sender", "write(s, buf, 50000000)")[2..]
        .parse()
        .unwrap();
    assert!(first > 0 && first < 50_000_000, "{first}");
    let next = run.results("sender", "write(s, buf, 1024)");
    assert!(
        next.iter().all(|r| r == "EPIPE" || r == "ECONNRESET"),
        "{next:?}"
    );
    assert!(run.result("sender", "waitpid(child)").contains("SIGPIPE"));
}

#[test]
fn nonblocking_send() {
    let run = Run::of("nonblocking-send");
    let sends = run.results("sender", "send(");
    let first: usize = sends[0][2..].parse().unwrap();
    assert!(first < 50_000_000);
    assert_eq!(sends[1], "EAGAIN");
    assert!(run.result("sender", "poll(POLLOUT)").contains("writable"));
    assert!(run
        .result("receiver", "recv(")
        .starts_with("50000000 bytes in"));
}

#[test]
fn stream_merges_messages() {
    let run = Run::of("stream-merges-messages");
    assert_eq!(
        run.result("receiver", "recv(s, buf, 100)"),
        "= 9 \"holamundo\""
    );
}

#[test]
fn partial_recv() {
    let run = Run::of("partial-recv");
    let summary = run.result("receiver", "... recv until");
    let count: usize = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(count > 1, "{summary}");
    assert!(summary.contains("50000000 bytes"));
}

#[test]
fn recv_full() {
    let run = Run::of("recv-full");
    for way in ["readn", "MSG_WAITALL", "BufReader"] {
        assert!(run.result("receiver", way).ends_with("bytes identical"));
    }
    assert_eq!(
        run.result("receiver", "MSG_WAITALL"),
        "1 read syscalls, bytes identical"
    );
}

#[test]
fn multiple_send() {
    let run = Run::of("multiple-send");
    for way in ["2 sends, MSG_MORE", "copy into struct", "writev"] {
        assert_eq!(
            run.result("kernel", &format!("sock_diag tcp_info: {way}")),
            "1 data segments"
        );
    }
    assert_eq!(
        run.results("receiver", "read 9 bytes"),
        vec!["\"holamundo\""; 3]
    );
}

#[test]
fn pointer_send() {
    let run = Run::of("pointer-send");
    let got = run.result("receiver", "recv until EOF");
    assert!(got.starts_with("16 bytes: "));
    assert!(
        !got.contains("68 6f 6c 61"),
        "the text \"hola\" must not be on the wire"
    );
}

#[test]
fn length_prefix() {
    let run = Run::of("length-prefix");
    assert!(run
        .result("receiver", "recv(s, &cab, 8")
        .ends_with("00 00 00 04 00 00 00 05"));
    assert_eq!(run.result("receiver", "ntohl("), "4, 5");
    if cfg!(target_endian = "little") {
        assert_eq!(
            run.result("receiver", "cab.long1 without ntohl"),
            "67108864"
        );
    }
}

#[test]
fn dgram_boundaries() {
    let run = Run::of("dgram-boundaries");
    let r = run.results("receiver", "recvfrom(s, buf, 100)");
    assert!(
        r[0].starts_with("= 50") && r[1].starts_with("= 50"),
        "{r:?}"
    );
    assert_eq!(r[2], "EAGAIN");
}

#[test]
fn dgram_truncation() {
    let run = Run::of("dgram-truncation");
    assert!(run
        .result("receiver", "recv(s, buf, 60, MSG_TRUNC)")
        .starts_with("= 100"));
    assert_eq!(
        run.result("receiver", "recv(s, buf, 60, MSG_DONTWAIT)"),
        "EAGAIN"
    );
}

#[test]
fn dgram_max_size() {
    let run = Run::of("dgram-max-size");
    assert_eq!(run.result("sender", "sendto(s, buf, 65507)"), "= 65507");
    assert_eq!(run.result("sender", "sendto(s, buf, 65508)"), "EMSGSIZE");
}

#[test]
fn time_wait() {
    let run = Run::of("time-wait");
    assert!(run
        .result("kernel", "sock_diag: server A")
        .starts_with("TIME_WAIT"));
    assert_eq!(run.result("new server", "bind("), "EADDRINUSE");
    assert_eq!(
        run.results("new server", "SO_REUSEADDR; bind(")
            .last()
            .unwrap(),
        "ok"
    );
}

#[test]
fn half_close() {
    let run = Run::of("half-close");
    assert!(run
        .result("kernel", "sock_diag: client")
        .starts_with("FIN_WAIT2"));
    assert!(run
        .result("kernel", "sock_diag: server")
        .starts_with("CLOSE_WAIT"));
    assert_eq!(
        run.result("client", "recv(s) until"),
        "4 bytes \"aloh\", then 0 (EOF)"
    );
}

#[test]
fn close_with_unread_data() {
    let run = Run::of("close-with-unread-data");
    assert_eq!(run.result("client", "recv("), "ECONNRESET");
}

#[test]
fn fork_shared_socket() {
    let run = Run::of("fork-shared-socket");
    assert_eq!(run.result("client", "recv(s) [300 ms timeout]"), "EAGAIN");
    assert!(run
        .result("kernel", "sock_diag: server side")
        .starts_with("ESTABLISHED"));
    assert_eq!(run.results("client", "recv(s)").last().unwrap(), "= 0");
}

#[test]
fn five_tuple() {
    let run = Run::of("five-tuple");
    let a = run.result("client A", "getsockname()");
    let b = run.result("client B", "getsockname()");
    assert_ne!(a, b);
    assert_eq!(
        run.result("client A", "getpeername()"),
        run.result("client B", "getpeername()")
    );
}

#[test]
fn socketpair_vs_pipe() {
    let run = Run::of("socketpair-vs-pipe");
    assert_eq!(run.result("P", "read(sv[0])"), "= 4 \"pong\"");
    assert_eq!(run.result("P", "write(fd[0]"), "EBADF");
    assert_eq!(run.result("P", "read(fd[1])"), "EBADF");
}

#[test]
fn signal_interrupts_recv() {
    let run = Run::of("signal-interrupts-recv");
    let r = run.results("child", "recv(s, buf, 64)");
    let r: Vec<&String> = r.iter().filter(|r| *r != "blocks").collect();
    assert!(r[0].starts_with("EINTR"), "{r:?}");
    assert!(r[1].starts_with("= 5"), "{r:?}");
}

#[test]
fn shared_memory_signal() {
    let run = Run::of("shared-memory-signal");
    assert!(run
        .result("parent", "read the shared page")
        .starts_with("\"child of "));
    assert!(run.conclusion().contains("woke on SIGUSR1"));
}

#[test]
fn tcp_states() {
    let run = Run::of("tcp-states");
    let walk: Vec<String> = run
        .results("kernel", "sock_diag: ")
        .iter()
        .map(|s| s.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        walk,
        [
            "LISTEN",
            "ESTABLISHED",
            "SYN_RECV",
            "ESTABLISHED",
            "FIN_WAIT2",
            "CLOSE_WAIT",
            "LAST_ACK",
            "TIME_WAIT",
            "(no"
        ]
    );
}

#[test]
fn pipe_capacity() {
    let run = Run::of("pipe-capacity");
    assert_eq!(run.result("P", "fcntl(fd[1], F_GETPIPE_SZ)"), "= 65536");
    assert!(run
        .result("P", "write(fd[1], buf, 4096) until EAGAIN")
        .starts_with("65536 bytes in 16 writes"));
    assert_eq!(run.result("P", "fcntl(fd[1], F_SETPIPE_SZ, 4096)"), "EBUSY");
    assert_eq!(run.result("lab", "writer still inside write()"), "yes");
    assert_eq!(
        run.results("writer", "write(fd[1], buf, 4096)")[1],
        "= 4096"
    );
}

#[test]
fn pipe_atomic_writes() {
    let run = Run::of("pipe-atomic-writes");
    assert!(run
        .result("reader", "read everything (4096-byte writes)")
        .ends_with("every 4096-byte write arrived whole"));
    assert!(run
        .conclusion()
        .starts_with("4096-byte writes: none interleaved"));
}

#[test]
fn pipe_no_reader() {
    let run = Run::of("pipe-no-reader");
    assert_eq!(run.result("P", "write(fd[1]"), "EPIPE");
    assert!(run.result("P", "waitpid(child)").contains("SIGPIPE"));
}

#[test]
fn fifo_open_blocks() {
    let run = Run::of("fifo-open-blocks");
    assert_eq!(run.result("lab", "reader still inside open()"), "yes");
    assert_eq!(
        run.result("P", "open(\"fifo\", O_WRONLY|O_NONBLOCK), no reader"),
        "ENXIO"
    );
    assert!(run
        .result("P", "open(\"fifo\", O_RDONLY|O_NONBLOCK)")
        .starts_with("ok"));
}

#[test]
fn pipe_fd_refcount() {
    let run = Run::of("pipe-fd-refcount");
    assert!(run.result("P", "poll(fd[0]").starts_with("= 0 (timeout"));
    assert_eq!(run.result("P", "read(fd[0]"), "= 0");
}

#[test]
fn pipe_length_prefix() {
    let run = Run::of("pipe-length-prefix");
    assert!(run
        .result("receiver", "recv(p[0], msg, sizeof(msg) - 1)")
        .starts_with("= 20: "));
    assert_eq!(
        run.result("receiver", "recv(p[0], &nLen, 2)  [the second"),
        "EAGAIN"
    );
    let fixed = run.results("receiver", "recv(p[0], &nLen, 2); recv(p[0], msg, len");
    assert_eq!(fixed, ["= 12 \"Wello, world\"", "= 6 \"second\""]);
}

#[test]
fn signal_handler() {
    let run = Run::of("signal-handler");
    let cut: Vec<String> = run
        .results("child", "printf(\"Counting")
        .into_iter()
        .filter(|r| r.contains("cut short"))
        .collect();
    assert_eq!(cut.len(), 1, "one sleep is cut short by the alarm");
    assert!(run
        .result("child", "read(in, buffer, 1023) [SA_RESTART]")
        .starts_with("blocks"));
    assert!(run.results("child", "read(in, buffer, 1023) [SA_RESTART]")[1].starts_with("= 13"));
    assert!(run.results("child", "read(in, buffer, 1023) [no SA_RESTART]")[1].starts_with("EINTR"));
}

#[test]
fn all_runs_every_experiment_and_exits_0() {
    let out = socklab(&["lab", "all", "--json"]);
    let reports: Value = serde_json::from_slice(&out.stdout).expect("JSON array");
    let reports = reports.as_array().unwrap();
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, NAMES);
    let failed: Vec<&Value> = reports
        .iter()
        .filter(|r| r["status"] != "matches")
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(out.status.code(), Some(0));
    // Piped, so no progress line on stderr.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn all_prints_a_summary_table() {
    // The text form of `all` is long to run twice; check the summary on the library side.
    let reports: Vec<socklab::lab::Report> = ["connect-before-listen", "socketpair-vs-pipe"]
        .iter()
        .map(|n| socklab::lab::run_experiment(socklab::lab::find(n).unwrap()))
        .collect();
    let table = socklab::lab::summary(&reports);
    assert!(table.starts_with("experiment"));
    assert!(table.contains("connect-before-listen   ok"));
    assert!(table.ends_with("2 experiments: 2 match the course, 0 differ, 0 could not run\n"));
    assert_eq!(socklab::lab::overall(&reports), 0);
}

#[test]
fn list_names_every_experiment_with_its_question() {
    let out = socklab(&["lab", "--list"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(names, NAMES);
    assert!(text.lines().all(|l| l.split_whitespace().count() > 3));
    let json: Value =
        serde_json::from_slice(&socklab(&["lab", "--list", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), NAMES.len());
}

#[test]
fn unknown_experiment_is_one_line_and_exit_2() {
    let out = socklab(&["lab", "no-such-thing"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown experiment `no-such-thing`"));
    assert!(out.stdout.is_empty());
}

#[test]
fn text_output_has_timeline_and_conclusion() {
    let out = socklab(&["lab", "connect-before-listen"]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("== connect-before-listen ==\nquestion: "));
    assert!(text.contains(" ms  client  connect(127.0.0.1:"));
    assert!(text
        .trim_end()
        .lines()
        .last()
        .unwrap()
        .starts_with("matches the course: "));
}
