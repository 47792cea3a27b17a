//! Pipes and FIFOs (seed 003's IPC chapter): how much a pipe holds, which writes stay whole,
//! a writer without a reader, opening a FIFO, descriptor counts across `fork`, and the
//! course's length-prefixed messages over a pipe.

use super::scene::{self, hex};
use super::sys;
use super::{Outcome, Timeline};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::sys::wait::WaitStatus;
use nix::unistd::{pipe, read, write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn nonblocking(fd: &OwnedFd, on: bool) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

/// Write `chunk` until `EAGAIN` (the write end must be non-blocking); bytes written and
/// calls made.
fn fill(fd: &OwnedFd, chunk: &[u8]) -> (usize, usize) {
    let (mut total, mut calls) = (0, 0);
    loop {
        calls += 1;
        match write(fd, chunk) {
            Ok(n) => total += n,
            Err(Errno::EINTR) => {}
            Err(_) => return (total, calls),
        }
    }
}

/// A pipe holds 64 KiB by default (`F_GETPIPE_SZ`), `F_SETPIPE_SZ` changes it, and a blocking
/// writer waits when it is full until the reader makes room.
pub fn pipe_capacity(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/fs/pipe-max-size");
    let (r, w) = pipe()?;
    tl.log("P", "pipe(fd)", "ok");
    let size = fcntl(&w, FcntlArg::F_GETPIPE_SZ);
    tl.call("P", "fcntl(fd[1], F_GETPIPE_SZ)", &size, |n| {
        format!("= {n}")
    });
    nonblocking(&w, true)?;
    tl.log("P", "fcntl(fd[1], F_SETFL, O_NONBLOCK)", "ok");
    let chunk = [b'x'; 4096];
    let (filled, calls) = fill(&w, &chunk);
    tl.log(
        "P",
        "write(fd[1], buf, 4096) until EAGAIN",
        format!("{filled} bytes in {} writes, then EAGAIN", calls - 1),
    );
    let grown = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
    tl.call("P", "fcntl(fd[1], F_SETPIPE_SZ, 1048576)", &grown, |n| {
        format!("= {n}")
    });
    let (more, _) = fill(&w, &chunk);
    tl.log(
        "P",
        "write(fd[1], buf, 4096) until EAGAIN",
        format!("{more} more bytes"),
    );
    let shrink = fcntl(&w, FcntlArg::F_SETPIPE_SZ(4096));
    tl.call(
        "P",
        "fcntl(fd[1], F_SETPIPE_SZ, 4096) while full",
        &shrink,
        |n| format!("= {n}"),
    );
    // Now a blocking writer on a full pipe.
    nonblocking(&w, false)?;
    let finished = AtomicBool::new(false);
    let (still_blocked, freed, wrote) = std::thread::scope(|s| -> anyhow::Result<_> {
        let writer = s.spawn(|| {
            tl.log("writer", "write(fd[1], buf, 4096) ...", "blocks");
            let r = write(&w, &chunk);
            finished.store(true, Ordering::SeqCst);
            tl.bytes("writer", "write(fd[1], buf, 4096)", &r);
            r
        });
        std::thread::sleep(Duration::from_millis(200));
        let blocked = !finished.load(Ordering::SeqCst);
        tl.log(
            "lab",
            "writer still inside write() after 200 ms?",
            if blocked { "yes" } else { "no" },
        );
        let mut buf = vec![0u8; 8192];
        let n = read(&r, &mut buf);
        tl.bytes("reader", "read(fd[0], buf, 8192)", &n);
        let wrote = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))?;
        Ok((blocked, n.unwrap_or(0), wrote))
    })?;
    let ok = size == Ok(65536)
        && filled == 65536
        && grown == Ok(1 << 20)
        && more == (1 << 20) - 65536
        && shrink == Err(Errno::EBUSY)
        && still_blocked
        && freed == 8192
        && wrote == Ok(4096);
    Ok(Outcome::new(
        ok,
        format!(
            "the pipe held {filled} bytes (F_GETPIPE_SZ {}), {} after F_SETPIPE_SZ; shrinking it while full failed {}; a blocking write to the full pipe waited until the reader took {freed} bytes",
            size.map_or("?".into(), |n| n.to_string()),
            filled + more,
            shrink.map_or_else(|e| format!("{e:?}"), |n| format!("= {n} (no error)"))
        ),
    ))
}

/// Runs of equal bytes in `data`: (number of runs, whether every `block`-aligned block is
/// made of one byte).
fn runs(data: &[u8], block: usize) -> (usize, bool) {
    let runs = 1 + data.windows(2).filter(|w| w[0] != w[1]).count();
    let whole = data.chunks(block).all(|c| c.iter().all(|&b| b == c[0]));
    (runs, whole)
}

