//! The course's signal program (seed 003): handlers for SIGINT and SIGALRM, `alarm`, a
//! counting loop with `sleep`, then a `read` loop. What a handler may do, and which calls a
//! signal interrupts.
//!
//! It runs in a forked child (the signals must not reach the test harness's threads), which
//! reports through a [`SharedPage`]: only async-signal-safe calls there. The course reads
//! standard input; the child reads a pipe (`in`) the parent writes to, and the parent plays
//! the user pressing ^C.

use super::scene;
use super::sys::{self, SharedPage};
use super::{Outcome, Timeline};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::{alarm, pipe, read, write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64 + 1
}

fn at(stamp: u64) -> Duration {
    Duration::from_micros(stamp.saturating_sub(1))
}

fn encode(r: nix::Result<usize>) -> u64 {
    match r {
        Ok(n) => n as u64,
        Err(e) => (-(e as i64)) as u64,
    }
}

fn decode(w: u64) -> Result<usize, Errno> {
    let v = w as i64;
    if v < 0 {
        Err(Errno::from_raw(-v as i32))
    } else {
        Ok(v as usize)
    }
}

/// The shared page: per counting step (5 of them) its start, end and the alarms caught so far;
/// then the two reads.
const STEPS: usize = 5;
const STEP: usize = 0; // 3 words per step
const READ1_START: usize = 20;
const READ1_END: usize = 21;
const READ1_RESULT: usize = 22;
const READ1_SIGINTS: usize = 23;
const READ2_START: usize = 24;
const READ2_END: usize = 25;
const READ2_RESULT: usize = 26;
const READ2_SIGINTS: usize = 27;

