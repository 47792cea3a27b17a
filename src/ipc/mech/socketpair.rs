//! `socketpair`, `socketpair-dgram`, `socketpair-seqpacket`: one `socketpair(AF_UNIX)` whose
//! two sockets are the two ends. Unlike a pipe it is duplex (seed 001). The stream type needs
//! the length framing; datagram and seqpacket keep each message's boundary.

use crate::ipc::channel::{fit_datagram, Cleanup, End, PacketEnd, Pair, Setup, StreamEnd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// Set up both ends, of socket type `ty`.
///
/// # Errors
/// A limit error for a datagram larger than the socket buffer, or `socketpair`'s errno.
pub fn open(setup: &Setup, ty: SockType) -> anyhow::Result<Pair> {
    let (x, y) = socketpair(AddressFamily::Unix, ty, None, SockFlag::SOCK_CLOEXEC)?;
    let (a, b): (Box<dyn End>, Box<dyn End>) = match ty {
        SockType::Stream => (
            Box::new(StreamEnd::new(x.try_clone()?, x)),
            Box::new(StreamEnd::new(y.try_clone()?, y)),
        ),
        _ => {
            let what = if ty == SockType::Datagram {
                "socketpair-dgram"
            } else {
                "socketpair-seqpacket"
            };
            for s in [&x, &y] {
                fit_datagram(&socket2::SockRef::from(s), setup.message_len(), what)?;
            }
            (Box::new(PacketEnd::new(x)), Box::new(PacketEnd::new(y)))
        }
    };
    Ok(Pair {
        a,
        b,
        cleanup: Cleanup::default(),
        window: None,
        note: format!("socketpair(AF_UNIX, {ty:?})"),
    })
}
