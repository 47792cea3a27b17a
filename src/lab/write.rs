//! Sending several pieces of data: separate writes, `MSG_MORE`, a copy, `writev`; pointers
//! are not data; a length header in network byte order.

use super::diag;
use super::scene;
use super::{Outcome, Timeline};
use nix::sys::socket::{recv, send, MsgFlags};
use nix::sys::uio::writev;
use socket2::SockRef;
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The two pieces of data the course's `envio_multiple_*` programs send (its argv[3], argv[4]).
const DATO1: &str = "hola";
const DATO2: &str = "mundo";
/// `MAX_DATO` of the course's `struct mensaje`.
const MAX_DATO: usize = 16;

/// Four ways to send two pieces: count syscalls and the data segments TCP sent.
pub fn multiple_send(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "receiver", 4)?;
    let mut rows = Vec::new();
    for way in [
        "2 writes",
        "2 sends, MSG_MORE on the first",
        "copy into struct + 1 write",
        "writev",
    ] {
        let client = TcpStream::connect(addr)?;
        let (mut conn, _) = listener.accept()?;
        let fd = client.as_raw_fd();
        let (syscalls, expected) = match way {
            "2 writes" => {
                let r = nix::unistd::write(&client, DATO1.as_bytes());
                tl.bytes("sender", &format!("write(s, \"{DATO1}\", 4)"), &r);
                let r2 = nix::unistd::write(&client, DATO2.as_bytes());
                tl.bytes("sender", &format!("write(s, \"{DATO2}\", 5)"), &r2);
                (2, DATO1.len() + DATO2.len())
            }
            "2 sends, MSG_MORE on the first" => {
                // nix has no MSG_MORE flag; socket2 passes the raw flag through.
                let r = SockRef::from(&client).send_with_flags(DATO1.as_bytes(), libc::MSG_MORE);
                tl.bytes("sender", &format!("send(s, \"{DATO1}\", 4, MSG_MORE)"), &r);
                let r2 = send(fd, DATO2.as_bytes(), MsgFlags::empty());
                tl.bytes("sender", &format!("send(s, \"{DATO2}\", 5, 0)"), &r2);
                (2, DATO1.len() + DATO2.len())
            }
            "copy into struct + 1 write" => {
                let mut m = [0u8; 2 * MAX_DATO];
                m[..DATO1.len()].copy_from_slice(DATO1.as_bytes());
                m[MAX_DATO..MAX_DATO + DATO2.len()].copy_from_slice(DATO2.as_bytes());
                let r = nix::unistd::write(&client, &m);
                tl.bytes("sender", "strcpy x2; write(s, &m, sizeof(m) = 32)", &r);
                (1, m.len())
            }
            _ => {
                let iov = [
                    IoSlice::new(DATO1.as_bytes()),
                    IoSlice::new(DATO2.as_bytes()),
                ];
                let r = writev(&client, &iov);
                tl.bytes("sender", "writev(s, [\"hola\", \"mundo\"], 2)", &r);
                (1, DATO1.len() + DATO2.len())
            }
        };
        let mut got = vec![0u8; expected];
        conn.read_exact(&mut got)?;
        // Let the last ACK come back so the counters are final.
        std::thread::sleep(Duration::from_millis(5));
        let counters = diag::find_with(client.local_addr()?, Some(addr), true)?
            .and_then(|s| s.counters)
            .ok_or_else(|| anyhow::anyhow!("sock_diag gave no tcp_info for the sender"))?;
        tl.log(
            "kernel",
            &format!("sock_diag tcp_info: {way}"),
            format!("{} data segments", counters.data_segs_out),
        );
        tl.log(
            "receiver",
            &format!("read {expected} bytes"),
            format!("{:?}", String::from_utf8_lossy(&got)),
        );
        rows.push((way, syscalls, counters.data_segs_out));
    }
    let one_segment = rows[1..].iter().all(|r| r.2 == 1);
    let text: Vec<String> = rows
        .iter()
        .map(|(w, s, g)| format!("{w}: {s} syscalls/{g} segments"))
        .collect();
    Ok(Outcome::new(
        one_segment,
        format!(
            "{}{}",
            text.join("; "),
            if one_segment {
                ""
            } else {
                " (expected 1 segment for MSG_MORE, copy and writev)"
            }
        ),
    ))
}

/// The course's `struct mensaje { char *dato1; char *dato2; }`: what `write(s, &m, sizeof m)`
/// puts on the wire.
#[repr(C)]
struct PointerMessage {
    dato1: *const u8,
    dato2: *const u8,
}

impl PointerMessage {
    /// The struct's bytes as they lie in memory: the two addresses, in host byte order.
    fn as_bytes(&self) -> Vec<u8> {
        let mut out = (self.dato1 as usize).to_ne_bytes().to_vec();
        out.extend_from_slice(&(self.dato2 as usize).to_ne_bytes());
        out
    }
}

