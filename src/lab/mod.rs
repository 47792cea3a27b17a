//! `socklab lab`: the course's socket experiments, run against the live kernel.
//!
//! Run one with `socklab lab backlog`, list them with `socklab lab --list`, run them all with
//! `socklab lab all` (add `--json` for machines).
//!
//! Each experiment sets up its own scenario on loopback (ports from port 0), records a
//! [`Timeline`] of calls, results and TCP states (read through `NETLINK_SOCK_DIAG`, see
//! [`diag`]), and ends with an [`Outcome`]: what it observed, and whether that is what the
//! course says. Adding an experiment is adding a function in a file of this module and one line
//! in [`EXPERIMENTS`].

use clap::Args;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::Instant;

// `unsafe` lives in `sys`; the modules that fork (`send`, `process`, `pipes`, `signal`) call `sys::fork_child`
// with a SAFETY note; every other module is denied `unsafe` outright.
#[deny(unsafe_code)]
pub mod diag;
#[deny(unsafe_code)]
pub mod scene;
pub mod sys;
#[deny(unsafe_code)]
pub mod timeline;

#[deny(unsafe_code)]
mod close;
#[deny(unsafe_code)]
mod connect;
#[deny(unsafe_code)]
mod dgram;
#[deny(unsafe_code)]
mod ipc;
mod pipes;
mod process;
mod send;
mod signal;
#[deny(unsafe_code)]
mod stream;
#[deny(unsafe_code)]
mod write;

pub use timeline::{render, Event, Timeline};

/// Arguments of `socklab lab`.
#[derive(Debug, Args)]
pub struct LabArgs {
    /// The experiment to run (see `--list`), or `all`.
    #[arg(required_unless_present = "list")]
    pub name: Option<String>,
    /// List the experiments, each with the question it answers.
    #[arg(long)]
    pub list: bool,
    /// Print the result as JSON (one object, or an array for `all`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What an experiment observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the kernel behaved as the course says.
    pub matches: bool,
    /// One line: what was observed (and, if it differs, how).
    pub conclusion: String,
}

impl Outcome {
    /// The observation `conclusion`, matching the course if `matches`.
    pub fn new(matches: bool, conclusion: impl Into<String>) -> Self {
        Self {
            matches,
            conclusion: conclusion.into(),
        }
    }
}

/// The function that runs one experiment: it records into the timeline and returns what it
/// observed, or an error if it could not run.
pub type RunFn = fn(&Timeline) -> anyhow::Result<Outcome>;

/// One experiment of the lab.
#[derive(Debug, Clone, Copy)]
pub struct Experiment {
    /// The name on the command line (part of the interface: do not rename).
    pub name: &'static str,
    /// The question it answers, in one line.
    pub question: &'static str,
    /// Runs it.
    pub run: RunFn,
}

