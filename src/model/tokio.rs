//! `tokio`: the same sessions driven by tokio's multi-threaded runtime (`--workers` worker
//! threads): a task per connection, readiness from tokio's own epoll reactor. This is the
//! reference point: what a Rust programmer would otherwise reach for.
//!
//! ```text
//! runtime with N worker threads:
//!     loop: conn = accept().await; spawn(task(conn))
//!     task: loop { flush output (await writable); read (await readable); feed session }
//! ```

use crate::model::{
    accept, accept_action, contain, AcceptAction, Ctx, End, ReadBuf, Slot, ADMIT_WAIT,
};
use crate::net::Listener;
use crate::output::Flush;
use crate::signals::{self, Signals};
use socket2::Socket;
use std::io;
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// Serve on `listener` with a tokio runtime until a stop request.
///
/// # Errors
/// The runtime cannot start, or a fatal listener error.
pub fn run(listener: &Listener, ctx: &'static Ctx, signals: &Signals) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ctx.opts.workers.max(1))
        .enable_io()
        .enable_time()
        .build()?;
    let listen = listener.try_clone()?;
    let wake = signals.fd().try_clone_to_owned()?;
    let result = rt.block_on(async move {
        let listen = crate::sys::async_fd(listen)?;
        let wake = crate::sys::async_fd(wake)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let result = accept_loop(&listen, &wake, ctx, stop_rx).await;
        crate::model::stop_listening(listen.get_ref()); // new clients are refused
        drop(listen);
        let _ = stop_tx.send(true);
        let deadline = Instant::now() + ctx.opts.grace;
        while ctx.active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if ctx.active() > 0 {
            tracing::warn!(
                open = ctx.active(),
                "grace period over: closing remaining connections"
            );
        }
        result
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn accept_loop(
    listen: &AsyncFd<Socket>,
    wake: &AsyncFd<std::os::fd::OwnedFd>,
    ctx: &'static Ctx,
    stop: watch::Receiver<bool>,
) -> io::Result<()> {
    loop {
        tokio::select! {
            guard = wake.readable() => {
                let mut guard = guard?;
                if signals::stop_requested() {
                    return Ok(());
                }
                signals::drain_fd(std::os::fd::AsFd::as_fd(wake.get_ref()));
                guard.clear_ready();
            }
            guard = listen.readable() => {
                let mut guard = guard?;
                loop {
                    match accept(listen.get_ref(), true) {
                        Ok((sock, peer)) => {
                            tokio::spawn(admit_then_serve(sock, peer, ctx, stop.clone()));
                        }
                        Err(e) => match accept_action(&e) {
                            AcceptAction::Wait => {
                                guard.clear_ready();
                                break;
                            }
                            AcceptAction::Retry => {}
                            AcceptAction::Pause(d) => {
                                tokio::time::sleep(d).await;
                                break;
                            }
                            AcceptAction::Fatal => return Err(e),
                        },
                    }
                }
            }
        }
    }
}

/// Admit a new connection (over `--max-conns`, waiting up to [`ADMIT_WAIT`] for a slot
/// whose close is not seen yet) and serve it.
async fn admit_then_serve(
    sock: Socket,
    peer: socket2::SockAddr,
    ctx: &'static Ctx,
    stop: watch::Receiver<bool>,
) {
    let deadline = Instant::now() + ADMIT_WAIT;
    let slot = loop {
        if let Some(slot) = ctx.try_admit(&peer) {
            break slot;
        }
        if Instant::now() >= deadline || *stop.borrow() {
            ctx.refuse(&peer);
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    connection(sock, slot, ctx, stop).await;
}

/// One connection's task.
async fn connection(
    sock: Socket,
    slot: Slot<'static>,
    ctx: &'static Ctx,
    stop: watch::Receiver<bool>,
) {
    let end = match crate::sys::async_fd(sock) {
        Ok(fd) => drive(&fd, ctx, stop).await.unwrap_or_else(|end| end),
        Err(e) => End::Io(e),
    };
    end.log(&slot.peer);
}

/// Drive one connection. Every call into the session (and the flush) is a step inside the
/// panic boundary ([`contain`]): a panic ends this connection with [`End::Panic`] (`Err`),
/// the runtime and the other tasks go on.
async fn drive(
    fd: &AsyncFd<Socket>,
    ctx: &Ctx,
    mut stop: watch::Receiver<bool>,
) -> Result<End, End> {
    let mut out = ctx.service.outbox();
    let mut session = contain(|| ctx.service.open(&mut out))?;
    let mut buf = ReadBuf::default();
    let idle = Some(ctx.opts.idle_timeout).filter(|d| !d.is_zero());
    let mut eof = false;
    // The last read filled the buffer: more is coming, keep the buffer as it is.
    let mut full_read = false;
    loop {
        // Send what is queued; the peer must take a byte at least every idle timeout (a
        // client that asks for a large file and never reads is cut, not kept for ever).
        let mut last_sent = Instant::now();
        while !out.is_empty() {
            let writable = match idle {
                Some(i) => {
                    match tokio::time::timeout_at((last_sent + i).into(), fd.writable()).await {
                        Ok(w) => w,
                        Err(_) => return Ok(End::IdleTimeout),
                    }
                }
                None => fd.writable().await,
            };
            let mut guard = match writable {
                Ok(g) => g,
                Err(e) => return Ok(End::Io(e)),
            };
            let before = out.pending();
            let flushed = contain(|| {
                guard.try_io(|s| match out.flush(s.get_ref()) {
                    Ok(Flush::Done) => Ok(()),
                    Ok(Flush::Blocked) => Err(io::ErrorKind::WouldBlock.into()),
                    Err(e) => Err(e),
                })
            })?;
            if out.pending() < before {
                last_sent = Instant::now();
            }
            match flushed {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(e)) => return Ok(End::Io(e)),
            }
        }
        if session.has_backlog() {
            // Requests waited for the output to drain (it just did): the next batch.
            contain(|| session.resume(&mut out))?;
            continue;
        }
        if eof || session.done() {
            return Ok(End::Closed);
        }
        let stopping = *stop.borrow();
        let idle_now = !session.mid_request();
        if idle_now && !full_read {
            buf.idle();
        }
        let mut guard = if stopping && idle_now {
            // Stopping: answer what already arrived, without waiting for more.
            match tokio::time::timeout(Duration::ZERO, fd.readable()).await {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => return Ok(End::Io(e)),
                Err(_) => return Ok(End::Shutdown),
            }
        } else {
            let deadline = session.deadline();
            tokio::select! {
                g = fd.readable() => match g {
                    Ok(g) => g,
                    Err(e) => return Ok(End::Io(e)),
                },
                _ = tokio::time::sleep(idle.unwrap_or_default()), if idle.is_some() => return Ok(End::IdleTimeout),
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    contain(|| {
                        session.on_deadline(&mut out);
                        let _ = out.flush(fd.get_ref());
                    })?;
                    return Ok(End::Deadline);
                }
                _ = stop.changed(), if idle_now && !stopping => continue,
            }
        };
        match guard.try_io(|s| crate::model::recv(s.get_ref(), buf.space(), 0)) {
            Ok(Ok(0)) => {
                eof = true;
                full_read = false;
                if let Err(e) = contain(|| session.end_of_input())? {
                    return Ok(End::Protocol(e));
                }
            }
            Ok(Ok(n)) => {
                // What tokio's own TcpStream does: a short read means the socket is drained,
                // so forget the readiness instead of paying for a read that says EAGAIN.
                if let Err(e) = contain(|| session.receive(buf.data(n), &mut out))? {
                    return Ok(End::Protocol(e));
                }
                full_read = buf.filled(n);
                if !full_read {
                    guard.clear_ready();
                }
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Ok(End::Io(e)),
            Err(_would_block) => {
                if stopping && idle_now {
                    return Ok(End::Shutdown);
                }
            }
        }
    }
}
