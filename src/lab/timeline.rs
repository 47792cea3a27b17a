//! The timeline of one experiment: who called what, when, and what the kernel answered.
//!
//! Every actor (thread or process) of an experiment records into the same [`Timeline`]; times
//! are measured from the experiment's start with the monotonic clock, so events from several
//! threads sort into one story.

use serde::Serialize;
use std::fmt::Write as _;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Time since the experiment started, in microseconds.
    pub t_us: u64,
    /// Who acted: `server`, `client`, `P1`, `child`, `kernel` (for settings and states)...
    pub actor: String,
    /// The call made, or what was looked at (`state of client`).
    pub call: String,
    /// Its result: a value, `ok`, or an errno name such as `ECONNREFUSED`.
    pub result: String,
}

/// The recorder shared by every actor of one experiment.
#[derive(Debug)]
pub struct Timeline {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// A timeline whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// The instant the clock started (children of `fork` measure from it too).
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Time elapsed since the start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Record an event that happened `at` (since the start); used for what a child process
    /// measured itself and reported afterwards.
    pub fn record_at(&self, at: Duration, actor: &str, call: &str, result: impl Into<String>) {
        let event = Event {
            t_us: u64::try_from(at.as_micros()).unwrap_or(u64::MAX),
            actor: actor.to_owned(),
            call: call.to_owned(),
            result: result.into(),
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events.push(event);
    }

    /// Record an event that happens now.
    pub fn log(&self, actor: &str, call: &str, result: impl Into<String>) {
        self.record_at(self.elapsed(), actor, call, result);
    }

    /// Record a call's outcome: `show` formats a success, an error becomes its errno name.
    pub fn call<T, E: ErrnoName>(
        &self,
        actor: &str,
        call: &str,
        result: &Result<T, E>,
        show: impl FnOnce(&T) -> String,
    ) {
        let text = match result {
            Ok(v) => show(v),
            Err(e) => e.errno_name(),
        };
        self.log(actor, call, text);
    }

    /// Record a call that returns a byte count (`send`, `recv`...): `= N` or the errno name.
    pub fn bytes<E: ErrnoName>(&self, actor: &str, call: &str, result: &Result<usize, E>) {
        self.call(actor, call, result, |n| format!("= {n}"));
    }

    /// Record a call that returns nothing on success: `ok` or the errno name.
    pub fn unit<E: ErrnoName>(&self, actor: &str, call: &str, result: &Result<(), E>) {
        self.call(actor, call, result, |_| "ok".to_owned());
    }

    /// A note from the experiment itself (actor `lab`).
    pub fn note(&self, text: &str) {
        self.log("lab", text, "");
    }

    /// Read a `/proc/sys` setting, record it (actor `kernel`) and return it trimmed.
    pub fn setting(&self, path: &str) -> Option<String> {
        let value = std::fs::read_to_string(path)
            .ok()
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "));
        let short = path.trim_start_matches("/proc/sys/");
        self.log(
            "kernel",
            short,
            value.clone().unwrap_or_else(|| "(unreadable)".into()),
        );
        value
    }

    /// The events recorded so far, in time order.
    pub fn events(&self) -> Vec<Event> {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Stable: events at the same microsecond keep the order they were recorded in.
        events.sort_by_key(|e| e.t_us);
        events
    }
}

/// The width of the `call` column; longer calls push the result further right.
const CALL_WIDTH: usize = 46;

/// Render events as the text table the lab prints: time, actor, call, result.
pub fn render(events: &[Event]) -> String {
    let times: Vec<String> = events
        .iter()
        .map(|e| format!("{:.3} ms", e.t_us as f64 / 1000.0))
        .collect();
    let time_width = times.iter().map(String::len).max().unwrap_or(0).max(9);
    let actor_width = events
        .iter()
        .map(|e| e.actor.len())
        .max()
        .unwrap_or(0)
        .max("actor".len());
    let mut out = String::new();
    let mut line = |time: &str, actor: &str, call: &str, result: &str| {
        let l =
            format!("{time:>time_width$}  {actor:<actor_width$}  {call:<CALL_WIDTH$}  {result}");
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line("time", "actor", "call", "result");
    for (e, t) in events.iter().zip(&times) {
        line(t, &e.actor, &e.call, &e.result);
    }
    out
}

/// How an error shows in the timeline: the errno's symbolic name, as in C.
pub trait ErrnoName {
    /// `ECONNREFUSED`, `EAGAIN`...; or the error's text when it carries no errno.
    fn errno_name(&self) -> String;
}

impl ErrnoName for io::Error {
    fn errno_name(&self) -> String {
        match self.raw_os_error() {
            Some(code) => errno_code_name(code),
            None => format!("error: {self}"),
        }
    }
}

impl ErrnoName for nix::errno::Errno {
    fn errno_name(&self) -> String {
        errno_code_name(*self as i32)
    }
}

/// The symbolic name of an errno value (`111` → `ECONNREFUSED`).
pub fn errno_code_name(code: i32) -> String {
    format!("{:?}", nix::errno::Errno::from_raw(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t_us: u64, actor: &str, call: &str, result: &str) -> Event {
        Event {
            t_us,
            actor: actor.into(),
            call: call.into(),
            result: result.into(),
        }
    }

    #[test]
    fn render_aligns_columns_and_formats_milliseconds() {
        let text = render(&[
            ev(12, "server", "listen(s, 2)", "ok"),
            ev(1_234_567, "P1", "connect()", "ECONNREFUSED"),
        ]);
        let pad = |call: &str| format!("{call:<CALL_WIDTH$}");
        let expected = [
            format!("       time  actor   {}  result", pad("call")),
            format!("   0.012 ms  server  {}  ok", pad("listen(s, 2)")),
            format!("1234.567 ms  P1      {}  ECONNREFUSED", pad("connect()")),
        ]
        .map(|l| l + "\n")
        .concat();
        assert_eq!(text, expected);
    }

    #[test]
    fn render_of_nothing_is_just_the_header() {
        assert_eq!(render(&[]).lines().count(), 1);
    }

    #[test]
    fn empty_results_leave_no_trailing_spaces() {
        let text = render(&[ev(0, "lab", "a note", "")]);
        assert!(text.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn events_are_sorted_by_time_and_stable() {
        let tl = Timeline::new();
        tl.record_at(Duration::from_micros(50), "b", "second", "");
        tl.record_at(Duration::from_micros(10), "a", "first", "");
        tl.record_at(Duration::from_micros(50), "c", "third", "");
        let names: Vec<String> = tl.events().into_iter().map(|e| e.call).collect();
        assert_eq!(names, ["first", "second", "third"]);
    }

    #[test]
    fn errors_show_as_errno_names() {
        let tl = Timeline::new();
        let r: io::Result<usize> = Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        tl.bytes("client", "connect()", &r);
        let r: Result<(), nix::errno::Errno> = Err(nix::errno::Errno::EPIPE);
        tl.unit("client", "send()", &r);
        let r: io::Result<usize> = Ok(5);
        tl.bytes("client", "recv()", &r);
        let results: Vec<String> = tl.events().into_iter().map(|e| e.result).collect();
        assert_eq!(results, ["ECONNREFUSED", "EPIPE", "= 5"]);
        assert_eq!(errno_code_name(libc::EAGAIN), "EAGAIN");
    }
}
