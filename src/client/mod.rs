//! `socklab client`: the clients of the services.
//!
//! - `reverse [ADDR] FILE...`: the course's `cln_rev`: one connection, one request per file
//!   (`writev` of the 4-byte network-order length and the contents), each answer read whole
//!   (the `MSG_WAITALL` loop) and written to stdout.
//! - `echo [ADDR]`: stdin to the server, its answers to stdout; the write side is shut down at
//!   the end of stdin and the client exits when the server closes.
//! - `daytime [ADDR]`: prints the server's date line.
//!
//! Each takes `--unix PATH` instead of `ADDR`, and `--udp` (one datagram per file, per line
//! of stdin, or an empty datagram for daytime).

use crate::net::{self, Endpoint, NetError};
use crate::units::parse_duration;
use anyhow::{bail, Context as _};
use socket2::{Domain, Socket, Type};
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::path::PathBuf;
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
    /// How long to wait for a datagram answer.
    #[arg(long, value_parser = parse_duration, default_value = "5s", global = true)]
    pub timeout: Duration,
}

/// The clients.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ClientKind {
    /// cln_rev: send each FILE as a request over one connection; print the reversed bytes.
    Reverse {
        /// `ADDR FILE...` (or just `FILE...` with --unix).
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

/// Run a client.
///
/// # Errors
/// Connection failures ([`NetError`]), unreadable files, short answers.
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
            if common.udp {
                let sock = udp_socket(&ep, common.timeout)?;
                for f in files {
                    let data = std::fs::read(f).with_context(|| format!("reading {f}"))?;
                    let answer = datagram_exchange(&sock, &data)?;
                    out.write_all(&answer)?;
                }
            } else {
                let sock = net::connect(&ep)?;
                for f in files {
                    let data = std::fs::read(f).with_context(|| format!("reading {f}"))?;
                    let answer = reverse_request(&sock, &data)
                        .with_context(|| format!("request for {f}"))?;
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
                let sock = net::connect(&ep)?;
                echo_stream(sock, &mut out)?;
            }
        }
        ClientKind::Daytime { addr, common } => {
            let ep = endpoint(addr.clone(), common)?;
            if common.udp {
                let sock = udp_socket(&ep, common.timeout)?;
                out.write_all(&datagram_exchange(&sock, b"")?)?;
            } else {
                let mut sock = net::connect(&ep)?;
                let mut text = Vec::new();
                sock.read_to_end(&mut text)?;
                out.write_all(&text)?;
            }
        }
    }
    out.flush()?;
    Ok(())
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

fn echo_stream(sock: Socket, out: &mut impl Write) -> anyhow::Result<()> {
    let writer = sock.try_clone()?;
    let feeder = std::thread::spawn(move || -> io::Result<()> {
        let mut w = &writer;
        io::copy(&mut io::stdin().lock(), &mut w)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut r = &sock;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.write_all(&buf[..n])?;
                out.flush()?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    match feeder.join() {
        Ok(r) => r.context("sending stdin")?,
        Err(_) => bail!("stdin thread panicked"),
    }
    Ok(())
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
