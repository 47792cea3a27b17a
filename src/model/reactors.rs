//! `reactors`: `--workers` epoll loops on as many threads, each with a listener of its own on
//! the same port (`SO_REUSEPORT`), so the kernel spreads new connections across the loops and
//! no lock or queue sits between them. Each loop is exactly the [`super::epoll`] loop.
//!
//! The first listener takes the port exclusively before the group opens to its siblings
//! ([`crate::net::Listener::sibling`]), so a second server on a busy port is refused like
//! under every other model instead of joining the group (see `net::listen_inet`).
//!
//! A Unix socket path cannot be shared with `SO_REUSEPORT`: there the loops share one
//! listener, registered with `EPOLLEXCLUSIVE` so one new connection wakes one loop.

use crate::model::{epoll, Ctx};
use crate::net::{ListenOptions, Listener};
use crate::signals::Signals;
use socket2::Socket;
use std::io;

/// Serve with `ctx.opts.workers` epoll loops until a stop request. `listener` must have been
/// opened with `SO_REUSEPORT` (see [`ListenOptions::reuse_port`]) for an IP endpoint.
///
/// # Errors
/// Opening the sibling listeners, or a loop's fatal error.
pub fn run(
    listener: &Listener,
    ctx: &Ctx,
    signals: &Signals,
    opts: ListenOptions,
) -> io::Result<()> {
    on_each_listener(listener, ctx.opts.workers, opts, "reactor", |l, shared| {
        epoll::run_loop(l, shared, ctx, signals.fd())
    })
}

/// Open `loops` listeners on `listener`'s port -- `listener` itself and `SO_REUSEPORT`
/// siblings ([`Listener::sibling`]); for a Unix socket, `listener` shared by all -- and run
/// `each(listener, shared)` on a thread per listener, named `{name}-{i}`, until every one
/// returns. The reactors and the io_uring loops start this way.
///
/// # Errors
/// Opening the sibling listeners, starting a thread, or the first error a loop returned (or
/// its panic).
pub fn on_each_listener<F>(
    listener: &Listener,
    loops: usize,
    opts: ListenOptions,
    name: &str,
    each: F,
) -> io::Result<()>
where
    F: Fn(&Socket, bool) -> io::Result<()> + Sync,
{
    let n = loops.max(1);
    let mut listeners: Vec<Socket> = Vec::with_capacity(n);
    let shared = listener.is_unix();
    for i in 0..n {
        listeners.push(if shared || i == 0 {
            listener.try_clone()?
        } else {
            let sibling = listener.sibling(ListenOptions {
                reuse_port: true,
                ..opts
            })?;
            sibling.try_clone()?
        });
    }
    let each = &each;
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn_scoped(scope, move || each(l, shared))
            })
            .collect();
        let mut result = Ok(());
        for h in handles {
            match h {
                Ok(h) => match h.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => result = Err(e),
                    Err(_) => result = Err(io::Error::other(format!("a {name} thread panicked"))),
                },
                Err(e) => result = Err(e),
            }
        }
        result
    })
}
