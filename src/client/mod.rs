//! `socklab client`: the clients of the services.
//!
//! - `reverse [ADDR] FILE...`: the course's `cln_rev`: one connection, one request per file
//!   (`writev` of the 4-byte network-order length and the contents), each answer read whole
//!   (the `MSG_WAITALL` loop) and written to stdout. `-` is standard input. Every file is
//!   opened before connecting, so a missing one is a usage error (exit 2) with nothing sent.
//! - `echo [ADDR]`: stdin to the server, its answers to stdout; the write side is shut down at
//!   the end of stdin and the client exits when the server closes.
//! - `daytime [ADDR]`: prints the server's date line.
//!
//! Each takes `--unix PATH` instead of `ADDR`, and `--udp` (one datagram per file, per line
//! of stdin, or an empty datagram for daytime). None waits forever: `--timeout` (10 s)
//! bounds the connect, and any wait for bytes the server owes (an answer, the daytime line,
//! the close after the end of input) or for room to send.

use crate::net::{self, Endpoint, NetError};
use crate::units::parse_duration;
use anyhow::{bail, Context as _};
use socket2::{Domain, Socket, Type};
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `socklab client`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Which client.
    #[command(subcommand)]
    pub kind: ClientKind,
}

/// Options shared by every client.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Connect to a Unix socket at this path (then no ADDR is given).
    #[arg(long, global = true)]
    pub unix: Option<PathBuf>,
    /// Use UDP datagrams instead of a stream.
    #[arg(long, global = true, conflicts_with = "unix")]
    pub udp: bool,
    /// Give up when the server owes bytes (an answer, the daytime line, the close after the
    /// end of input) and sends nothing for this long, or takes this long to connect.
    #[arg(long, value_parser = parse_duration, default_value = "10s", global = true)]
    pub timeout: Duration,
}

/// The clients.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClientKind {
    /// cln_rev: send each FILE as a request over one connection; print the reversed bytes.
    Reverse {
        /// `ADDR FILE...` (or just `FILE...` with --unix); `-` is standard input.
        #[arg(required = true, value_name = "ADDR|FILE")]
        args: Vec<String>,
        /// Endpoint options.
        #[command(flatten)]
        common: Common,
    },
    /// Copy stdin to the server and its answers to stdout.
    Echo {
        /// The server's HOST:PORT (omit with --unix).
        addr: Option<String>,
        /// Endpoint options.
        #[command(flatten)]
        common: Common,
    },
    /// Print the server's date and time.
    Daytime {
        /// The server's HOST:PORT (omit with --unix).
        addr: Option<String>,
        /// Endpoint options.
        #[command(flatten)]
        common: Common,
    },
}

/// A usage mistake in the client's arguments.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn endpoint(addr: Option<String>, common: &Common) -> anyhow::Result<Endpoint> {
    match (&common.unix, addr) {
        (Some(p), None) => Ok(Endpoint::Unix(p.clone())),
        (None, Some(a)) => Ok(Endpoint::Inet(a)),
        (Some(_), Some(_)) => {
            Err(UsageError("give either ADDR or --unix PATH, not both".into()).into())
        }
        (None, None) => {
            Err(UsageError("missing server address (HOST:PORT or --unix PATH)".into()).into())
        }
    }
}

/// A request's source for `client reverse`: a file opened up front, or standard input.
enum Input {
    Stdin,
    File(String, std::fs::File),
}

impl Input {
    /// Open every `FILE` argument (`-` is stdin) before anything is sent.
    fn open_all(names: &[String]) -> Result<Vec<Input>, UsageError> {
        names
            .iter()
            .map(|f| {
                if f == "-" {
                    return Ok(Input::Stdin);
                }
                let cannot =
                    |e: &dyn std::fmt::Display| UsageError(format!("cannot read {f}: {e}"));
                let file = std::fs::File::open(f).map_err(|e| cannot(&e))?;
                if file.metadata().map_err(|e| cannot(&e))?.is_dir() {
                    return Err(cannot(&"it is a directory"));
                }
                Ok(Input::File(f.clone(), file))
            })
            .collect()
    }

    fn name(&self) -> &str {
        match self {
            Input::Stdin => "standard input",
            Input::File(name, _) => name,
        }
    }

    fn read(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut data = Vec::new();
        match self {
            Input::Stdin => io::stdin().lock().read_to_end(&mut data),
            Input::File(_, f) => f.read_to_end(&mut data),
        }
        .with_context(|| format!("reading {}", self.name()))?;
        Ok(data)
    }
}

