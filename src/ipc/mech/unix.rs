//! `unix` and `unix-dgram`: Unix-domain sockets reached by a path in a private temp
//! directory, as two unrelated programs would meet; the paths are removed once connected.

use crate::ipc::channel::{fit_datagram, Cleanup, PacketEnd, Pair, PrivateDir, Setup, StreamEnd};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};

/// Stream: bind + listen, connect, accept.
///
/// # Errors
/// The socket calls' errors.
pub fn open_stream(_setup: &Setup) -> anyhow::Result<Pair> {
    let mut dir = PrivateDir::new()?;
    let path = dir.path("stream.sock");
    let listener = UnixListener::bind(&path)?;
    let client = UnixStream::connect(&path)?;
    let (server, _) = listener.accept()?;
    drop(listener);
    dir.remove();
    let (c, s): (OwnedFd, OwnedFd) = (client.into(), server.into());
    Ok(Pair {
        a: Box::new(StreamEnd::new(c.try_clone()?, c)),
        b: Box::new(StreamEnd::new(s.try_clone()?, s)),
        cleanup: Cleanup::default(),
        window: None,
        note: "AF_UNIX SOCK_STREAM by path, removed once connected".into(),
    })
}

/// Datagram: two sockets bound to paths, each connected to the other.
///
/// # Errors
/// A limit error for a datagram larger than the socket buffer, or the socket calls' errors.
pub fn open_dgram(setup: &Setup) -> anyhow::Result<Pair> {
    let mut dir = PrivateDir::new()?;
    let (pa, pb) = (dir.path("a.sock"), dir.path("b.sock"));
    let a = UnixDatagram::bind(&pa)?;
    let b = UnixDatagram::bind(&pb)?;
    a.connect(&pb)?;
    b.connect(&pa)?;
    dir.remove();
    for s in [&a, &b] {
        fit_datagram(
            &socket2::SockRef::from(s),
            setup.message_len(),
            "unix-dgram",
        )?;
    }
    Ok(Pair {
        a: Box::new(PacketEnd::new(a)),
        b: Box::new(PacketEnd::new(b)),
        cleanup: Cleanup::default(),
        window: None,
        note: "AF_UNIX SOCK_DGRAM bound to paths, removed once connected".into(),
    })
}
