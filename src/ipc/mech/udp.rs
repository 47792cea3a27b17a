//! `udp`: two UDP sockets on 127.0.0.1, each connected to the other. UDP drops a datagram
//! when the receiver's buffer is full instead of making the sender wait, so stream mode adds
//! the flow control an application must bring itself: the receiver grants a credit every
//! `window` messages and the sender keeps at most two windows in flight.

use crate::ipc::channel::{fit_datagram, Cleanup, LimitError, PacketEnd, Pair, Setup};
use std::net::{Ipv4Addr, UdpSocket};

/// The largest UDP payload over IPv4: 65,535 - 20 (IP header) - 8 (UDP header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Set up both ends.
///
/// # Errors
/// A limit error above 65,507 bytes, or the socket calls' errors.
pub fn open(setup: &Setup) -> anyhow::Result<Pair> {
    let len = setup.message_len();
    if len > MAX_DATAGRAM {
        return Err(LimitError(format!(
            "udp: a datagram carries at most {MAX_DATAGRAM} bytes over IPv4 (65,535 less the IP \
             and UDP headers), so --size is at most {} with socklab's 16-byte header; no setting \
             raises it: use a stream mechanism",
            MAX_DATAGRAM - crate::ipc::message::HEADER
        ))
        .into());
    }
    let a = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let b = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    a.connect(b.local_addr()?)?;
    b.connect(a.local_addr()?)?;
    for s in [&a, &b] {
        fit_datagram(&socket2::SockRef::from(s), len, "udp")?;
    }
    let rcvbuf = socket2::SockRef::from(&b).recv_buffer_size()?;
    // A queued datagram costs the kernel's allocation for it, not its length: on loopback
    // the buffer holding it is rounded up to a power of two, plus about 512 bytes of
    // bookkeeping (a 4 KiB message costs 8.5 KiB). UDP also gives memory back to the socket
    // lazily, in steps of a quarter of the buffer. Keep two windows within half the receive
    // buffer at that cost: with the length plus 1 KiB as the estimate, every 4 KiB stream
    // lost the last message of a window (RcvbufErrors in /proc/net/snmp).
    let cost = (len + 1024).max((len + 576).next_power_of_two() + 512);
    let window = (rcvbuf / (4 * cost)).max(1);
    Ok(Pair {
        a: Box::new(PacketEnd::new(a)),
        b: Box::new(PacketEnd::new(b)),
        cleanup: Cleanup::default(),
        window: Some(window),
        note: format!(
            "UDP over 127.0.0.1, receive buffer {rcvbuf} bytes, credit every {window} messages"
        ),
    })
}