/// Run a client.
///
/// # Errors
/// Connection failures ([`NetError`]), unreadable files ([`UsageError`]), short answers,
/// a server silent for longer than `--timeout`.
pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match &args.kind {
        ClientKind::Reverse { args, common } => {
            let (addr, files) = if common.unix.is_some() {
                (None, &args[..])
            } else {
                (Some(args[0].clone()), &args[1..])
            };
            if files.is_empty() {
                bail!(UsageError("no FILE given".into()));
            }
            let ep = endpoint(addr, common)?;
            let mut inputs = Input::open_all(files)?;
            if common.udp {
                let sock = udp_socket(&ep, common.timeout)?;
                for input in &mut inputs {
                    let data = input.read()?;
                    let answer = datagram_exchange(&sock, &data)?;
                    out.write_all(&answer)?;
                }
            } else {
                let sock = connect(&ep, common.timeout)?;
                for input in &mut inputs {
                    let data = input.read()?;
                    let answer = reverse_request(&sock, &data)
                        .map_err(|e| silent(e, &ep, common.timeout))
                        .with_context(|| format!("request for {}", input.name()))?;
                    out.write_all(&answer)?;
                }
            }
        }
        ClientKind::Echo { addr, common } => {
            let ep = endpoint(addr.clone(), common)?;
            if common.udp {
                let sock = udp_socket(&ep, common.timeout)?;
                for line in io::stdin().lock().split(b'\n') {
                    let mut line = line?;
                    line.push(b'\n');
                    out.write_all(&datagram_exchange(&sock, &line)?)?;
                    out.flush()?;
                }
            } else {
                let sock = connect(&ep, common.timeout)?;
                echo_stream(sock, &mut out, &ep, common.timeout)?;
            }
        }
        ClientKind::Daytime { addr, common } => {
            let ep = endpoint(addr.clone(), common)?;
            if common.udp {
                let sock = udp_socket(&ep, common.timeout)?;
                out.write_all(&datagram_exchange(&sock, b"")?)?;
            } else {
                let mut sock = connect(&ep, common.timeout)?;
                let mut text = Vec::new();
                sock.read_to_end(&mut text)
                    .map_err(|e| silent(e.into(), &ep, common.timeout))?;
                out.write_all(&text)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Connect within `timeout`, with every later send and receive bounded by it too.
fn connect(ep: &Endpoint, timeout: Duration) -> anyhow::Result<Socket> {
    let sock = net::connect_within(ep, Some(timeout))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    Ok(sock)
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO` expiring).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Word a socket timeout for the user; other errors pass unchanged.
fn silent(e: anyhow::Error, ep: &Endpoint, timeout: Duration) -> anyhow::Error {
    match e.downcast_ref::<io::Error>() {
        Some(io) if is_timeout(io) => anyhow::anyhow!(
            "{ep} sent nothing for {:.1} s (--timeout)",
            timeout.as_secs_f64()
        ),
        _ => e,
    }
}

/// One reverse request on a connected stream socket: `writev` the header and the data, then
/// read exactly as many bytes back. Returns the answer.
///
/// # Errors
/// Data over `u32::MAX` bytes, send/receive errors, or the server closing early.
pub fn reverse_request(sock: &Socket, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u32::try_from(data.len()).context("a reverse request is at most 4 GiB - 1")?;
    let header = len.to_be_bytes();
    write_all_vectored(sock, &[&header, data])?;
    let mut answer = vec![0u8; data.len()];
    read_exact_from(sock, &mut answer)?;
    Ok(answer)
}

/// Write every byte of `parts` with `writev`, resuming after short writes.
///
/// # Errors
/// The first send error.
pub fn write_all_vectored(sock: &Socket, parts: &[&[u8]]) -> io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    while sent < total {
        let mut skip = sent;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
                continue;
            }
            slices.push(IoSlice::new(&p[skip..]));
            skip = 0;
        }
        match sock.send_vectored(&slices) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes (what `recv(..., MSG_WAITALL)` does), or fail.
///
/// # Errors
/// A receive error, or end-of-file before `buf` is full.
pub fn read_exact_from(mut sock: &Socket, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "server closed the connection after {got} of {} bytes",
                        buf.len()
                    ),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copy stdin to the server (a thread) and its answers to stdout. Waiting is fine while the
/// server owes nothing (a person typing); once it owes bytes -- echo owes as many as were
/// sent, and the close once stdin ended -- a silence of `timeout` is an error.
fn echo_stream(
    sock: Socket,
    out: &mut impl Write,
    ep: &Endpoint,
    timeout: Duration,
) -> anyhow::Result<()> {
    let writer = sock.try_clone()?;
    let sent = Arc::new(AtomicU64::new(0));
    let input_done = Arc::new(AtomicBool::new(false));
    let (sent2, done2) = (sent.clone(), input_done.clone());
    let feeder = std::thread::spawn(move || -> io::Result<()> {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            (&writer).write_all(&buf[..n])?;
            sent2.fetch_add(n as u64, Ordering::SeqCst);
        }
        done2.store(true, Ordering::SeqCst);
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut r = &sock;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        match r.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                got += n as u64;
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                let owed = got < sent.load(Ordering::SeqCst) || input_done.load(Ordering::SeqCst);
                if owed || feeder.is_finished() {
                    break Err(silent(e.into(), ep, timeout));
                }
            }
            Err(e) => break Err(e.into()),
        }
    };
    if !feeder.is_finished() {
        // The server closed or went silent while stdin is still open (a person who has not
        // typed the end of input): the feeder, blocked reading it, ends with the process.
        return result;
    }
    match feeder.join() {
        Ok(r) => r
            .map_err(|e| silent(e.into(), ep, timeout))
            .context("sending stdin")?,
        Err(_) => bail!("stdin thread panicked"),
    }
    result
}

/// A UDP socket connected to `endpoint` (so ICMP errors come back as `ECONNREFUSED`), with a
/// receive timeout.
fn udp_socket(endpoint: &Endpoint, timeout: Duration) -> anyhow::Result<Socket> {
    let Endpoint::Inet(a) = endpoint else {
        bail!(UsageError("--udp needs HOST:PORT, not --unix".into()));
    };
    let mut last = None;
    for addr in net::resolve(a)? {
        let r = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), None)
            .and_then(|s| s.connect(&addr.into()).map(|_| s));
        match r {
            Ok(s) => {
                s.set_read_timeout(Some(timeout))?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(NetError::Connect {
        addr: a.clone(),
        source: last.unwrap_or_else(|| io::Error::other("no address")),
    }
    .into())
}

/// Send one datagram and wait for one answer.
fn datagram_exchange(sock: &Socket, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    sock.send(data).context("sending datagram")?;
    let mut buf = vec![0u8; 65536];
    let mut r = sock;
    match r.read(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(buf)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            bail!("no answer within the timeout")
        }
        Err(e) => Err(e).context("receiving datagram"),
    }
}
