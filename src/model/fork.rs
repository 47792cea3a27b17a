//! `fork`: a process per connection (the course's `srv_rev_prc`, and the daytime server made
//! concurrent with `fork`).
//!
//! ```text
//! loop:
//!     conn = accept(listener)
//!     if fork() == 0:            # child
//!         close(listener)        # the child never accepts
//!         serve conn until the client closes
//!         exit(0)
//!     close(conn)                # parent: the child has its own reference to the socket
//!     reap exited children       # waitpid(WNOHANG) on SIGCHLD: no zombies
//! ```
//!
//! Closing `conn` in the parent matters: a socket is released only when every process
//! holding a descriptor for it has closed it, and the client would otherwise never see the
//! end of the connection. On a stop request the parent stops accepting and sends SIGTERM to
//! its children (repeatedly, until the grace period ends, then SIGKILL): a child idle in
//! `recv` is interrupted and exits, a child in the middle of a request finishes it first.

use crate::model::{accept_or_signal, serve_blocking, Accepted, Ctx, Slot};
use crate::net::Listener;
use crate::signals::{self, Signals};
use crate::sys::{self, Fork};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use socket2::Socket;
use std::collections::HashSet;
use std::io;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Serve on `listener` with a process per connection until a stop request.
///
/// # Errors
/// A fatal listener error.
pub fn run(listener: Listener, ctx: &Ctx, signals: &mut Signals) -> io::Result<()> {
    let mut children = Children::default();
    let result = loop {
        match accept_or_signal(&listener, signals) {
            Err(e) => break Err(e),
            Ok(Accepted::Stop) => break Ok(()),
            Ok(Accepted::Signal) => {}
            Ok(Accepted::Conn(sock, peer)) => {
                if let Some(slot) = ctx.admit_waiting(None, &peer, || {
                    children.reap(Some(ctx));
                }) {
                    let parent = nix::unistd::getpid();
                    match sys::fork() {
                        Ok(Fork::Child) => child(listener, sock, slot, ctx, signals, parent),
                        Ok(Fork::Parent(pid)) => {
                            // The child counts this connection; the parent releases the
                            // count when it reaps the child.
                            slot.hand_over();
                            children.pids.insert(pid);
                            drop(sock); // the parent's copy of the descriptor
                        }
                        Err(e) => tracing::warn!("fork failed: {e}; closing the connection"),
                    }
                }
            }
        }
        children.reap(Some(ctx));
    };
    crate::model::stop_listening(&listener.socket);
    children.stop(ctx.opts.grace, Some(ctx));
    result
}

/// The child: serve one connection and exit, never returning into the accept loop.
fn child(
    listener: Listener,
    sock: Socket,
    slot: Slot<'_>,
    ctx: &Ctx,
    signals: &mut Signals,
    parent: Pid,
) -> ! {
    drop(listener); // closes the child's copy; only the parent accepts
    if let Err(e) = sys::die_with_parent(parent) {
        tracing::warn!("child: cannot tie its life to the parent's: {e}");
    }
    if let Err(e) = signals.reinit_in_child() {
        tracing::warn!("child: cannot set up signals: {e}");
    }
    serve_blocking(&sock, ctx, &AtomicBool::new(false), Some(signals.fd())).log(&slot.peer);
    drop(sock);
    slot.hand_over(); // the parent releases the count when it reaps us
    std::process::exit(0)
}

/// The children of a process-based server, reaped without blocking and stopped together.
#[derive(Debug, Default)]
pub struct Children {
    /// Live children.
    pub pids: HashSet<Pid>,
}

impl Children {
    /// Collect every child that has exited (`waitpid(-1, WNOHANG)`), returning their pids.
    /// With `ctx`, each releases the connection slot it held.
    pub fn reap(&mut self, ctx: Option<&Ctx>) -> Vec<Pid> {
        let mut gone = Vec::new();
        if !signals::take_child_exited() && self.pids.is_empty() {
            return gone;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid() {
                        if self.pids.remove(&pid) {
                            if let Some(ctx) = ctx {
                                ctx.release_handed_over();
                            }
                            if !matches!(status, WaitStatus::Exited(_, 0)) {
                                tracing::debug!(?status, "child ended abnormally");
                            }
                            gone.push(pid);
                        }
                    }
                }
            }
        }
        gone
    }

    /// Send `sig` to every child.
    pub fn signal_all(&self, sig: Signal) {
        for &pid in &self.pids {
            let _ = kill(pid, sig);
        }
    }

    /// Stop every child: SIGTERM (repeated every 100 ms, so a child that was about to block
    /// cannot miss it), up to `grace`; then SIGKILL; all reaped.
    pub fn stop(&mut self, grace: Duration, ctx: Option<&Ctx>) {
        let deadline = Instant::now() + grace;
        let mut last_term: Option<Instant> = None;
        while !self.pids.is_empty() && Instant::now() < deadline {
            if last_term.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
                self.signal_all(Signal::SIGTERM);
                last_term = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
            self.reap(ctx);
        }
        if !self.pids.is_empty() {
            tracing::warn!(
                left = self.pids.len(),
                "grace period over: killing remaining children"
            );
            self.signal_all(Signal::SIGKILL);
            while !self.pids.is_empty() {
                let before = self.pids.len();
                self.reap(ctx);
                if self.pids.len() == before {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}
