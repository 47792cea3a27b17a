//! `prefork`: `--workers` processes made in advance, each blocking in `accept` on the one
//! listener they inherited (Stevens' "preforked server, no locking around accept").
//!
//! ```text
//! parent:                         each worker:
//! for i in 1..N: fork a worker    loop:
//! loop:                               conn = accept(listener)   # the kernel wakes one
//!     wait for a signal               serve conn until the client closes
//!     SIGCHLD: reap, fork again       close(conn)
//!     SIGTERM: stop the workers
//! ```
//!
//! The fork cost is paid once, not per connection. A worker that dies is replaced, and the
//! connection slots (`--max-conns`) it held are released when it is reaped. On a
//! stop request the parent sends SIGTERM to the workers: one blocked in `accept` or idle in
//! `recv` is interrupted (`EINTR`, the handler has no `SA_RESTART`) and exits; one in the
//! middle of a request finishes it first.

use crate::model::fork::Children;
use crate::model::{accept, accept_action, serve_blocking, wait_signal_or, AcceptAction, Ctx};
use crate::net::Listener;
use crate::signals::{self, Signals};
use crate::sys::{self, Fork};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::AtomicBool;

/// Serve on `listener` with `ctx.opts.workers` preforked processes until a stop request.
///
/// # Errors
/// The listener cannot be made blocking, or no worker could be forked.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &mut Signals) -> io::Result<()> {
    // Workers block in accept; the flag is shared by every process holding the listener.
    listener.socket.set_nonblocking(false)?;
    let mut children = Children::default();
    // Which worker number each process is: its connections are counted in its own cell,
    // which the parent empties when it reaps it (a killed worker cannot release its slots).
    let mut numbers: HashMap<Pid, usize> = HashMap::new();
    for n in 0..ctx.opts.workers.max(1) {
        let pid = spawn_worker(n, listener, ctx, signals, &mut children)?;
        numbers.insert(pid, n);
    }
    while !signals::stop_requested() {
        wait_signal_or(signals, -1, None)?;
        for pid in children.reap(None) {
            let Some(n) = numbers.remove(&pid) else {
                continue;
            };
            ctx.release_worker(n);
            if !signals::stop_requested() {
                tracing::warn!(%pid, "worker exited; starting another");
                let pid = spawn_worker(n, listener, ctx, signals, &mut children)?;
                numbers.insert(pid, n);
            }
        }
    }
    // Tell the workers first: one blocked in accept is interrupted by the signal before it
    // can see the error the listener's shutdown gives it.
    children.signal_all(nix::sys::signal::Signal::SIGTERM);
    crate::model::stop_listening(&listener.socket);
    children.stop(ctx.opts.grace, None);
    Ok(())
}

fn spawn_worker(
    number: usize,
    listener: &Listener,
    ctx: &Ctx,
    signals: &mut Signals,
    children: &mut Children,
) -> io::Result<Pid> {
    let parent = nix::unistd::getpid();
    match sys::fork()? {
        Fork::Parent(pid) => {
            children.pids.insert(pid);
            Ok(pid)
        }
        Fork::Child => {
            if let Err(e) = sys::die_with_parent(parent) {
                tracing::warn!("worker: cannot tie its life to the parent's: {e}");
            }
            if let Err(e) = signals.reinit_in_child() {
                tracing::warn!("worker: cannot set up signals: {e}");
            }
            let code = match worker(number, listener, ctx, signals) {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!("worker: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// A worker's life: accept, serve, repeat, until SIGTERM.
fn worker(number: usize, listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let busy = AtomicBool::new(false);
    while !signals::stop_requested() {
        let (sock, peer) = match accept(&listener.socket, false) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // Stopping: the parent shut the listener down.
            Err(_) if signals::stop_requested() => break,
            Err(e) => match accept_action(&e) {
                AcceptAction::Wait | AcceptAction::Retry => continue,
                AcceptAction::Pause(d) => {
                    std::thread::sleep(d);
                    continue;
                }
                AcceptAction::Fatal => return Err(e),
            },
        };
        let Some(slot) = ctx.admit_waiting(Some(number), &peer, || {}) else {
            continue;
        };
        serve_blocking(&sock, ctx, &busy, Some(signals.fd())).log(&slot.peer);
    }
    Ok(())
}
