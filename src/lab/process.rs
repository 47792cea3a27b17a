//! Processes and signals around sockets: a descriptor shared across `fork`, `alarm`
//! interrupting `recv`, shared memory with a signal as the doorbell.
//!
//! The children are forked from a process that may run other threads (the test harness), so
//! they only make async-signal-safe calls: no allocation, no printing. They report through a
//! [`SharedPage`] (times measured from the experiment's start, results as numbers), and the
//! parent writes their lines into the timeline after `waitpid`.

use super::scene::{self, state};
use super::sys::{self, SharedPage};
use super::{Outcome, Timeline};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{recv, MsgFlags};
use nix::sys::wait::WaitStatus;
use nix::unistd::{alarm, getpid, getppid, pipe, read, write};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

/// Microseconds since `start` plus one, so that 0 means "not yet" in a shared word.
fn stamp(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64 + 1
}

/// The time a stamp stands for.
fn at(stamp: u64) -> Duration {
    Duration::from_micros(stamp.saturating_sub(1))
}

/// A `recv` result as one word: the byte count, or the errno negated.
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

/// The peer of a socket shared by two processes sees EOF only after both closed it.
pub fn fork_shared_socket(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "P1", 2)?;
    let mut client = scene::connect(tl, "client", addr)?;
    let (conn, peer) = listener.accept()?;
    tl.log("P1", "accept(s)", format!("conn from {peer}"));
    let (go_r, go_w) = pipe()?;
    // SAFETY: the child only calls read, then returns to _exit (which closes its copy of conn);
    // it allocates nothing.
    let child = unsafe {
        sys::fork_child(&[conn.as_raw_fd(), go_r.as_raw_fd()], || {
            let mut b = [0u8; 1];
            // Wait for the parent's word, then exit, which closes the child's copy of conn.
            let _ = read(go_r.as_fd(), &mut b);
            0
        })
    }?;
    tl.log("P1", "fork()", format!("P2 = pid {child}, holds conn too"));
    drop(go_r);
    drop(conn);
    tl.log("P1", "close(conn)", "ok");
    client.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = [0u8; 16];
    let r1 = client.read(&mut buf);
    tl.bytes("client", "recv(s) [300 ms timeout]", &r1);
    let still = state(tl, "server side of the connection", addr, Some(peer));
    let w = write(&go_w, b"x");
    tl.bytes("P1", "tell P2 to exit", &w);
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("P2", "close(conn); _exit(0)", &st, |s| format!("{s:?}"));
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let r2 = client.read(&mut buf);
    tl.bytes("client", "recv(s)", &r2);
    let no_eof = matches!(&r1, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    let ok = no_eof && scene::is(&still, super::diag::TcpState::Established) && matches!(r2, Ok(0));
    Ok(Outcome::new(
        ok,
        format!(
            "after P1 closed, the client's recv {} and the kernel kept the connection {}; after P2 exited too, recv returned {}",
            if no_eof { "timed out (no EOF)" } else { "did NOT wait" },
            still.map_or("closed".into(), |s| s.state.name()),
            match &r2 {
                Ok(0) => "0 (EOF)".to_string(),
                Ok(n) => format!("{n} bytes"),
                Err(e) => super::timeline::ErrnoName::errno_name(e),
            }
        ),
    ))
}

/// `alarm(1)` during a blocking `recv`: `EINTR` without `SA_RESTART`; with it the call goes on.
pub fn signal_interrupts_recv(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "server", 2)?;
    let client = scene::connect(tl, "child", addr)?;
    let (mut conn, _) = listener.accept()?;
    let page = SharedPage::new()?;
    let start = tl.start();
    let fd = client.as_raw_fd();
    // SAFETY: the child only calls sigaction, alarm, recv, clock_gettime (Instant) and stores
    // into the shared page; it allocates nothing.
    let child = unsafe {
        sys::fork_child(&[fd], || {
            let mut buf = [0u8; 64];
            for (round, restart) in [(0usize, false), (1, true)] {
                let base = round * 8;
                sys::reset_signal_count(Signal::SIGALRM);
                if sys::catch_signal(Signal::SIGALRM, restart).is_err() {
                    return 3;
                }
                alarm::set(1);
                page.store(base, stamp(start));
                let r = recv(fd, &mut buf, MsgFlags::empty());
                page.store(base + 1, stamp(start));
                page.store(base + 2, encode(r));
                page.store(base + 3, u64::from(sys::signal_count(Signal::SIGALRM)));
            }
            0
        })
    }?;
    tl.log(
        "child",
        "fork()",
        format!("pid {child}: sigaction + alarm(1) + recv, twice"),
    );
    // Send the answer 1.5 s into the second round, after its alarm has fired.
    let second_started = scene::wait_until(Duration::from_secs(5), || page.load(8) != 0);
    if second_started {
        let due = at(page.load(8)) + Duration::from_millis(1500);
        std::thread::sleep(due.saturating_sub(tl.elapsed()));
    }
    // Sent in any case, so a child stuck in a restarted recv gets out.
    let r = conn.write(b"tarde");
    tl.bytes("server", "send(conn, \"tarde\", 5)", &r);
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("child", "exit", &st, |s| format!("{s:?}"));
    let mut results = Vec::new();
    for (round, flag) in [(0usize, "no SA_RESTART"), (1, "SA_RESTART")] {
        let base = round * 8;
        let (t0, t1) = (page.load(base), page.load(base + 1));
        if t0 == 0 || t1 == 0 {
            anyhow::bail!("the child did not report round {}", round + 1);
        }
        tl.record_at(
            at(t0),
            "child",
            &format!("sigaction(SIGALRM, {flag}); alarm(1)"),
            "ok",
        );
        tl.record_at(at(t0), "child", "recv(s, buf, 64) ...", "blocks");
        let r = decode(page.load(base + 2));
        let sigs = page.load(base + 3);
        tl.record_at(
            at(t1),
            "child",
            "recv(s, buf, 64)",
            match r {
                Ok(n) => format!("= {n} (SIGALRM caught {sigs}x during it)"),
                Err(e) => format!("{e:?} (SIGALRM caught {sigs}x)"),
            },
        );
        results.push((r, sigs, at(t1).saturating_sub(at(t0))));
    }
    drop(conn);
    let eintr = results[0].0 == Err(Errno::EINTR) && results[0].1 == 1;
    let restarted =
        results[1].0 == Ok(5) && results[1].1 == 1 && results[1].2 > Duration::from_millis(1200);
    let ok = eintr && restarted && matches!(st, Ok(WaitStatus::Exited(_, 0)));
    Ok(Outcome::new(
        ok,
        format!(
            "without SA_RESTART recv returned {:?} after {:.0} ms; with SA_RESTART the same signal arrived and recv went on, returning {:?} after {:.0} ms",
            results[0].0,
            results[0].2.as_secs_f64() * 1e3,
            results[1].0,
            results[1].2.as_secs_f64() * 1e3
        ),
    ))
}

