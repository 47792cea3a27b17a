//! Datagram sockets: boundaries kept, truncation, the size limit.

use super::{Outcome, Timeline};
use nix::sys::socket::{recv, MsgFlags};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// A receiver and a sender, both on loopback port 0.
fn pair(tl: &Timeline, v6: bool) -> std::io::Result<(UdpSocket, UdpSocket, SocketAddr)> {
    let any: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let receiver = UdpSocket::bind(any)?;
    let addr = receiver.local_addr()?;
    tl.log("receiver", "socket(SOCK_DGRAM); bind()", addr.to_string());
    let sender = UdpSocket::bind(any)?;
    receiver.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok((receiver, sender, addr))
}

/// Two 50-byte datagrams are received as two messages, even with room for 100 bytes.
pub fn dgram_boundaries(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (receiver, sender, addr) = pair(tl, false)?;
    for b in [b'a', b'b'] {
        let r = sender.send_to(&[b; 50], addr);
        tl.bytes(
            "sender",
            &format!("sendto(s, \"{}\"x50, 50)", b as char),
            &r,
        );
        r?;
    }
    std::thread::sleep(Duration::from_millis(20));
    let mut sizes = Vec::new();
    let mut buf = [0u8; 100];
    for _ in 0..2 {
        let r = receiver.recv_from(&mut buf);
        tl.call("receiver", "recvfrom(s, buf, 100)", &r, |(n, _)| {
            format!("= {n} (\"{}\"x{n})", buf[0] as char)
        });
        sizes.push(r?.0);
    }
    receiver.set_nonblocking(true)?;
    let r = receiver.recv_from(&mut buf);
    tl.call(
        "receiver",
        "recvfrom(s, buf, 100) [O_NONBLOCK]",
        &r,
        |(n, _)| format!("= {n}"),
    );
    let ok = sizes == [50, 50] && r.is_err();
    Ok(Outcome::new(
        ok,
        format!("two sendto of 50 bytes came out as two recvfrom of {sizes:?}, never one of 100"),
    ))
}

/// A 100-byte datagram read into 60 bytes: `MSG_TRUNC` reports 100, the other 40 are gone.
pub fn dgram_truncation(tl: &Timeline) -> anyhow::Result<Outcome> {
    let (receiver, sender, addr) = pair(tl, false)?;
    let datagram: Vec<u8> = (0..100u8).map(|i| b'A' + i % 26).collect();
    for _ in 0..2 {
        let r = sender.send_to(&datagram, addr);
        tl.bytes("sender", "sendto(s, buf, 100)", &r);
        r?;
    }
    std::thread::sleep(Duration::from_millis(20));
    let fd = receiver.as_raw_fd();
    let mut buf = [0u8; 60];
    let r1 = recv(fd, &mut buf, MsgFlags::MSG_TRUNC);
    tl.call("receiver", "recv(s, buf, 60, MSG_TRUNC)", &r1, |n| {
        format!("= {n} (real size; 60 copied)")
    });
    let first = buf;
    let r2 = recv(fd, &mut buf, MsgFlags::empty());
    tl.call("receiver", "recv(s, buf, 60)", &r2, |n| {
        format!("= {n}: \"...{}\"", String::from_utf8_lossy(&buf[50..*n]))
    });
    let r3 = recv(fd, &mut buf, MsgFlags::MSG_DONTWAIT);
    tl.bytes("receiver", "recv(s, buf, 60, MSG_DONTWAIT)", &r3);
    let ok = matches!(r1, Ok(100))
        && matches!(r2, Ok(60))
        && first[..] == datagram[..60]
        && r3 == Err(nix::errno::Errno::EAGAIN);
    Ok(Outcome::new(
        ok,
        "recv of 60 bytes got the first 60 of each 100-byte datagram (MSG_TRUNC: real size 100); the last 40 were discarded, nothing is left to read",
    ))
}

/// Find the largest datagram `sender` may send to `addr` by bisection.
fn largest(sender: &UdpSocket, addr: SocketAddr) -> (usize, Option<std::io::Error>) {
    let buf = vec![0u8; 70_000];
    let (mut ok, mut bad) = (1usize, buf.len());
    let mut err = None;
    while bad - ok > 1 {
        let mid = (ok + bad) / 2;
        match sender.send_to(&buf[..mid], addr) {
            Ok(_) => ok = mid,
            Err(e) => {
                bad = mid;
                err = Some(e);
            }
        }
    }
    (ok, err)
}

/// The largest UDP payload: 65535 minus the IP and UDP headers; one byte more fails EMSGSIZE.
pub fn dgram_max_size(tl: &Timeline) -> anyhow::Result<Outcome> {
    tl.setting("/proc/sys/net/core/wmem_default");
    let (receiver, sender, addr) = pair(tl, false)?;
    receiver.set_nonblocking(true)?;
    let (max4, _) = largest(&sender, addr);
    tl.log(
        "lab",
        "bisection over sendto sizes (IPv4)",
        format!("largest = {max4}"),
    );
    // Drop what the bisection sent, then check a maximal datagram arrives whole.
    let mut rbuf = vec![0u8; 70_000];
    while receiver.recv_from(&mut rbuf).is_ok() {}
    let big = vec![7u8; max4 + 1];
    let r = sender.send_to(&big[..max4], addr);
    tl.bytes("sender", &format!("sendto(s, buf, {max4})"), &r);
    let r_over = sender.send_to(&big, addr);
    tl.bytes("sender", &format!("sendto(s, buf, {})", max4 + 1), &r_over);
    std::thread::sleep(Duration::from_millis(20));
    let mut biggest_received = 0;
    while let Ok((n, _)) = receiver.recv_from(&mut rbuf) {
        biggest_received = biggest_received.max(n);
    }
    tl.log(
        "receiver",
        "largest datagram received",
        format!("{biggest_received}"),
    );
    let v4_ok = max4 == 65507
        && r_over.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EMSGSIZE);
    let mut text = format!(
        "IPv4: {max4} bytes (65535 - 20 IP - 8 UDP) is the largest; {} fails {}",
        max4 + 1,
        match &r_over {
            Err(e) => super::timeline::ErrnoName::errno_name(e),
            Ok(_) => "NOT".into(),
        }
    );
    let v6_ok = match pair(tl, true) {
        Ok((_r6, s6, a6)) => {
            let (max6, _) = largest(&s6, a6);
            tl.log(
                "lab",
                "bisection over sendto sizes (IPv6)",
                format!("largest = {max6}"),
            );
            text.push_str(&format!("; IPv6: {max6} (65535 - 8 UDP)"));
            max6 == 65527
        }
        Err(e) => {
            tl.log("lab", "IPv6 loopback", format!("unavailable: {e}"));
            true
        }
    };
    Ok(Outcome::new(
        v4_ok && v6_ok && biggest_received == max4,
        text,
    ))
}
