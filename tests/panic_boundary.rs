//! Issue 13, item 1: a panic in one connection's handling (a bug socklab must not have, but
//! might) closes that connection and nothing else, under every model: the loop, the worker
//! thread or process, and the server go on serving, and the panic is logged.
//!
//! The panic is injected through the daytime service's clock, the one parameter a
//! `ServiceConfig` already takes so that tests can pin the time: this test's clock panics
//! once each time a marker file is created. Nothing in the server binary can reach it: the
//! binary always uses the real clock, and no request can choose another. Each model runs
//! in-process, in a child forked from this test (it runs without the test harness, so that
//! it is single-threaded and may fork), with its log written to a file.

use socklab::model::{self, Ctx, ModelKind, ServeOptions};
use socklab::net::{Endpoint, ListenOptions, Listener};
use socklab::service::{ServiceConfig, ServiceKind};
use socklab::signals::Signals;
use socklab::sys::Fork;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// While this file exists, the next session to open removes it and panics.
static MARKER: OnceLock<PathBuf> = OnceLock::new();

const LINE: &str = "Mon Nov 23 00:00:00 2026 +0000\r\n";

fn clock() -> String {
    if let Some(m) = MARKER.get() {
        if std::fs::remove_file(m).is_ok() {
            panic!("injected panic (tests/panic_boundary.rs)");
        }
    }
    LINE.to_string()
}

fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    MARKER.set(dir.path().join("panic-next")).expect("set once");
    let mut failures = Vec::new();
    for model in ModelKind::ALL {
        match check(model, dir.path()) {
            Ok(()) => println!("panic boundary: {model} ... ok"),
            Err(e) => {
                println!("panic boundary: {model} ... FAILED: {e}");
                failures.push(model);
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("panic boundary failed under {failures:?}");
        std::process::exit(1);
    }
}

/// One daytime exchange: the bytes received before the server closed (`Err` on reset).
fn daytime(addr: &str) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    Ok(got)
}

fn check(model: ModelKind, dir: &Path) -> Result<(), String> {
    let opts = ListenOptions {
        backlog: 64,
        reuse_port: matches!(model, ModelKind::Reactors | ModelKind::Uring),
    };
    let listener =
        Listener::open(&Endpoint::Inet("127.0.0.1:0".into()), opts).map_err(|e| e.to_string())?;
    let addr = listener.local.clone();
    let log = dir.join(format!("{model}.log"));
    let pid = match socklab::sys::fork().map_err(|e| e.to_string())? {
        Fork::Child => serve(model, listener, opts, &log),
        Fork::Parent(pid) => pid,
    };
    drop(listener);
    let result = exchanges(&addr);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let status = nix::sys::wait::waitpid(pid, None).map_err(|e| e.to_string())?;
    result?;
    if status != nix::sys::wait::WaitStatus::Exited(pid, 0) {
        return Err(format!("the server ended with {status:?}"));
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let logged = text
        .matches("connection handler panicked: injected panic")
        .count();
    if logged != 3 {
        return Err(format!("{logged} of 3 panics logged: {text}"));
    }
    Ok(())
}

/// Served, then three connections that panic, each followed by one that must be served.
fn exchanges(addr: &str) -> Result<(), String> {
    let marker = MARKER.get().expect("set");
    if daytime(addr)? != LINE.as_bytes() {
        return Err("not served before any panic".into());
    }
    for round in 1..=3 {
        std::fs::File::create(marker).map_err(|e| e.to_string())?;
        match daytime(addr) {
            Ok(got) if got.is_empty() => {}
            Ok(got) => {
                return Err(format!(
                    "round {round}: the panicking connection got {got:?}"
                ))
            }
            Err(_) => {} // a reset is a close too
        }
        if marker.exists() {
            return Err(format!("round {round}: the injected panic was not reached"));
        }
        match daytime(addr) {
            Ok(got) if got == LINE.as_bytes() => {}
            other => {
                return Err(format!(
                    "round {round}: not served after the panic: {other:?}"
                ))
            }
        }
    }
    Ok(())
}

/// The child: serve daytime with the panicking clock under `model` until SIGTERM.
fn serve(model: ModelKind, listener: Listener, opts: ListenOptions, log: &Path) -> ! {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false)
        .init();
    std::panic::set_hook(Box::new(|_| {})); // the model logs what it caught
    let mut signals = Signals::install().expect("signals");
    let mut service = ServiceConfig::new(ServiceKind::Daytime);
    service.clock = clock;
    let options = ServeOptions {
        workers: 1,
        ..ServeOptions::default()
    };
    let ctx: &'static Ctx = Box::leak(Box::new(Ctx::new(service, options).expect("ctx")));
    let result = match model {
        ModelKind::Iterative => model::iterative::run(&listener, ctx, &signals),
        ModelKind::Fork => model::fork::run(listener, ctx, &mut signals),
        ModelKind::Prefork => model::prefork::run(&listener, ctx, &mut signals),
        ModelKind::Thread => model::thread::run(&listener, ctx, &signals),
        ModelKind::Pool => model::pool::run(&listener, ctx, &signals),
        ModelKind::Select => model::select::run(&listener, ctx, &signals),
        ModelKind::Poll => model::poll::run(&listener, ctx, &signals),
        ModelKind::Epoll => model::epoll::run(&listener, ctx, &signals),
        ModelKind::Reactors => model::reactors::run(&listener, ctx, &signals, opts),
        ModelKind::Uring => model::uring::run(&listener, ctx, &signals, opts),
        ModelKind::Tokio => model::tokio::run(&listener, ctx, &signals),
    };
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(result.is_err()))
}
