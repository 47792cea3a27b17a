//! `tcp` and `tcp6`: a TCP connection over loopback (127.0.0.1 or ::1), `TCP_NODELAY` on both
//! sides so a small message leaves at once instead of waiting for Nagle's algorithm.

use crate::ipc::channel::{Cleanup, Pair, Setup, StreamEnd};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

/// Set up both ends (listen on port 0, connect, accept).
///
/// # Errors
/// The socket calls' errors (for `tcp6`, a machine without IPv6 on loopback).
pub fn open(_setup: &Setup, v6: bool) -> anyhow::Result<Pair> {
    let any: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let listener = TcpListener::bind(any)?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (c, s): (OwnedFd, OwnedFd) = (client.into(), server.into());
    Ok(Pair {
        a: Box::new(StreamEnd::new(c.try_clone()?, c)),
        b: Box::new(StreamEnd::new(s.try_clone()?, s)),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("TCP over {}, TCP_NODELAY", any.ip()),
    })
}