/// Write `n` in decimal into `out` without allocating; returns the digits written.
fn put_decimal(mut n: u64, out: &mut [u8]) -> usize {
    let mut tmp = [0u8; 20];
    let mut len = 0;
    loop {
        tmp[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = len.min(out.len());
    for i in 0..len {
        out[i] = tmp[len - 1 - i];
    }
    len
}

/// Shared page layout for [`shared_memory_signal`].
const T_WAITING: usize = 0;
const T_SIGNALED: usize = 1;
const T_WROTE: usize = 2;
const MESSAGE: usize = 16;
const SEEN: usize = 64;
const REPLY: usize = 112;
const TEXT_WORDS: usize = 40;

/// The course's shared-memory example: the parent writes a message into a `MAP_SHARED`
/// mapping and rings `SIGUSR1`; the child reads it and writes its answer in the same page.
pub fn shared_memory_signal(tl: &Timeline) -> anyhow::Result<Outcome> {
    let page = SharedPage::new()?;
    tl.log(
        "parent",
        "mmap(NULL, 4096, RW, MAP_SHARED|MAP_ANONYMOUS)",
        "ok",
    );
    sys::reset_signal_count(Signal::SIGUSR1);
    sys::catch_signal(Signal::SIGUSR1, false)?;
    tl.log("parent", "signal(SIGUSR1, handler)  [before fork]", "ok");
    let start = tl.start();
    // SAFETY: the child only reads atomics, nanosleeps, calls getppid and stores into the
    // shared page through fixed-size stack buffers; it allocates nothing.
    let child = unsafe {
        sys::fork_child(&[], || {
            page.store(T_WAITING, stamp(start));
            let mut waited = 0;
            while sys::signal_count(Signal::SIGUSR1) == 0 {
                std::thread::sleep(Duration::from_millis(1));
                waited += 1;
                if waited > 5000 {
                    return 1;
                }
            }
            page.store(T_SIGNALED, stamp(start));
            let mut seen = [0u8; TEXT_WORDS * 8];
            let n = page.read_into(MESSAGE, &mut seen);
            page.write_text(SEEN, TEXT_WORDS, &seen[..n]);
            let mut reply = [0u8; 64];
            let head = b"child of ";
            reply[..head.len()].copy_from_slice(head);
            let mut len = head.len();
            len += put_decimal(getppid().as_raw() as u64, &mut reply[len..]);
            let tail = b" read the page; exiting";
            reply[len..len + tail.len()].copy_from_slice(tail);
            len += tail.len();
            page.write_text(REPLY, TEXT_WORDS, &reply[..len]);
            page.store(T_WROTE, stamp(start));
            0
        })
    }?;
    tl.log("parent", "fork()", format!("child pid {child}"));
    let message = format!("note from parent {} to child {child}", getpid());
    page.write_text(MESSAGE, TEXT_WORDS, message.as_bytes());
    tl.log(
        "parent",
        "write into the shared page",
        format!("\"{message}\""),
    );
    let k = kill(child, Signal::SIGUSR1);
    tl.unit("parent", "kill(child, SIGUSR1)", &k);
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("parent", "wait()", &st, |s| format!("{s:?}"));
    let stamps = [
        page.load(T_WAITING),
        page.load(T_SIGNALED),
        page.load(T_WROTE),
    ];
    let seen = page.read_text(SEEN);
    let reply = page.read_text(REPLY);
    if stamps[0] != 0 {
        tl.record_at(
            at(stamps[0]),
            "child",
            "while (!message) usleep(1000)",
            "waiting",
        );
    }
    if stamps[1] != 0 {
        tl.record_at(
            at(stamps[1]),
            "child",
            "SIGUSR1 handler ran; read the shared page",
            format!("\"{seen}\""),
        );
    }
    if stamps[2] != 0 {
        tl.record_at(
            at(stamps[2]),
            "child",
            "write into the shared page",
            format!("\"{reply}\""),
        );
    }
    tl.log("parent", "read the shared page", format!("\"{reply}\""));
    let expected = format!("child of {} read the page; exiting", getpid());
    let ok = seen == message && reply == expected && matches!(st, Ok(WaitStatus::Exited(_, 0)));
    Ok(Outcome::new(
        ok,
        format!(
            "the child woke on SIGUSR1, read \"{seen}\" from the shared page, and the parent read back \"{reply}\" after wait()"
        ),
    ))
}