/// Every experiment, in the order of the course. One line each: name, question, function.
#[rustfmt::skip]
pub const EXPERIMENTS: &[Experiment] = &[
    ex("connect-before-listen", "connect to a bound but not listening socket → ECONNREFUSED", connect::connect_before_listen),
    ex("connect-before-accept", "a client's connect completes before the server calls accept", connect::connect_before_accept),
    ex("backlog", "with listen(s, 2) and no accept, how many connects complete, and which one waits", connect::backlog),
    ex("send-before-accept", "small sends complete before accept; the data waits in the kernel", send::send_before_accept),
    ex("big-send-before-accept", "a 50 MB send blocks until the receiver reads, while a second client completes", send::big_send_before_accept),
    ex("big-send-peer-dies", "receiver exits mid 50 MB send: short count, then EPIPE/ECONNRESET; SIGPIPE ignored or fatal", send::big_send_peer_dies),
    ex("nonblocking-send", "O_NONBLOCK send of 50 MB copies part, then EAGAIN; resumes on POLLOUT", send::nonblocking_send),
    ex("stream-merges-messages", "two sends arrive in one recv: message boundaries are not kept", stream::stream_merges_messages),
    ex("partial-recv", "a 50 MB transfer needs many recvs: how many, and of what sizes", stream::partial_recv),
    ex("recv-full", "three ways to read exactly N bytes (readn, MSG_WAITALL, buffered reader): bytes and syscalls", stream::recv_full),
    ex("multiple-send", "two writes vs MSG_MORE vs one copied buffer vs writev: syscalls and TCP segments", write::multiple_send),
    ex("pointer-send", "sending a struct of pointers sends addresses, not the data", write::pointer_send),
    ex("length-prefix", "a network-order length header: the bytes on the wire, and forgetting ntohl", write::length_prefix),
    ex("dgram-boundaries", "two 50-byte datagrams are two receives, never one of 100", dgram::dgram_boundaries),
    ex("dgram-truncation", "a datagram larger than the buffer is cut (MSG_TRUNC shows its size); the rest is lost", dgram::dgram_truncation),
    ex("dgram-max-size", "the largest datagram that can be sent (EMSGSIZE beyond)", dgram::dgram_max_size),
    ex("time-wait", "the active closer sits in TIME_WAIT; rebinding needs SO_REUSEADDR", close::time_wait),
    ex("half-close", "shutdown(SHUT_WR): the peer reads EOF and can still send its answer", close::half_close),
    ex("close-with-unread-data", "closing with unread input sends RST: the peer's next call fails ECONNRESET", close::close_with_unread_data),
    ex("fork-shared-socket", "after fork, the peer sees EOF only when every process holding the socket closed it", process::fork_shared_socket),
    ex("five-tuple", "two clients to one server port: distinct ephemeral ports, from the ephemeral range", connect::five_tuple),
    ex("socketpair-vs-pipe", "a socketpair is duplex, a pipe is one-way (the wrong end fails EBADF)", ipc::socketpair_vs_pipe),
    ex("signal-interrupts-recv", "alarm interrupts a blocking recv: EINTR without SA_RESTART, restarted with it", process::signal_interrupts_recv),
    ex("shared-memory-signal", "parent writes into a MAP_SHARED page and wakes the child with SIGUSR1", process::shared_memory_signal),
    ex("tcp-states", "one connection through LISTEN, SYN_RECV, ESTABLISHED, FIN_WAIT2/CLOSE_WAIT, LAST_ACK, TIME_WAIT", close::tcp_states),
    ex("pipe-capacity", "a pipe holds 64 KiB (F_GETPIPE_SZ/F_SETPIPE_SZ); a writer to a full pipe blocks", pipes::pipe_capacity),
    ex("pipe-atomic-writes", "writes up to PIPE_BUF from several writers never interleave; larger ones can", pipes::pipe_atomic_writes),
    ex("pipe-no-reader", "writing to a pipe nobody reads: SIGPIPE kills by default; ignored, the write fails EPIPE", pipes::pipe_no_reader),
    ex("fifo-open-blocks", "opening a FIFO blocks until the other side opens; O_NONBLOCK for writing fails ENXIO", pipes::fifo_open_blocks),
    ex("pipe-fd-refcount", "after fork the reader sees no EOF while any process still holds the write end", pipes::pipe_fd_refcount),
    ex("pipe-length-prefix", "the course's 16-bit length + message over a pipe, and reading more than the length", pipes::pipe_length_prefix),
    ex("signal-handler", "the course's alarm + SIGINT program: which calls a signal interrupts, with and without SA_RESTART", signal::signal_handler),
];

const fn ex(name: &'static str, question: &'static str, run: RunFn) -> Experiment {
    Experiment {
        name,
        question,
        run,
    }
}

/// Find an experiment by name.
pub fn find(name: &str) -> Option<&'static Experiment> {
    EXPERIMENTS.iter().find(|e| e.name == name)
}

/// How an experiment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The kernel behaved as the course says (exit 0).
    Matches,
    /// The kernel behaved otherwise (exit 1).
    Differs,
    /// The experiment could not run (exit 2).
    Error,
}

impl Status {
    /// The process exit code for this status.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Matches => 0,
            Self::Differs => 1,
            Self::Error => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Matches => "matches the course",
            Self::Differs => "DIFFERS from the course",
            Self::Error => "COULD NOT RUN",
        }
    }
}

/// The full record of one run of one experiment.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The experiment's name.
    pub name: String,
    /// The question it answers.
    pub question: String,
    /// How it ended.
    pub status: Status,
    /// The one-line conclusion (or why it could not run).
    pub conclusion: String,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// What happened, in time order.
    pub timeline: Vec<Event>,
}

impl Report {
    /// The report as the text the lab prints: title, timeline, conclusion.
    pub fn to_text(&self) -> String {
        format!(
            "== {} ==\nquestion: {}\n\n{}\n{}: {}\n",
            self.name,
            self.question,
            render(&self.timeline),
            self.status.label(),
            self.conclusion
        )
    }
}

