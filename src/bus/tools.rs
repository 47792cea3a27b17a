//! The D-Bus half on the command line: `bus names`, `bus call`, `bus own -- COMMAND`,
//! `bus emit`, `bus listen`, `bus monitor` — each a thin layer over [`super::peer`].

use super::client::{bus_endpoint, ConnectOptions, LoginArgs};
use super::dbus::error;
use super::names::{RequestReply, ALLOW_REPLACEMENT, DO_NOT_QUEUE, REPLACE_EXISTING};
use super::peer::{BusConnection, BusMessage, BusWriter, Call, CallError};
use crate::client::UsageError;
use crate::units::{parse_duration, parse_size};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Arguments of `socklab bus names`.
#[derive(Debug, Clone, clap::Args)]
pub struct NamesArgs {
    /// One JSON object per name (name, owner, queue).
    #[arg(long)]
    pub json: bool,
    /// The bus: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Arguments of `socklab bus call`.
#[derive(Debug, Clone, clap::Args)]
pub struct CallArgs {
    /// The destination: a well-known name (`com.example.Calc`) or a unique one (`:1.5`).
    pub name: String,
    /// The method.
    pub method: String,
    /// Arguments: strings, or JSON values with --json-args.
    pub args: Vec<String>,
    /// Object path.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Interface.
    #[arg(long)]
    pub interface: Option<String>,
    /// How long to wait for the reply (the bus answers NoReply past it).
    #[arg(long, value_parser = parse_duration, default_value = "25s")]
    pub timeout: Duration,
    /// Read each argument as a JSON value (`42`, `true`, `"text"`, `[1,2]`).
    #[arg(short = 'j', long)]
    pub json_args: bool,
    /// Print the reply (or error) as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The bus: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Arguments of `socklab bus own`.
#[derive(Debug, Clone, clap::Args)]
pub struct OwnArgs {
    /// The well-known name to own.
    pub name: String,
    /// Take the name from its owner, if the owner allows replacement.
    #[arg(long)]
    pub replace: bool,
    /// Wait in the name's queue if it is owned (and go back into it when replaced).
    #[arg(long)]
    pub queue: bool,
    /// Let others take the name with --replace.
    #[arg(long)]
    pub allow_replacement: bool,
    /// Commands running at once; further calls wait (up to 16 × this), then are refused.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// A command running longer is killed and the call answered with an error.
    #[arg(long, value_parser = parse_duration, default_value = "25s")]
    pub command_timeout: Duration,
    /// Largest stdout accepted as a reply (past it: killed, error reply).
    #[arg(long, value_parser = parse_size, default_value = "1M")]
    pub max_output: usize,
    /// Introspection XML returned for `Introspect` calls (a file).
    #[arg(long)]
    pub introspect: Option<std::path::PathBuf>,
    /// The bus: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
    /// The command run for each call: the call's arguments are appended to it; stdout is the
    /// reply, a non-zero exit an error reply (message: stderr).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Arguments of `socklab bus emit`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmitArgs {
    /// Object path.
    pub path: String,
    /// Interface.
    pub interface: String,
    /// Signal name.
    pub member: String,
    /// Arguments: strings, or JSON values with --json-args.
    pub args: Vec<String>,
    /// Send to this connection only (a unique or well-known name).
    #[arg(long)]
    pub dest: Option<String>,
    /// Read each argument as a JSON value.
    #[arg(short = 'j', long)]
    pub json_args: bool,
    /// The bus: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Arguments of `socklab bus listen` and `socklab bus monitor`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Match rules (`type='signal',interface='net.Link',arg0='eth0'`) [listen default: all
    /// signals; monitor default: everything].
    pub rules: Vec<String>,
    /// Exit after this many messages.
    #[arg(short = 'C', long = "count")]
    pub count: Option<u64>,
    /// Exit if nothing arrives for this long.
    #[arg(short = 'W', long = "timeout", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// One JSON object per message.
    #[arg(long)]
    pub json: bool,
    /// The bus: HOST:PORT or a Unix socket path [default: $SOCKLAB_BUS, else 127.0.0.1:1883].
    #[arg(long)]
    pub bus: Option<String>,
    /// User name, password, TLS.
    #[command(flatten)]
    pub login: LoginArgs,
}

fn connect(bus: Option<&str>, login: &LoginArgs) -> anyhow::Result<BusConnection> {
    let mut o = ConnectOptions::default();
    login.apply(&mut o)?;
    BusConnection::connect_with(&bus_endpoint(bus), &o)
}

fn parse_args(args: &[String], json_args: bool) -> anyhow::Result<Vec<Value>> {
    if !json_args {
        return Ok(args.iter().map(|a| json!(a)).collect());
    }
    args.iter()
        .map(|a| {
            serde_json::from_str(a)
                .map_err(|e| UsageError(format!("argument {a:?} is not JSON: {e}")).into())
        })
        .collect()
}

/// A value as text: strings as they are, anything else as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `socklab bus names`: every name, its owner and its queue (like `ListNames`).
///
/// # Errors
/// Connection failures.
pub fn run_names(a: &NamesArgs) -> anyhow::Result<()> {
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    let me = c.unique_name().to_string();
    let names = c.list_names()?;
    let mut rows = Vec::new();
    for n in names {
        if n == me {
            continue; // this very query's connection
        }
        // The bus and unique names own themselves.
        let queue = if n.starts_with(':') || n == super::dbus::DRIVER {
            vec![n.clone()]
        } else {
            match c.list_queued_owners(&n) {
                Ok(q) => q,
                Err(CallError::Error { .. }) => continue, // released meanwhile
                Err(e) => return Err(e.into()),
            }
        };
        let owner = queue.first().cloned().unwrap_or_default();
        let waiting = queue.get(1..).unwrap_or_default().to_vec();
        rows.push((n, owner, waiting));
    }
    let mut out = io::stdout().lock();
    if a.json {
        for (n, owner, waiting) in &rows {
            writeln!(
                out,
                "{}",
                json!({"name": n, "owner": owner, "queue": waiting})
            )?;
        }
    } else {
        let wn = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(4);
        let wo = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(5);
        writeln!(out, "{:<wn$}  {:<wo$}  QUEUED", "NAME", "OWNER")?;
        for (n, owner, waiting) in &rows {
            let line = format!("{n:<wn$}  {owner:<wo$}  {}", waiting.join(" "));
            writeln!(out, "{}", line.trim_end())?;
        }
    }
    drop(out);
    c.close()?;
    Ok(())
}

/// `socklab bus call`: print the reply's values, one per line (exit 1 on an error reply).
///
/// # Errors
/// Bad arguments (exit 2), error replies and connection failures (exit 1).
pub fn run_call(a: &CallArgs) -> anyhow::Result<()> {
    let args = parse_args(&a.args, a.json_args)?;
    if !a.path.starts_with('/') {
        return Err(UsageError(format!("--path {:?} must start with /", a.path)).into());
    }
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    let r = c.call(
        &a.name,
        &a.path,
        a.interface.as_deref(),
        &a.method,
        &args,
        a.timeout,
    );
    let mut out = io::stdout().lock();
    match r {
        Ok(values) => {
            if a.json {
                writeln!(out, "{}", json!({ "reply": values }))?;
            } else {
                for v in &values {
                    writeln!(out, "{}", text(v))?;
                }
            }
            drop(out);
            c.close()?;
            Ok(())
        }
        Err(CallError::Error { name, message }) => {
            if a.json {
                writeln!(out, "{}", json!({ "error": name, "message": message }))?;
            }
            anyhow::bail!("{name}: {message}")
        }
        Err(e) => Err(e.into()),
    }
}

/// `socklab bus emit`.
///
/// # Errors
/// Bad arguments, connection failures.
pub fn run_emit(a: &EmitArgs) -> anyhow::Result<()> {
    let args = parse_args(&a.args, a.json_args)?;
    if !a.path.starts_with('/') {
        return Err(UsageError(format!("the path {:?} must start with /", a.path)).into());
    }
    if a.interface.contains(['/', '+', '#']) || a.member.contains(['/', '+', '#']) {
        return Err(UsageError("interface and member may not contain / + #".into()).into());
    }
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    c.emit(&a.path, &a.interface, &a.member, &args, a.dest.as_deref())?;
    c.close()?;
    Ok(())
}

fn signal_line(s: &super::peer::Signal, json_out: bool) -> String {
    if json_out {
        json!({
            "sender": s.sender, "path": s.path, "interface": s.interface,
            "member": s.member, "destination": s.destination, "args": s.args,
        })
        .to_string()
    } else {
        format!(
            "{} {} {}.{} {}",
            s.sender,
            s.path,
            s.interface,
            s.member,
            Value::Array(s.args.clone())
        )
    }
}

/// Wait for messages as `bus listen` and `bus monitor` do, calling `each` for every one.
fn receive(
    c: &mut BusConnection,
    a: &ListenArgs,
    mut each: impl FnMut(BusMessage, &mut dyn Write) -> io::Result<bool>,
) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    let mut n = 0u64;
    while a.count.is_none_or(|max| n < max) {
        let Some(m) = c.next_message(a.timeout)? else {
            anyhow::bail!("nothing arrived within the timeout ({n} messages)");
        };
        if each(m, &mut out)? {
            n += 1;
            out.flush()?;
        }
    }
    Ok(())
}

/// `socklab bus listen`: print signals that the rules select.
///
/// # Errors
/// Bad rules (exit 2), connection failures.
pub fn run_listen(a: &ListenArgs) -> anyhow::Result<()> {
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    let rules = if a.rules.is_empty() {
        vec!["type='signal'".to_string()]
    } else {
        a.rules.clone()
    };
    for r in &rules {
        match c.add_match(r) {
            Err(CallError::Error { name, message }) if name == error::MATCH_RULE_INVALID => {
                return Err(UsageError(message).into())
            }
            other => other?,
        }
    }
    tracing::info!(unique = c.unique_name(), "listening");
    receive(&mut c, a, |m, out| match m {
        BusMessage::Signal(s) => {
            writeln!(out, "{}", signal_line(&s, a.json))?;
            Ok(true)
        }
        _ => Ok(false),
    })
}

/// `socklab bus monitor`: print every message crossing the bus (like dbus-monitor).
///
/// # Errors
/// Bad rules (exit 2), connection failures.
pub fn run_monitor(a: &ListenArgs) -> anyhow::Result<()> {
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    match c.become_monitor(&a.rules) {
        Err(CallError::Error { name, message }) if name == error::MATCH_RULE_INVALID => {
            return Err(UsageError(message).into())
        }
        other => other?,
    }
    tracing::info!(unique = c.unique_name(), "monitoring");
    receive(&mut c, a, |m, out| {
        // A monitor's messages all come as they were sent (see `become_monitor`).
        let BusMessage::Other(p) = m else {
            return Ok(false);
        };
        let get = |k: &str| {
            p.properties
                .user_properties
                .iter()
                .find(|u| &*u.name == k)
                .map(|u| u.value.to_string())
        };
        let kind = get("type").unwrap_or_else(|| "publish".into());
        let args = super::peer::decode_args(&p.payload);
        if a.json {
            let mut o = serde_json::Map::new();
            o.insert("topic".into(), json!(&*p.topic_name));
            for u in &p.properties.user_properties {
                o.insert(u.name.to_string(), json!(&*u.value));
            }
            o.insert("args".into(), Value::Array(args));
            writeln!(out, "{}", Value::Object(o))?;
            return Ok(true);
        }
        let mut line = kind.clone();
        for k in [
            "sender",
            "destination",
            "serial",
            "reply-serial",
            "path",
            "interface",
            "member",
            "error",
        ] {
            if let Some(v) = get(k) {
                line.push_str(&format!(" {k}={v}"));
            }
        }
        if kind == "publish" {
            line.push_str(&format!(
                " topic={} payload={}",
                &*p.topic_name,
                String::from_utf8_lossy(&p.payload)
            ));
        } else {
            line.push_str(&format!(" args={}", Value::Array(args)));
        }
        writeln!(out, "{line}")?;
        Ok(true)
    })
}

/// What one run of the command gave.
enum Outcome {
    Reply(String),
    Error(&'static str, String),
}

/// Run the command for one call: arguments appended, stdout (capped) is the reply, a
/// non-zero exit an error; killed (its whole process group) past the timeout or the cap.
fn run_command(a: &OwnArgs, call: &Call) -> Outcome {
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .args(call.args.iter().map(text))
        .env("SOCKLAB_BUS_SENDER", &call.sender)
        .env("SOCKLAB_BUS_DESTINATION", &call.destination)
        .env("SOCKLAB_BUS_PATH", &call.path)
        .env(
            "SOCKLAB_BUS_INTERFACE",
            call.interface.as_deref().unwrap_or(""),
        )
        .env("SOCKLAB_BUS_MEMBER", &call.member)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Error(error::FAILED, format!("{}: {e}", a.command[0])),
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let kill = || {
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    };
    let deadline = Instant::now() + a.command_timeout;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut buf = [0u8; 16384];
    let mut failure = None;
    while out_open || err_open {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failure = Some((
                "org.freedesktop.DBus.Error.Timeout",
                format!(
                    "the command ran longer than {:?}: killed",
                    a.command_timeout
                ),
            ));
            break;
        }
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let (ro, re) = {
            let mut fds = Vec::new();
            if out_open {
                fds.push(PollFd::new(stdout.as_fd(), PollFlags::POLLIN));
            }
            if err_open {
                fds.push(PollFd::new(stderr.as_fd(), PollFlags::POLLIN));
            }
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    failure = Some((error::FAILED, format!("poll: {e}")));
                    break;
                }
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let ro = if out_open {
                it.next().is_some_and(ready)
            } else {
                false
            };
            let re = if err_open {
                it.next().is_some_and(ready)
            } else {
                false
            };
            (ro, re)
        };
        if ro {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > a.max_output {
                        failure = Some((
                            error::LIMITS_EXCEEDED,
                            format!("the command wrote more than {} bytes: killed", a.max_output),
                        ));
                        break;
                    }
                }
            }
        }
        if re {
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    // Only the start of stderr is kept (it is the error message).
                    let room = 4096usize.saturating_sub(err.len());
                    err.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
    if failure.is_some() {
        kill();
    }
    // Output closed: the command is ending; give it until the deadline to exit.
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                kill();
                let _ = child.wait();
                if failure.is_none() {
                    failure = Some((
                        "org.freedesktop.DBus.Error.Timeout",
                        format!(
                            "the command ran longer than {:?}: killed",
                            a.command_timeout
                        ),
                    ));
                }
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                failure = Some((error::FAILED, format!("wait: {e}")));
                break None;
            }
        }
    };
    if let Some((name, msg)) = failure {
        return Outcome::Error(name, msg);
    }
    let status = status.expect("exited");
    if !status.success() {
        let msg = String::from_utf8_lossy(&err).trim_end().to_string();
        let how = match status.code() {
            Some(c) => format!("exit status {c}"),
            None => "killed by a signal".to_string(),
        };
        return Outcome::Error(
            error::FAILED,
            if msg.is_empty() {
                how
            } else {
                format!("{msg} ({how})")
            },
        );
    }
    let mut s = String::from_utf8_lossy(&out).into_owned();
    while s.ends_with('\n') {
        s.pop();
    }
    Outcome::Reply(s)
}