/// Sending a struct of pointers sends the addresses, not the strings.
pub fn pointer_send(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "receiver", 2)?;
    let mut client = scene::connect(tl, "sender", addr)?;
    let (mut conn, _) = listener.accept()?;
    let m = PointerMessage {
        dato1: DATO1.as_ptr(),
        dato2: DATO2.as_ptr(),
    };
    tl.log(
        "sender",
        &format!("m.dato1 = \"{DATO1}\" at {:p}", m.dato1),
        "",
    );
    tl.log(
        "sender",
        &format!("m.dato2 = \"{DATO2}\" at {:p}", m.dato2),
        "",
    );
    let bytes = m.as_bytes();
    let r = client.write(&bytes);
    tl.bytes(
        "sender",
        &format!("write(s, &m, sizeof(m) = {})", bytes.len()),
        &r,
    );
    drop(client);
    let mut got = Vec::new();
    conn.read_to_end(&mut got)?;
    tl.log(
        "receiver",
        "recv until EOF",
        format!("{} bytes: {}", got.len(), scene::hex(&got)),
    );
    let word = std::mem::size_of::<usize>();
    let as_ptrs: Vec<String> = got
        .chunks(word)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            format!("{:#x}", u64::from_ne_bytes(w))
        })
        .collect();
    tl.log("receiver", "read as two pointers", as_ptrs.join(", "));
    let has_text = got.windows(DATO1.len()).any(|w| w == DATO1.as_bytes());
    let ok = got == bytes && !has_text;
    Ok(Outcome::new(
        ok,
        format!(
            "the receiver got {} bytes holding the sender's addresses {}, not \"{DATO1}\" and \"{DATO2}\": pointers mean nothing in another process",
            got.len(),
            as_ptrs.join(" and ")
        ),
    ))
}

/// A 4+4 byte header of lengths in network order, then the data, in one `writev`.
fn send_with_header(addr: std::net::SocketAddr, tl: &Timeline) -> anyhow::Result<TcpStream> {
    let client = TcpStream::connect(addr)?;
    let header: Vec<u8> = [DATO1.len() as u32, DATO2.len() as u32]
        .iter()
        .flat_map(|l| l.to_be_bytes())
        .collect();
    let iov = [
        IoSlice::new(&header),
        IoSlice::new(DATO1.as_bytes()),
        IoSlice::new(DATO2.as_bytes()),
    ];
    let r = writev(&client, &iov);
    tl.bytes(
        "sender",
        "writev(s, [htonl(4), htonl(5)], \"hola\", \"mundo\")",
        &r,
    );
    r?;
    Ok(client)
}

/// Variable-size data with a length header in network byte order, read right and wrong.
pub fn length_prefix(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (listener, addr) = scene::listener(tl, "receiver", 2)?;
    let client = send_with_header(addr, tl)?;
    let (conn, _) = listener.accept()?;
    let fd = conn.as_raw_fd();
    let mut header = [0u8; 8];
    let r = recv(fd, &mut header, MsgFlags::MSG_WAITALL);
    tl.call("receiver", "recv(s, &cab, 8, MSG_WAITALL)", &r, |n| {
        format!("= {n}: {}", scene::hex(&header))
    });
    let len1 = u32::from_be_bytes(header[..4].try_into()?) as usize;
    let len2 = u32::from_be_bytes(header[4..].try_into()?) as usize;
    tl.log(
        "receiver",
        "ntohl(cab.long1), ntohl(cab.long2)",
        format!("{len1}, {len2}"),
    );
    let mut d1 = vec![0u8; len1];
    let mut d2 = vec![0u8; len2];
    let r1 = recv(fd, &mut d1, MsgFlags::MSG_WAITALL);
    tl.call(
        "receiver",
        &format!("recv(s, dato1, {len1}, MSG_WAITALL)"),
        &r1,
        |n| format!("= {n} \"{}\"", String::from_utf8_lossy(&d1)),
    );
    let r2 = recv(fd, &mut d2, MsgFlags::MSG_WAITALL);
    tl.call(
        "receiver",
        &format!("recv(s, dato2, {len2}, MSG_WAITALL)"),
        &r2,
        |n| format!("= {n} \"{}\"", String::from_utf8_lossy(&d2)),
    );
    drop((client, conn));

    // Again, with a receiver that forgets ntohl.
    let client = send_with_header(addr, tl)?;
    let (conn, _) = listener.accept()?;
    let fd = conn.as_raw_fd();
    let mut header2 = [0u8; 8];
    recv(fd, &mut header2, MsgFlags::MSG_WAITALL)?;
    let wrong = u32::from_ne_bytes(header2[..4].try_into()?) as usize;
    tl.log("receiver", "cab.long1 without ntohl", format!("{wrong}"));
    drop(client);
    tl.log("sender", "close(s)", "ok");
    // The buffer is allocated zeroed, so untouched pages cost no memory.
    let mut wrong_buf = vec![0u8; wrong.min(1 << 28)];
    let rw = recv(fd, &mut wrong_buf, MsgFlags::MSG_WAITALL);
    tl.call(
        "receiver",
        &format!("recv(s, dato1, {wrong}, MSG_WAITALL)"),
        &rw,
        |n| {
            format!(
                "= {n} (EOF first): \"{}\"",
                String::from_utf8_lossy(&wrong_buf[..*n])
            )
        },
    );
    let right =
        header == [0, 0, 0, 4, 0, 0, 0, 5] && d1 == DATO1.as_bytes() && d2 == DATO2.as_bytes();
    let little = cfg!(target_endian = "little");
    let ok = right && (!little || (wrong == 0x0400_0000 && matches!(rw, Ok(9))));
    Ok(Outcome::new(
        ok,
        format!(
            "the header is {} on the wire and ntohl gives {len1} and {len2}; without ntohl this {}-endian host reads {wrong}, and recv(MSG_WAITALL) only ends at EOF with {}",
            scene::hex(&header),
            if little { "little" } else { "big" },
            match rw {
                Ok(n) => format!("{n} bytes"),
                Err(e) => format!("{e:?}"),
            }
        ),
    ))
}