/// Run one experiment and collect its report. A panic inside it counts as "could not run".
pub fn run_experiment(exp: &Experiment) -> Report {
    let tl = Timeline::new();
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (exp.run)(&tl)));
    let (status, conclusion) = match result {
        Ok(Ok(o)) if o.matches => (Status::Matches, o.conclusion),
        Ok(Ok(o)) => (Status::Differs, o.conclusion),
        Ok(Err(e)) => (Status::Error, format!("{e:#}")),
        Err(_) => (Status::Error, "the experiment panicked".to_owned()),
    };
    Report {
        name: exp.name.to_owned(),
        question: exp.question.to_owned(),
        status,
        conclusion,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        timeline: tl.events(),
    }
}

/// The exit code for a set of reports: 2 if any could not run, else 1 if any differed, else 0.
pub fn overall(reports: &[Report]) -> u8 {
    reports
        .iter()
        .map(|r| r.status)
        .max_by_key(|s| match s {
            Status::Matches => 0,
            Status::Differs => 1,
            Status::Error => 2,
        })
        .map_or(0, Status::exit_code)
}

/// The summary table of `socklab lab all`.
pub fn summary(reports: &[Report]) -> String {
    let width = EXPERIMENTS.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let mut out = format!(
        "{:<width$}  {:<8}  {:>8}  conclusion\n",
        "experiment", "status", "time"
    );
    for r in reports {
        let status = match r.status {
            Status::Matches => "ok",
            Status::Differs => "DIFFERS",
            Status::Error => "ERROR",
        };
        out.push_str(&format!(
            "{:<width$}  {:<8}  {:>5} ms  {}\n",
            r.name, status, r.duration_ms, r.conclusion
        ));
    }
    let n = |s| reports.iter().filter(|r| r.status == s).count();
    out.push_str(&format!(
        "\n{} experiments: {} match the course, {} differ, {} could not run\n",
        reports.len(),
        n(Status::Matches),
        n(Status::Differs),
        n(Status::Error)
    ));
    out
}

/// Run `socklab lab` and return the process exit code: 0 every experiment matched the course,
/// 1 the kernel behaved otherwise, 2 an experiment could not run or the name is unknown.
pub fn run(args: &LabArgs, _verbose: u8) -> u8 {
    let mut stdout = std::io::stdout().lock();
    if args.list {
        let width = EXPERIMENTS.iter().map(|e| e.name.len()).max().unwrap_or(0);
        if args.json {
            let list: Vec<_> = EXPERIMENTS
                .iter()
                .map(|e| serde_json::json!({"name": e.name, "question": e.question}))
                .collect();
            let _ = writeln!(stdout, "{}", serde_json::Value::Array(list));
        } else {
            for e in EXPERIMENTS {
                let _ = writeln!(stdout, "{:<width$}  {}", e.name, e.question);
            }
        }
        return 0;
    }
    let name = args.name.as_deref().unwrap_or_default();
    if name == "all" {
        let reports = run_all();
        if args.json {
            let _ = writeln!(stdout, "{}", to_json(&reports));
        } else {
            for r in &reports {
                let _ = writeln!(stdout, "{}", r.to_text());
            }
            let _ = write!(stdout, "{}", summary(&reports));
        }
        return overall(&reports);
    }
    let Some(exp) = find(name) else {
        eprintln!("socklab: error: unknown experiment `{name}` (try `socklab lab --list`)");
        return 2;
    };
    let report = run_experiment(exp);
    if args.json {
        let _ = writeln!(stdout, "{}", to_json(&report));
    } else {
        let _ = write!(stdout, "{}", report.to_text());
    }
    report.status.exit_code()
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Run every experiment in order, one at a time, with a progress line on stderr when stderr
/// is a terminal.
pub fn run_all() -> Vec<Report> {
    let tty = std::io::stderr().is_terminal();
    let total = EXPERIMENTS.len();
    let mut reports = Vec::with_capacity(total);
    for (i, exp) in EXPERIMENTS.iter().enumerate() {
        if tty {
            eprint!("\r\x1b[2K[{}/{}] {} ...", i + 1, total, exp.name);
        }
        reports.push(run_experiment(exp));
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    reports
}