fn serve_one(a: &OwnArgs, w: &BusWriter, call: &Call) {
    let r = match run_command(a, call) {
        Outcome::Reply(s) => w.reply(call, &[json!(s)]),
        Outcome::Error(name, msg) => {
            tracing::info!(member = %call.member, sender = %call.sender, "{name}: {msg}");
            w.reply_error(call, name, &msg)
        }
    };
    if let Err(e) = r {
        tracing::warn!("reply: {e}");
    }
}

/// `socklab bus own NAME -- COMMAND`: own the name and answer each call by running COMMAND.
/// The first stdout line says `:1.N owns NAME` or `:1.N waits for NAME`.
///
/// # Errors
/// Bad arguments (exit 2), the name taken (without --queue), connection failures.
pub fn run_own(a: &OwnArgs) -> anyhow::Result<()> {
    if a.jobs == 0 {
        return Err(UsageError("--jobs must be at least 1".into()).into());
    }
    let introspect = match &a.introspect {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| UsageError(format!("--introspect {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let mut c = connect(a.bus.as_deref(), &a.login)?;
    // The commands' replies are sent from worker threads: check that this connection can.
    c.writer().map_err(|e| anyhow::anyhow!("bus own: {e}"))?;
    if let Some(x) = &introspect {
        c.set_introspection(x)?;
    }
    let mut flags = 0;
    if a.replace {
        flags |= REPLACE_EXISTING;
    }
    if a.allow_replacement {
        flags |= ALLOW_REPLACEMENT;
    }
    if !a.queue {
        flags |= DO_NOT_QUEUE;
    }
    let unique = c.unique_name().to_string();
    let r = match c.request_name(&a.name, flags) {
        Err(CallError::Error { name, message }) if name == error::INVALID_ARGS => {
            return Err(UsageError(message).into())
        }
        other => other?,
    };
    let say = |what: &str| -> io::Result<()> {
        let mut o = io::stdout().lock();
        writeln!(o, "{unique} {what} {}", a.name)?;
        o.flush()
    };
    // NameAcquired arrives before RequestName's reply: say each change of state once.
    let mut owning = match r {
        RequestReply::PrimaryOwner | RequestReply::AlreadyOwner => true,
        RequestReply::InQueue => false,
        RequestReply::Exists => {
            let owner = c.get_name_owner(&a.name).unwrap_or_default();
            anyhow::bail!(
                "{} is owned by {owner} (--queue to wait for it, --replace to take it if its owner allows)",
                a.name
            )
        }
    };
    say(if owning { "owns" } else { "waits for" })?;
    let (tx, rx) = mpsc::sync_channel::<Call>(16 * a.jobs);
    let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
    std::thread::scope(|s| -> anyhow::Result<()> {
        for _ in 0..a.jobs {
            let w = c.writer()?;
            let rx = rx.clone();
            s.spawn(move || loop {
                // The lock is held only to take a call, never while running it.
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok(call) = next else {
                    return;
                };
                serve_one(a, &w, &call);
            });
        }
        let w = c.writer()?;
        let result = loop {
            let m = match c.next_message(None) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => break Err(e.into()),
            };
            match m {
                BusMessage::Call(call) => {
                    if let Err(mpsc::TrySendError::Full(call)) = tx.try_send(call) {
                        let msg =
                            format!("busy: {} calls running and {} waiting", a.jobs, 16 * a.jobs);
                        w.reply_error(&call, error::LIMITS_EXCEEDED, &msg)?;
                    }
                }
                BusMessage::Signal(sig)
                    if sig.sender == super::dbus::DRIVER
                        && sig.args.first().and_then(Value::as_str) == Some(a.name.as_str()) =>
                {
                    match sig.member.as_str() {
                        "NameAcquired" if !owning => {
                            owning = true;
                            say("owns")?;
                        }
                        "NameLost" if a.queue => {
                            owning = false;
                            say("waits for")?;
                        }
                        "NameLost" => {
                            tracing::info!(name = %a.name, "name lost (replaced): exiting");
                            break Ok(());
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        };
        drop(tx);
        result
    })
}
