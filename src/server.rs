//! `socklab serve`: open the endpoint, print the bound address, install the signal
//! handlers, and run the chosen model (or the datagram loop) until SIGINT/SIGTERM.

use crate::client::UsageError;
use crate::model::{self, Ctx, ModelKind, ServeOptions, Trigger};
use crate::net::{bind_udp, Endpoint, ListenOptions, Listener};
use crate::output::SendStrategy;
use crate::service::http::HttpConfig;
use crate::service::{ServiceConfig, ServiceKind, DEFAULT_MAX_REQUEST};
use crate::signals::{self, Signals};
use crate::units::{parse_duration, parse_size};
use anyhow::Context as _;
use socket2::Socket;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `socklab serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The service to run.
    #[arg(value_enum)]
    pub service: ServiceKind,
    /// The server design [default: reactors].
    #[arg(short, long, value_enum)]
    pub model: Option<ModelKind>,
    /// Address to listen on: IPv4 or IPv6 literal or host name, with port (0 = any free port).
    #[arg(short, long, default_value = "127.0.0.1:7000")]
    pub listen: String,
    /// Listen on a Unix socket at this path instead (a stale socket file is replaced).
    #[arg(long, conflicts_with = "udp")]
    pub unix: Option<PathBuf>,
    /// Serve datagrams (UDP) instead of a stream: one loop, `--model` does not apply.
    #[arg(long)]
    pub udp: bool,
    /// The listen backlog.
    #[arg(long, default_value_t = 1024)]
    pub backlog: i32,
    /// Worker processes, threads or loops [default: cores; pool: 4 x cores].
    #[arg(short, long)]
    pub workers: Option<usize>,
    /// Edge- or level-triggered epoll (epoll, reactors).
    #[arg(long, value_enum, default_value_t = Trigger::Edge)]
    pub trigger: Trigger,
    /// Close connections idle this long (0 = never).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,
    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub grace: Duration,
    /// Over this many open connections, new ones are accepted and closed at once.
    #[arg(long)]
    pub max_conns: Option<usize>,
    /// Largest reverse request accepted (a larger declared length closes the connection).
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_MAX_REQUEST)]
    pub max_request: usize,
    /// http: the directory to serve (required for http).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// http: how file bodies are sent.
    #[arg(long = "send", value_enum, default_value_t = SendStrategy::Sendfile)]
    pub send: SendStrategy,
    /// http: a request head must arrive within this time of its first byte (else 408).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_timeout: Duration,
    /// http: also serve symlinks that point outside the root.
    #[arg(long)]
    pub follow_symlinks: bool,
    /// http: memory for complete answers of small files (revalidated on every use; 0 = off).
    #[arg(long, value_parser = parse_size, default_value = "8M")]
    pub cache: usize,
}

/// Number of cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Run `socklab serve` until a stop request.
///
/// # Errors
/// [`crate::net::NetError`] for a bad or busy address (a user error), other errors for
/// failures of the server itself.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    for (name, d) in [
        ("--idle-timeout", args.idle_timeout),
        ("--grace", args.grace),
        ("--header-timeout", args.header_timeout),
    ] {
        if d > MAX_DURATION {
            return Err(UsageError(format!("{name} {d:?} is too long (at most 100 years)")).into());
        }
    }
    log_panics();
    let endpoint = match &args.unix {
        Some(p) => Endpoint::Unix(p.clone()),
        None => Endpoint::Inet(args.listen.clone()),
    };
    let mut service = ServiceConfig::new(args.service);
    service.max_request = args.max_request;
    service.strategy = args.send;
    if args.service == ServiceKind::Http {
        if args.udp {
            return Err(UsageError(
                "http is served over a stream (TCP or --unix), not --udp".into(),
            )
            .into());
        }
        let Some(root) = &args.root else {
            return Err(
                UsageError("serve http needs --root DIR (the directory to serve)".into()).into(),
            );
        };
        let canonical = std::fs::canonicalize(root)
            .and_then(|p| std::fs::read_dir(&p).map(|_| p))
            .map_err(|e| UsageError(format!("cannot serve {}: {e}", root.display())))?;
        let root_fd = crate::service::http::path::open_root(&canonical)
            .map_err(|e| UsageError(format!("cannot serve {}: {e}", root.display())))?;
        service.http = Some(std::sync::Arc::new(HttpConfig {
            root: canonical,
            root_fd,
            follow_symlinks: args.follow_symlinks,
            header_timeout: args.header_timeout,
            cache: crate::service::http::cache::Cache::new(args.cache),
        }));
    }
    let mut signals = Signals::install().context("installing signal handlers")?;
    // Every connection is a descriptor (two with a file body): use what the hard limit
    // allows rather than stop accepting at the usual soft limit of 1,024.
    match crate::sys::raise_fd_limit() {
        Ok(limit) => tracing::debug!(limit, "open descriptors allowed"),
        Err(e) => tracing::warn!("cannot raise the descriptor limit: {e}"),
    }

    if args.udp {
        if let Some(m) = args.model {
            tracing::warn!("--model {m} does not apply to --udp: datagrams are served by one loop");
        }
        let (sock, local) = bind_udp(&endpoint)?;
        announce(&local)?;
        tracing::info!(service = %args.service, "serving datagrams on {local}");
        return serve_datagrams(&sock, &service, &signals).context("datagram loop");
    }

    let model = args.model.unwrap_or(ModelKind::Reactors);
    let workers = args
        .workers
        .unwrap_or_else(|| model.default_workers(cores()))
        .max(1);
    let opts = ServeOptions {
        workers,
        trigger: args.trigger,
        idle_timeout: args.idle_timeout,
        grace: args.grace,
        max_conns: args.max_conns,
    };
    if model == ModelKind::Uring {
        // Refuse at once, before listening, if this system does not allow io_uring.
        model::uring::probe().map_err(|why| UsageError(format!("--model uring: {why}")))?;
    }
    let listen_opts = ListenOptions {
        backlog: args.backlog,
        reuse_port: matches!(model, ModelKind::Reactors | ModelKind::Uring),
    };
    let listener = Listener::open(&endpoint, listen_opts)?;
    announce(&listener.local)?;
    match model {
        ModelKind::Prefork
        | ModelKind::Pool
        | ModelKind::Reactors
        | ModelKind::Uring
        | ModelKind::Tokio => {
            tracing::info!(service = %args.service, %model, workers, "listening on {}", listener.local)
        }
        _ => tracing::info!(service = %args.service, %model, "listening on {}", listener.local),
    }
    // The context lives as long as the server: tasks of the tokio model need it 'static.
    let ctx: &'static Ctx = Box::leak(Box::new(Ctx::new(service, opts)?));
    let result = match model {
        ModelKind::Iterative => model::iterative::run(&listener, ctx, &signals),
        ModelKind::Fork => model::fork::run(listener, ctx, &mut signals),
        ModelKind::Prefork => model::prefork::run(&listener, ctx, &mut signals),
        ModelKind::Thread => model::thread::run(&listener, ctx, &signals),
        ModelKind::Pool => model::pool::run(&listener, ctx, &signals),
        ModelKind::Select => model::select::run(&listener, ctx, &signals),
        ModelKind::Poll => model::poll::run(&listener, ctx, &signals),
        ModelKind::Epoll => model::epoll::run(&listener, ctx, &signals),
        ModelKind::Reactors => model::reactors::run(&listener, ctx, &signals, listen_opts),
        ModelKind::Uring => model::uring::run(&listener, ctx, &signals, listen_opts),
        ModelKind::Tokio => model::tokio::run(&listener, ctx, &signals),
    };
    result.with_context(|| format!("{model} server"))?;
    tracing::info!("stopped");
    Ok(())
}

/// The longest timeout accepted: deadlines are computed as "now + timeout", which must not
/// overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Route panic reports through the log, one line with where it happened. A panic in one
/// connection's handling is then also caught at the connection boundary
/// ([`crate::model::contain`]) and logged with the peer; the server goes on.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        tracing::error!(%thread, at, "panic: {msg}");
    }));
}

/// Print the bound address as the first line on stdout, and flush it (scripts wait for it).
fn announce(local: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{local}")?;
    out.flush()
}

/// The datagram loop: each datagram is a request, answered to its sender.
///
/// # Errors
/// A failure of the socket itself (not of one datagram).
pub fn serve_datagrams(
    sock: &Socket,
    service: &ServiceConfig,
    signals: &Signals,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536);
    sock.set_nonblocking(true)?;
    while !signals::stop_requested() {
        crate::model::wait_signal_or(signals, sock.as_raw_fd(), None)?;
        loop {
            let (n, from) = match nix::sys::socket::recvfrom::<nix::sys::socket::SockaddrStorage>(
                sock.as_raw_fd(),
                &mut buf,
            ) {
                Ok((n, Some(from))) => (n, from),
                Ok((_, None)) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    // e.g. ECONNREFUSED from an earlier reply's ICMP: one peer's problem.
                    tracing::debug!("recvfrom: {e}");
                    continue;
                }
            };
            if service.datagram(&buf[..n], &mut reply) {
                if let Err(e) = nix::sys::socket::sendto(
                    sock.as_raw_fd(),
                    &reply,
                    &from,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    tracing::debug!(peer = %from, "sendto: {e}");
                }
            }
        }
    }
    tracing::info!("stopped");
    Ok(())
}
