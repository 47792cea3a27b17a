//! `thread`: a thread per connection (the course's `srv_rev_thr`).
//!
//! ```text
//! loop:
//!     conn = accept(listener)
//!     spawn a thread: while a request arrives on conn, answer it; close(conn)
//! ```
//!
//! On a stop request the main thread stops accepting, shuts down the reading side of every
//! idle connection (its thread sees end-of-file and exits), lets busy ones finish within the
//! grace period, then cuts what is left.

use crate::model::{for_each_connection, serve_blocking, Ctx, Tracker};
use crate::net::Listener;
use crate::signals::Signals;
use std::io;

/// Serve on `listener` with a thread per connection until a stop request.
///
/// # Errors
/// A fatal listener error.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let tracker = Tracker::default();
    std::thread::scope(|scope| {
        let result = for_each_connection(listener, ctx, signals, |sock, slot| {
            let conn = tracker.add(sock);
            let kept = conn.clone();
            let tracker = &tracker;
            let spawned = std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    serve_blocking(&conn.socket, ctx, &conn.busy, None).log(&slot.peer);
                    tracker.remove(&conn);
                });
            if let Err(e) = spawned {
                // Out of threads: this connection is dropped, the server goes on.
                tracing::warn!("cannot spawn a connection thread: {e}");
                tracker.remove(&kept);
            }
        });
        tracker.drain(ctx.opts.grace);
        result
    })
}
