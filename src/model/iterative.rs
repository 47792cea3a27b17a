//! `iterative`: one connection at a time, the course's sequential server (`srv_rev_sec`).
//!
//! ```text
//! loop:
//!     conn = accept(listener)
//!     while a request arrives on conn: answer it
//!     close(conn)
//! ```
//!
//! While one client is served every other waits in the listen backlog: the baseline every
//! concurrent design is measured against.

use crate::model::{for_each_connection, serve_blocking, Ctx};
use crate::net::Listener;
use crate::signals::Signals;
use std::io;
use std::sync::atomic::AtomicBool;

/// Serve on `listener` one connection after another until a stop request.
///
/// # Errors
/// A fatal listener error.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let busy = AtomicBool::new(false);
    for_each_connection(listener, ctx, signals, |sock, slot| {
        // A stop signal wakes the driver (it watches the signal pipe); it then finishes the
        // request in flight, if any, within the grace period, and returns.
        serve_blocking(&sock, ctx, &busy, Some(signals.fd())).log(&slot.peer);
    })
}
