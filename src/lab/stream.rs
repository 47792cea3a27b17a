//! Receiving from a stream: boundaries are not kept, big transfers arrive in pieces, and three
//! ways to read exactly N bytes.

use super::scene::{self, BIG};
use super::{Outcome, Timeline};
use nix::sys::socket::{recv, MsgFlags};
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Two sends of a stream socket arrive together in one `recv`.
pub fn stream_merges_messages(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "receiver", 2)?;
    let mut client = scene::connect(tl, "sender", addr)?;
    let (mut conn, _) = listener.accept()?;
    tl.log("receiver", "accept(s)", "ok");
    for m in ["hola", "mundo"] {
        let r = client.write(m.as_bytes());
        tl.bytes("sender", &format!("send(s, \"{m}\", {})", m.len()), &r);
        r?;
    }
    scene::wait_recv_q(conn.local_addr()?, Some(client.local_addr()?), 9);
    scene::stream_state(tl, "receiver", &conn);
    let mut buf = [0u8; 100];
    let r = conn.read(&mut buf);
    tl.call("receiver", "recv(s, buf, 100)", &r, |&n| {
        format!("= {n} \"{}\"", String::from_utf8_lossy(&buf[..n]))
    });
    let n = r?;
    let ok = &buf[..n] == b"holamundo";
    Ok(Outcome::new(
        ok,
        format!(
            "two sends of 4 and 5 bytes came out of one recv as {n} bytes \"{}\": the stream kept no boundary",
            String::from_utf8_lossy(&buf[..n])
        ),
    ))
}

/// One 50 MB send, read with `recv(s, buf, 50000000)` in a loop: count the pieces.
pub fn partial_recv(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/ipv4/tcp_rmem");
    let (listener, addr) = scene::listener(tl, "receiver", 2)?;
    std::thread::scope(|scope| -> anyhow::Result<Outcome> {
        let sender = scope.spawn(|| -> io::Result<usize> {
            let mut c = scene::connect(tl, "sender", addr)?;
            let big = vec![0u8; BIG];
            let r = c.write(&big);
            tl.bytes("sender", "send(s, buf, 50000000)", &r);
            drop(c);
            tl.log("sender", "close(s)", "ok");
            r
        });
        let (mut conn, _) = listener.accept()?;
        tl.log("receiver", "accept(s)", "ok");
        let mut buf = vec![0u8; BIG];
        let mut sizes = Vec::new();
        loop {
            let r = conn.read(&mut buf);
            if sizes.len() < 5 {
                tl.bytes("receiver", "recv(s, buf, 50000000)", &r);
            }
            match r {
                Ok(0) => break,
                Ok(n) => sizes.push(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let total: usize = sizes.iter().sum();
        let (min, max) = (
            sizes.iter().min().copied().unwrap_or(0),
            sizes.iter().max().copied().unwrap_or(0),
        );
        tl.log(
            "receiver",
            "... recv until it returns 0",
            format!("{} recvs, {total} bytes, sizes {min}..{max}", sizes.len()),
        );
        let sent = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let ok = sizes.len() > 1 && total == BIG && sent == BIG;
        Ok(Outcome::new(
            ok,
            format!(
                "one send of {sent} bytes needed {} recvs of {min} to {max} bytes (mean {}): recv returns what has arrived",
                sizes.len(),
                total / sizes.len().max(1)
            ),
        ))
    })
}

/// How many bytes [`recv_full`] reads each way.
const N: usize = 1_000_000;

/// The byte at position `i` of what the sender sends.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// A reader that counts the `read` calls made on the socket underneath.
struct Counting<'a> {
    inner: &'a TcpStream,
    calls: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        self.inner.read(buf)
    }
}

/// Send N bytes in 16 pieces a couple of milliseconds apart, so they arrive over time.
fn trickle(addr: SocketAddr) -> io::Result<()> {
    let data: Vec<u8> = (0..N).map(pattern).collect();
    let mut c = TcpStream::connect(addr)?;
    for chunk in data.chunks(N / 16) {
        c.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Read exactly N bytes: a `readn` loop, one `recv` with `MSG_WAITALL`, a buffered reader.
pub fn recv_full(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "receiver", 4)?;
    let expected: Vec<u8> = (0..N).map(pattern).collect();
    let mut results = Vec::new();
    for way in ["readn", "MSG_WAITALL", "BufReader::read_exact"] {
        let (bytes, calls) = std::thread::scope(|scope| -> anyhow::Result<(Vec<u8>, usize)> {
            let sender = scope.spawn(|| trickle(addr));
            let (conn, _) = listener.accept()?;
            let mut buf = vec![0u8; N];
            let calls = match way {
                "readn" => {
                    let (mut got, mut calls) = (0, 0);
                    while got < N {
                        calls += 1;
                        match (&conn).read(&mut buf[got..]) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    calls
                }
                "MSG_WAITALL" => {
                    let r = recv(conn.as_raw_fd(), &mut buf, MsgFlags::MSG_WAITALL);
                    tl.bytes("receiver", &format!("recv(s, buf, {N}, MSG_WAITALL)"), &r);
                    r?;
                    1
                }
                _ => {
                    let mut counting = Counting {
                        inner: &conn,
                        calls: 0,
                    };
                    BufReader::new(&mut counting).read_exact(&mut buf)?;
                    counting.calls
                }
            };
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
            Ok((buf, calls))
        })?;
        let same = bytes == expected;
        tl.log(
            "receiver",
            &format!("{way}: {N} bytes"),
            format!(
                "{calls} read syscalls, bytes {}",
                if same { "identical" } else { "DIFFERENT" }
            ),
        );
        results.push((way, same, calls));
    }
    let all_same = results.iter().all(|r| r.1);
    let waitall_one = results[1].2 == 1;
    let ok = all_same && waitall_one;
    let counts: Vec<String> = results.iter().map(|(w, _, c)| format!("{w} {c}")).collect();
    Ok(Outcome::new(
        ok,
        format!(
            "all three read the same {N} bytes{}; read syscalls: {}",
            if all_same { "" } else { " — NOT" },
            counts.join(", ")
        ),
    ))
}
