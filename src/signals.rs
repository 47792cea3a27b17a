//! Signals turned into flags and a self-pipe wake-up.
//!
//! | signal | what the server does |
//! | --- | --- |
//! | SIGINT, SIGTERM | stop: no new connections, in-flight requests finish within `--grace`, exit 0 |
//! | SIGHUP | the same (its terminal went away: drain and stop rather than die mid-answer); left ignored if it was ignored at start, as under `nohup`; `bus serve` rereads its password and ACL files instead ([`hup_reloads`]) |
//! | SIGUSR1, SIGUSR2 | logged and otherwise ignored (their default action would kill the server with no drain) |
//! | SIGCHLD | the process models reap their children |
//! | SIGPIPE | ignored: a send to a closed peer returns `EPIPE` instead of killing the server |
//!
//! The handlers set an atomic flag and write the signal's number as one byte to a pipe;
//! event loops watch the pipe's read end next to their sockets, blocking accept loops `poll`
//! it next to the listener, and whoever empties it logs the ignored signals
//! ([`drain_fd`]). The handlers are installed *without* `SA_RESTART` (but SIGCHLD's), so a
//! process blocked in a system call gets `EINTR` and can look at the flag (the course's
//! "signal interrupts recv"): this is how the iterative server and forked children notice a
//! shutdown.

use nix::sys::signal::{SaFlags, SigHandler, Signal};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);
static CHILD: AtomicBool = AtomicBool::new(false);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
static HUP_RELOADS: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    let saved = nix::errno::Errno::last_raw();
    match sig {
        libc::SIGCHLD => CHILD.store(true, Ordering::SeqCst),
        libc::SIGHUP if HUP_RELOADS.load(Ordering::SeqCst) => RELOAD.store(true, Ordering::SeqCst),
        libc::SIGINT | libc::SIGTERM | libc::SIGHUP => STOP.store(true, Ordering::SeqCst),
        _ => {} // SIGUSR1/SIGUSR2: only the byte, logged by whoever drains the pipe
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // A full pipe already holds a wake-up; the result does not matter.
        let _ = nix::unistd::write(
            // SAFETY: WAKE_FD holds the write end of the pipe owned by the live `Signals`,
            // which resets it to -1 before closing the descriptor.
            unsafe { BorrowedFd::borrow_raw(fd) },
            &[sig as u8],
        );
    }
    nix::errno::Errno::set_raw(saved);
}

/// The signal wake-up pipe of this process. Keep it alive while the server runs.
#[derive(Debug)]
pub struct Signals {
    read: OwnedFd,
    write: OwnedFd,
}

impl Signals {
    /// Ignore SIGPIPE, install the handlers of the table above and create the pipe.
    ///
    /// # Errors
    /// `pipe2` or `sigaction` errors.
    pub fn install() -> io::Result<Signals> {
        let signals = Signals::new_pipe()?;
        crate::sys::set_handler(Signal::SIGPIPE, SigHandler::SigIgn, SaFlags::empty())?;
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            crate::sys::set_handler(sig, SigHandler::Handler(on_signal), SaFlags::empty())?;
        }
        let before = crate::sys::set_handler(
            Signal::SIGHUP,
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
        )?;
        if matches!(before, SigHandler::SigIgn) {
            // Started under `nohup` (or so): the user asked to survive a hangup.
            crate::sys::set_handler(Signal::SIGHUP, SigHandler::SigIgn, SaFlags::empty())?;
        }
        crate::sys::set_handler(
            Signal::SIGCHLD,
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESTART | SaFlags::SA_NOCLDSTOP,
        )?;
        Ok(signals)
    }

    fn new_pipe() -> io::Result<Signals> {
        use nix::fcntl::OFlag;
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
        Ok(Signals { read, write })
    }

    /// In a freshly forked child: take a pipe of its own, so that its wake-ups do not reach
    /// the parent's loop (and the parent's do not reach the child's), and forget any stop or
    /// child-exit flag inherited from the parent.
    ///
    /// # Errors
    /// `pipe2` errors.
    pub fn reinit_in_child(&mut self) -> io::Result<()> {
        CHILD.store(false, Ordering::SeqCst);
        let fresh = Signals::new_pipe()?;
        *self = fresh;
        Ok(())
    }

    /// The read end, to be watched for readability next to the sockets.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Empty the pipe (after a wake-up has been seen), logging ignored signals.
    pub fn drain(&self) {
        drain_fd(self.read.as_fd());
    }
}

/// Empty a signal pipe (non-blocking), logging each SIGUSR1/SIGUSR2 found in it: they are
/// ignored, and the log says so.
pub fn drain_fd(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    while let Ok(n) = nix::unistd::read(fd, &mut buf) {
        for &b in &buf[..n] {
            let name = match i32::from(b) {
                libc::SIGUSR1 => "SIGUSR1",
                libc::SIGUSR2 => "SIGUSR2",
                _ => continue,
            };
            tracing::info!("{name} received: ignored (SIGINT, SIGTERM and SIGHUP stop the server)");
        }
        if n < buf.len() {
            break;
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        if WAKE_FD.load(Ordering::SeqCst) == self.write.as_raw_fd() {
            WAKE_FD.store(-1, Ordering::SeqCst);
        }
    }
}

/// Make SIGHUP mean "reread your configuration" ([`take_reload`]) instead of "stop", as
/// daemons that have configuration files do (`bus serve` with `--passwords`/`--acl`).
pub fn hup_reloads() {
    HUP_RELOADS.store(true, Ordering::SeqCst);
}

/// Whether SIGHUP asked for a reload since the last call (after [`hup_reloads`]).
pub fn take_reload() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}

/// Whether SIGINT or SIGTERM has arrived (or [`request_stop`] was called).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Ask this process to stop as if SIGTERM had arrived, waking its loops.
pub fn request_stop() {
    on_signal(libc::SIGTERM);
}

/// Whether a child has exited since the last call (SIGCHLD), clearing the flag.
pub fn take_child_exited() -> bool {
    CHILD.swap(false, Ordering::SeqCst)
}