/// Four writers at once: writes of `PIPE_BUF` (4096) bytes never interleave; writes of
/// 256 KiB are split as the pipe fills and drains, and the others' data lands in between.
pub fn pipe_atomic_writes(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.log("kernel", "PIPE_BUF", libc::PIPE_BUF.to_string());
    let mut results = Vec::new();
    for (size, count) in [(libc::PIPE_BUF, 64usize), (256 * 1024, 1)] {
        let (r, w) = pipe()?;
        let barrier = std::sync::Barrier::new(4);
        let data = std::thread::scope(|s| -> anyhow::Result<Vec<u8>> {
            let w = &w;
            let barrier = &barrier;
            let writers: Vec<_> = (0..4u8)
                .map(|k| {
                    s.spawn(move || {
                        let buf = vec![b'A' + k; size];
                        barrier.wait();
                        for _ in 0..count {
                            if write(w, &buf) != Ok(size) {
                                return false;
                            }
                        }
                        true
                    })
                })
                .collect();
            // Let the writers fill the pipe and block before reading.
            std::thread::sleep(Duration::from_millis(50));
            let mut out = Vec::with_capacity(4 * size * count);
            let mut buf = vec![0u8; 4096];
            while out.len() < 4 * size * count {
                match read(&r, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            for wr in writers {
                if !wr.join().unwrap_or(false) {
                    anyhow::bail!("a writer's write was short");
                }
            }
            Ok(out)
        })?;
        let (n, whole) = runs(&data, size.min(libc::PIPE_BUF));
        let label = format!("4 writers x {count} write(fd[1], buf, {size})");
        tl.log("writers", &label, format!("{} bytes in all", data.len()));
        let blocks_whole = if size <= libc::PIPE_BUF {
            if whole {
                "every 4096-byte write arrived whole"
            } else {
                "a write was SPLIT"
            }
        } else {
            ""
        };
        tl.log(
            "reader",
            &format!("read everything ({size}-byte writes)"),
            format!(
                "{n} runs of one writer's bytes{}{blocks_whole}",
                if blocks_whole.is_empty() { "" } else { "; " }
            ),
        );
        results.push((n, whole, data.len() == 4 * size * count));
    }
    let (small_runs, small_whole, small_all) = results[0];
    let (big_runs, _, big_all) = results[1];
    let ok = small_whole && small_all && big_all;
    Ok(Outcome::new(
        ok,
        format!(
            "4096-byte writes: {} ({small_runs} runs for 256 writes); 256 KiB writes: {big_runs} runs where 4 would mean none was split{}",
            if small_whole { "none interleaved" } else { "SOME INTERLEAVED" },
            if big_runs > 4 { " — the large writes interleaved" } else { " — this time they happened not to interleave (they may)" }
        ),
    ))
}

/// With no reader left, a write raises SIGPIPE, which kills by default; with SIGPIPE ignored
/// the write fails `EPIPE`.
pub fn pipe_no_reader(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (r, w) = pipe()?;
    drop(r);
    tl.log("P", "pipe(fd); close(fd[0])", "no reader left");
    sys::ignore_signal(Signal::SIGPIPE)?;
    tl.log("P", "signal(SIGPIPE, SIG_IGN)", "ok");
    let ignored = write(&w, b"hola");
    tl.bytes("P", "write(fd[1], \"hola\", 4)", &ignored);
    let (r2, w2) = pipe()?;
    drop(r2);
    // SAFETY: the child only calls sigaction (default_signal), write and returns to _exit.
    let child = unsafe {
        sys::fork_child(&[w2.as_raw_fd()], || {
            if sys::default_signal(Signal::SIGPIPE).is_err() {
                return 3;
            }
            let _ = write(w2.as_fd(), b"hola");
            0
        })
    }?;
    tl.log(
        "child",
        "signal(SIGPIPE, SIG_DFL); write(fd[1], \"hola\", 4)",
        format!("pid {child}"),
    );
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("P", "waitpid(child)", &st, |s| format!("{s:?}"));
    let killed = matches!(st, Ok(WaitStatus::Signaled(_, Signal::SIGPIPE, _)));
    let ok = ignored == Err(Errno::EPIPE) && killed;
    Ok(Outcome::new(
        ok,
        format!(
            "with SIGPIPE ignored the write failed {}; the child with the default action {}",
            ignored.map_or_else(|e| format!("{e:?}"), |n| format!("wrote {n} (!)")),
            if killed {
                "was killed by SIGPIPE".to_string()
            } else {
                format!("ended {st:?}")
            }
        ),
    ))
}

/// A private directory under the temp dir, removed with its contents on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let p = std::env::temp_dir().join(format!("socklab-lab-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::DirBuilder::new().mode(0o700).create(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Opening a FIFO blocks until the other side opens it too; a non-blocking open for writing
/// with no reader fails `ENXIO`, for reading it succeeds at once.
pub fn fifo_open_blocks(tl: &Timeline) -> anyhow::Result<Outcome> {
    let dir = TempDir::new()?;
    let path = dir.0.join("fifo");
    let made = nix::unistd::mkfifo(&path, Mode::S_IRUSR | Mode::S_IWUSR);
    tl.unit("P", "mkfifo(\"fifo\", 0600)", &made);
    made?;
    let opened = AtomicBool::new(false);
    let (blocked, reader_ok, writer_ok) = std::thread::scope(|s| -> anyhow::Result<_> {
        let reader = s.spawn(|| {
            tl.log("reader", "open(\"fifo\", O_RDONLY) ...", "blocks");
            let r = nix::fcntl::open(&path, OFlag::O_RDONLY, Mode::empty());
            opened.store(true, Ordering::SeqCst);
            tl.call("reader", "open(\"fifo\", O_RDONLY)", &r, |_| {
                "returns".into()
            });
            r
        });
        std::thread::sleep(Duration::from_millis(200));
        let blocked = !opened.load(Ordering::SeqCst);
        tl.log(
            "lab",
            "reader still inside open() after 200 ms?",
            if blocked { "yes" } else { "no" },
        );
        let w = nix::fcntl::open(&path, OFlag::O_WRONLY, Mode::empty());
        tl.call("writer", "open(\"fifo\", O_WRONLY)", &w, |_| "ok".into());
        let r = reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?;
        Ok((blocked, r.is_ok(), w.is_ok()))
    })?;
    // Non-blocking opens, with nobody on the other side.
    let nb_w = nix::fcntl::open(&path, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty());
    tl.call(
        "P",
        "open(\"fifo\", O_WRONLY|O_NONBLOCK), no reader",
        &nb_w,
        |_| "ok".into(),
    );
    let nb_r = nix::fcntl::open(&path, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty());
    tl.call(
        "P",
        "open(\"fifo\", O_RDONLY|O_NONBLOCK), no writer",
        &nb_r,
        |_| "ok (at once)".into(),
    );
    let nb_w2 = nix::fcntl::open(&path, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty());
    tl.call(
        "P",
        "open(\"fifo\", O_WRONLY|O_NONBLOCK), reader open",
        &nb_w2,
        |_| "ok".into(),
    );
    let removed = std::fs::remove_file(&path);
    tl.unit("P", "unlink(\"fifo\")", &removed);
    let ok = blocked
        && reader_ok
        && writer_ok
        && matches!(nb_w, Err(Errno::ENXIO))
        && nb_r.is_ok()
        && nb_w2.is_ok();
    Ok(Outcome::new(
        ok,
        format!(
            "the reader's open() {} until the writer opened; O_NONBLOCK: open for writing with no reader failed {}, open for reading succeeded at once, and then open for writing {}",
            if blocked { "waited" } else { "did NOT wait" },
            nb_w.map_or_else(|e| format!("{e:?}"), |_| "not at all".into()),
            if nb_w2.is_ok() { "succeeded" } else { "failed" }
        ),
    ))
}

/// After `fork`, the reader sees EOF only when every process holding the write end closed it.
pub fn pipe_fd_refcount(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (r, w) = pipe()?;
    tl.log("P", "pipe(fd)", "ok");
    let (go_r, go_w) = pipe()?;
    // SAFETY: the child only calls read on its go pipe and returns to _exit, which closes its
    // copy of fd[1]; it allocates nothing.
    let child = unsafe {
        sys::fork_child(&[w.as_raw_fd(), go_r.as_raw_fd()], || {
            let mut b = [0u8; 1];
            let _ = read(&go_r, &mut b);
            0
        })
    }?;
    tl.log("P", "fork()", format!("child pid {child} holds fd[1] too"));
    drop(go_r);
    drop(w);
    tl.log("P", "close(fd[1])", "ok");
    let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
    let first = poll(&mut fds, PollTimeout::from(300u16));
    let hup1 = fds[0]
        .revents()
        .map(|e| format!("{e:?}"))
        .unwrap_or_default();
    tl.call("P", "poll(fd[0], POLLIN, 300 ms)", &first, |n| {
        if *n == 0 {
            "= 0 (timeout: no data, no EOF)".into()
        } else {
            format!("= {n} {hup1}")
        }
    });
    let told = write(&go_w, b"x");
    tl.bytes("P", "tell the child to exit", &told);
    let st = scene::reap(child, Duration::from_secs(5));
    tl.call("child", "_exit(0) closes its fd[1]", &st, |s| {
        format!("{s:?}")
    });
    let mut buf = [0u8; 16];
    let eof = read(&r, &mut buf);
    tl.bytes("P", "read(fd[0], buf, 16)", &eof);
    let ok = first == Ok(0) && eof == Ok(0);
    Ok(Outcome::new(
        ok,
        format!(
            "with the child still holding fd[1], poll saw {}; once the child exited, read returned {}",
            if first == Ok(0) { "nothing for 300 ms (no EOF)".to_string() } else { format!("{first:?}") },
            eof.map_or_else(|e| format!("{e:?}"), |n| if n == 0 { "0 (EOF)".into() } else { format!("{n} bytes") })
        ),
    ))
}

/// The course's `sendData`/`receiveData`: a 16-bit length in network order, then the text.
/// Its receiver reads `sizeof(msg) - 1` bytes instead of `len`: with two messages queued it
/// swallows the second one.
pub fn pipe_length_prefix(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (r, w) = pipe()?;
    tl.log("P", "pipe(p)", "ok");
    for text in ["Wello, world", "second"] {
        let n_len = (text.len() as u16).to_be_bytes();
        let a = write(&w, &n_len);
        tl.bytes(
            "sender",
            &format!("send(p[1], &nLen = htons({}), 2)", text.len()),
            &a,
        );
        let b = write(&w, text.as_bytes());
        tl.bytes(
            "sender",
            &format!("send(p[1], \"{text}\", {})", text.len()),
            &b,
        );
    }
    nonblocking(&r, true)?;
    // The course's receiveData: read 2 bytes, then up to 1023.
    let mut n_len = [0u8; 2];
    let h = read(&r, &mut n_len);
    let len = u16::from_be_bytes(n_len) as usize;
    tl.call(
        "receiver",
        "recv(p[0], &nLen, 2); len = ntohs(nLen)",
        &h,
        |_| format!("{} → len = {len}", hex(&n_len)),
    );
    let mut msg = [0u8; 1024];
    let got = read(&r, &mut msg[..1023]);
    let swallowed = got.unwrap_or(0);
    tl.call("receiver", "recv(p[0], msg, sizeof(msg) - 1)", &got, |n| {
        format!("= {n}: {}", hex(&msg[..*n]))
    });
    tl.log(
        "receiver",
        "msg[len] = '\\0'; printf(\"%u %s\")",
        format!(
            "{len} {}",
            String::from_utf8_lossy(&msg[..len.min(swallowed)])
        ),
    );
    let next = read(&r, &mut n_len);
    tl.bytes(
        "receiver",
        "recv(p[0], &nLen, 2)  [the second message]",
        &next,
    );
    // The fix: read exactly len bytes (readn), message by message.
    for text in ["Wello, world", "second"] {
        let _ = write(&w, &(text.len() as u16).to_be_bytes());
        let _ = write(&w, text.as_bytes());
    }
    tl.note("again, reading exactly len bytes after each header");
    let mut fixed = Vec::new();
    for _ in 0..2 {
        let mut hdr = [0u8; 2];
        let ok_h = read(&r, &mut hdr) == Ok(2);
        let len = u16::from_be_bytes(hdr) as usize;
        let mut body = vec![0u8; len];
        let n = read(&r, &mut body);
        let text = String::from_utf8_lossy(&body).into_owned();
        tl.call(
            "receiver",
            &format!("recv(p[0], &nLen, 2); recv(p[0], msg, len = {len})"),
            &n,
            |n| format!("= {n} \"{text}\""),
        );
        if ok_h && n == Ok(len) {
            fixed.push(text);
        }
    }
    let ok = len == 12
        && swallowed == 12 + 2 + 6
        && next == Err(Errno::EAGAIN)
        && fixed == ["Wello, world", "second"];
    Ok(Outcome::new(
        ok,
        format!(
            "reading sizeof(msg) - 1 bytes after a {len}-byte header took {swallowed} bytes: the second message's header and text went into the first buffer, and the next header read found {}; reading exactly len bytes gave {fixed:?}",
            next.map_or_else(|e| format!("{e:?} (nothing left)"), |n| format!("{n} bytes"))
        ),
    ))
}