/// `alarm(1)` during a counting loop of `sleep`s, SIGINT during a `read` with and without
/// `SA_RESTART`: the handler only counts (an atomic — what a handler may safely do).
pub fn signal_handler(tl: &Timeline) -> anyhow::Result<Outcome> {
    let page = SharedPage::new()?;
    let (data_r, data_w) = pipe()?;
    let start = tl.start();
    let fd = data_r.as_raw_fd();
    // SAFETY: the child only calls sigaction (catch_signal), alarm, nanosleep (thread::sleep),
    // read, clock_gettime (Instant) and stores into the shared page; it allocates nothing.
    let child = unsafe {
        sys::fork_child(&[fd], || {
            sys::reset_signal_count(Signal::SIGALRM);
            sys::reset_signal_count(Signal::SIGINT);
            // glibc's signal() installs handlers with SA_RESTART (BSD semantics).
            if sys::catch_signal(Signal::SIGINT, true).is_err()
                || sys::catch_signal(Signal::SIGALRM, true).is_err()
            {
                return 3;
            }
            alarm::set(1);
            for i in 0..STEPS {
                page.store(STEP + 3 * i, stamp(start));
                // sleep(): never restarted after a handler, whatever SA_RESTART says.
                let ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 300_000_000,
                };
                let r = nix::sys::time::TimeSpec::from(ts);
                let _ = nix::time::clock_nanosleep(
                    nix::time::ClockId::CLOCK_MONOTONIC,
                    nix::time::ClockNanosleepFlags::empty(),
                    &r,
                );
                page.store(STEP + 3 * i + 1, stamp(start));
                page.store(
                    STEP + 3 * i + 2,
                    u64::from(sys::signal_count(Signal::SIGALRM)),
                );
            }
            let mut buf = [0u8; 64];
            let data = data_r.as_fd();
            page.store(READ1_START, stamp(start));
            let r = read(data, &mut buf);
            page.store(READ1_END, stamp(start));
            page.store(READ1_RESULT, encode(r));
            page.store(READ1_SIGINTS, u64::from(sys::signal_count(Signal::SIGINT)));
            if sys::catch_signal(Signal::SIGINT, false).is_err() {
                return 3;
            }
            page.store(READ2_START, stamp(start));
            let r = read(data, &mut buf);
            page.store(READ2_END, stamp(start));
            page.store(READ2_RESULT, encode(r));
            page.store(READ2_SIGINTS, u64::from(sys::signal_count(Signal::SIGINT)));
            0
        })
    }?;
    tl.log(
        "child",
        "fork()",
        format!("pid {child}: signal(SIGINT, h); signal(SIGALRM, h); alarm(1)"),
    );
    drop(data_r);
    // Round 1: SIGINT while the child is in read() with SA_RESTART, then the data.
    let in_read1 = scene::wait_until(Duration::from_secs(5), || page.load(READ1_START) != 0);
    std::thread::sleep(Duration::from_millis(100));
    let k1 = kill(child, Signal::SIGINT);
    tl.unit("parent", "kill(child, SIGINT)  [^C during read]", &k1);
    std::thread::sleep(Duration::from_millis(100));
    let w1 = write(&data_w, b"hello, world\n");
    tl.bytes("parent", "write(\"hello, world\\n\")", &w1);
    // Round 2: SIGINT during read() without SA_RESTART.
    let in_read2 = scene::wait_until(Duration::from_secs(5), || page.load(READ2_START) != 0);
    std::thread::sleep(Duration::from_millis(100));
    let k2 = kill(child, Signal::SIGINT);
    tl.unit(
        "parent",
        "kill(child, SIGINT)  [^C during read, no SA_RESTART]",
        &k2,
    );
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("parent", "waitpid(child)", &st, |s| format!("{s:?}"));
    if !(in_read1 && in_read2) {
        anyhow::bail!("the child did not reach its read() calls");
    }
    let mut interrupted_steps = Vec::new();
    for i in 0..STEPS {
        let (t0, t1, alarms) = (
            page.load(STEP + 3 * i),
            page.load(STEP + 3 * i + 1),
            page.load(STEP + 3 * i + 2),
        );
        let took = at(t1).saturating_sub(at(t0));
        let cut = took < Duration::from_millis(280);
        tl.record_at(
            at(t1),
            "child",
            &format!("printf(\"Counting {i}...\"); sleep(0.3)"),
            format!(
                "slept {:.0} ms{}",
                took.as_secs_f64() * 1e3,
                if cut {
                    format!(" — cut short: SIGALRM caught ({alarms} so far)")
                } else {
                    String::new()
                }
            ),
        );
        if cut {
            interrupted_steps.push(i);
        }
    }
    let r1 = decode(page.load(READ1_RESULT));
    let r2 = decode(page.load(READ2_RESULT));
    let (s1, s2) = (page.load(READ1_SIGINTS), page.load(READ2_SIGINTS));
    tl.record_at(
        at(page.load(READ1_START)),
        "child",
        "read(in, buffer, 1023) [SA_RESTART] ...",
        "blocks",
    );
    tl.record_at(
        at(page.load(READ1_END)),
        "child",
        "read(in, buffer, 1023) [SA_RESTART]",
        match r1 {
            Ok(n) => format!("= {n} after the handler ran ({s1} SIGINT caught): restarted"),
            Err(e) => format!("{e:?}"),
        },
    );
    tl.record_at(
        at(page.load(READ2_START)),
        "child",
        "read(in, buffer, 1023) [no SA_RESTART] ...",
        "blocks",
    );
    tl.record_at(
        at(page.load(READ2_END)),
        "child",
        "read(in, buffer, 1023) [no SA_RESTART]",
        match r2 {
            Ok(n) => format!("= {n}"),
            Err(e) => format!("{e:?}: \"read () failed\" ({s2} SIGINT caught)"),
        },
    );
    let ok = interrupted_steps.len() == 1
        && r1 == Ok(13)
        && s1 == 1
        && r2 == Err(Errno::EINTR)
        && s2 == 2
        && matches!(st, Ok(WaitStatus::Exited(_, 0)));
    Ok(Outcome::new(
        ok,
        format!(
            "SIGALRM cut sleep number {} short even with SA_RESTART (sleep is never restarted); SIGINT during read() ran the handler, and read went on to return {} with SA_RESTART but failed {} without it",
            interrupted_steps.first().map_or("none".into(), |i| i.to_string()),
            r1.map_or_else(|e| format!("{e:?}"), |n| n.to_string()),
            r2.map_or_else(|e| format!("{e:?}"), |n| format!("= {n} (no error)"))
        ),
    ))
}
