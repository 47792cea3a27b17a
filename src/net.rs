//! Addresses and sockets: resolving (`AF_UNSPEC`, like `getaddrinfo`), listeners for TCP over
//! IPv4/IPv6 and Unix stream sockets, UDP sockets, and client connections.
//!
//! Every socket is made close-on-exec in the same call that creates it.

use socket2::{Domain, SockAddr, Socket, Type};
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a server listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A host (name or literal) and port, resolved with `AF_UNSPEC`.
    Inet(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Inet(a) => f.write_str(a),
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Errors opening a listener or connection, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address could not be parsed or resolved.
    #[error("cannot resolve {addr:?}: {reason}")]
    Resolve {
        /// What the user gave.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// `bind`/`listen` failed (port in use, permission, no such address).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address tried.
        addr: String,
        /// The system error.
        source: io::Error,
    },
    /// Every resolved address refused or failed the connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The last system error.
        source: io::Error,
    },
}

/// Resolve `host:port` (a literal like `127.0.0.1:7000` or `[::1]:7000`, or a name like
/// `localhost:7000`) into every address it names, IPv4 and IPv6 alike (`AF_UNSPEC`).
///
/// # Errors
/// [`NetError::Resolve`] when the text is not `host:port` or the name does not resolve.
pub fn resolve(addr: &str) -> Result<Vec<SocketAddr>, NetError> {
    let err = |reason: String| NetError::Resolve {
        addr: addr.to_string(),
        reason,
    };
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(vec![a]);
    }
    if !addr.contains(':') {
        return Err(err("expected HOST:PORT, e.g. 127.0.0.1:7000".into()));
    }
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(err("no addresses".into()));
    }
    Ok(addrs)
}

/// A human form of a socket address: `127.0.0.1:7000`, `[::1]:7000`, a Unix path, or
/// `(unnamed)` for an unbound Unix peer.
pub fn display_addr(addr: &SockAddr) -> String {
    if let Some(a) = addr.as_socket() {
        a.to_string()
    } else if let Some(p) = addr.as_pathname() {
        p.display().to_string()
    } else {
        "(unnamed)".to_string()
    }
}

/// Options for opening a listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenOptions {
    /// `listen(2)` backlog.
    pub backlog: i32,
    /// Open the first listener of an `SO_REUSEPORT` group (the reactors model): the port
    /// is taken exclusively, and only then opened to the group's siblings
    /// ([`Listener::sibling`]). Why: see the comment on `listen_inet` in this file.
    pub reuse_port: bool,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            backlog: 1024,
            reuse_port: false,
        }
    }
}

/// A listening socket, with the address it really bound, and for a Unix socket the path,
/// which is removed when the listener is dropped in the process that created it.
#[derive(Debug)]
pub struct Listener {
    /// The socket (non-blocking: accept loops wait with `poll`/`epoll` first).
    pub socket: Socket,
    /// The bound address as printed: `127.0.0.1:40123`, `[::1]:40123` or the Unix path.
    pub local: String,
    /// The socket address bound (to open more listeners on the same port).
    pub addr: SockAddr,
    unix_path: Option<(PathBuf, u32)>,
}

impl Listener {
    /// Open a listener on `endpoint`: the first resolved address that binds wins.
    ///
    /// # Errors
    /// [`NetError`] for unresolvable names or a failed bind/listen (e.g. port in use).
    pub fn open(endpoint: &Endpoint, opts: ListenOptions) -> Result<Listener, NetError> {
        match endpoint {
            Endpoint::Inet(a) => {
                let addrs = resolve(a)?;
                let mut last = None;
                for addr in addrs {
                    match listen_inet(&addr, opts, false) {
                        Ok(l) => return Ok(l),
                        Err(e) => last = Some((addr, e)),
                    }
                }
                let (addr, source) = last.expect("resolve returns at least one address");
                Err(NetError::Listen {
                    addr: addr.to_string(),
                    source,
                })
            }
            Endpoint::Unix(p) => listen_unix(p, opts).map_err(|source| NetError::Listen {
                addr: p.display().to_string(),
                source,
            }),
        }
    }

    /// Open another listener on exactly the address this one bound (same port), for
    /// `SO_REUSEPORT` sharing.
    ///
    /// # Errors
    /// The bind/listen error.
    pub fn sibling(&self, opts: ListenOptions) -> io::Result<Listener> {
        let addr = self
            .addr
            .as_socket()
            .ok_or_else(|| io::Error::other("SO_REUSEPORT siblings need an IP listener"))?;
        listen_inet(&addr, opts, true)
    }

    /// Whether this is a Unix socket listener.
    pub fn is_unix(&self) -> bool {
        self.unix_path.is_some()
    }

    /// A second handle on the same listening socket (`dup`), e.g. for another thread's loop.
    ///
    /// # Errors
    /// `dup`'s errno.
    pub fn try_clone(&self) -> io::Result<Socket> {
        self.socket.try_clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, pid)) = &self.unix_path {
            // A forked child drops its copy too: only the creating process removes the file.
            if *pid == std::process::id() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Open a TCP listener on `addr`. With `opts.reuse_port`, the first listener of an
/// `SO_REUSEPORT` group (`sibling` false) or one more member of it (`sibling` true).
///
/// Why the first one takes the port without `SO_REUSEPORT`: the kernel lets any socket with
/// `SO_REUSEPORT` of the same user join a group whose members have it set, so a second,
/// unrelated server started on a busy port (say `serve echo` where `serve http` runs) would
/// start too, and new connections would be split between the two. So the first listener
/// binds and listens *without* it: that fails with `EADDRINUSE` if anything already listens
/// there, whatever its options, exactly as for every other model -- and listening first
/// also closes the race between two servers starting at once (two `SO_REUSEADDR` sockets may
/// both bind a port, but only one of them can listen without `SO_REUSEPORT`). Only then is
/// `SO_REUSEPORT` turned on, for the siblings to join; they share the first one's group and
/// the kernel spreads new connections across all of them. Every socklab server therefore
/// refuses a port a reactors server holds. A foreign program that itself sets
/// `SO_REUSEPORT`, run by the same user, can still join (the kernel's rule; clearing the
/// flag on the group afterwards does not stop it, because the port's bind bucket caches
/// "reuseport allowed" for that user, and it would stop the kernel spreading connections
/// across the loops, measured: 0/0/60 of 60 connections instead of 24/18/18).
fn listen_inet(addr: &SocketAddr, opts: ListenOptions, sibling: bool) -> io::Result<Listener> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    socket.set_reuse_address(true)?;
    if opts.reuse_port && sibling {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&(*addr).into())?;
    socket.listen(opts.backlog)?;
    if opts.reuse_port && !sibling {
        socket.set_reuse_port(true)?;
    }
    let bound = socket.local_addr()?;
    Ok(Listener {
        local: display_addr(&bound),
        addr: bound,
        socket,
        unix_path: None,
    })
}

fn listen_unix(path: &Path, opts: ListenOptions) -> io::Result<Listener> {
    remove_stale_socket(path)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM.nonblocking().cloexec(), None)?;
    let addr = SockAddr::unix(path)?;
    socket.bind(&addr)?;
    socket.listen(opts.backlog)?;
    Ok(Listener {
        local: path.display().to_string(),
        addr,
        socket,
        unix_path: Some((path.to_path_buf(), std::process::id())),
    })
}

/// A socket file left behind by a server that died is replaced; a live server's socket, or
/// a file that is not a socket, is left alone and reported.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a server is listening there",
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Bind a UDP socket (or a Unix datagram socket) on `endpoint`.
///
/// # Errors
/// [`NetError`] for unresolvable names or a failed bind.
pub fn bind_udp(endpoint: &Endpoint) -> Result<(Socket, String), NetError> {
    let addrs = match endpoint {
        Endpoint::Inet(a) => resolve(a)?,
        Endpoint::Unix(p) => {
            return Err(NetError::Listen {
                addr: p.display().to_string(),
                source: io::Error::other("datagram services are served over UDP only"),
            })
        }
    };
    let mut last = None;
    for addr in addrs {
        let r = (|| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM.cloexec(), None)?;
            s.bind(&addr.into())?;
            let local = display_addr(&s.local_addr()?);
            Ok::<_, io::Error>((s, local))
        })();
        match r {
            Ok(ok) => return Ok(ok),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, source) = last.expect("at least one address");
    Err(NetError::Listen {
        addr: addr.to_string(),
        source,
    })
}

/// Connect a stream socket to `endpoint`, trying each resolved address in turn (the
/// `getaddrinfo` loop of the course). The socket is blocking.
///
/// # Errors
/// [`NetError`] when nothing resolves or every address fails.
pub fn connect(endpoint: &Endpoint) -> Result<Socket, NetError> {
    connect_within(endpoint, None)
}

/// [`connect`], giving each address at most `timeout` to answer (`None`: the kernel's own
/// limit, about two minutes for TCP).
///
/// # Errors
/// [`NetError`] when nothing resolves or every address fails or times out.
pub fn connect_within(endpoint: &Endpoint, timeout: Option<Duration>) -> Result<Socket, NetError> {
    match endpoint {
        Endpoint::Inet(a) => {
            let mut last = None;
            for addr in resolve(a)? {
                let r = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)
                    .and_then(|s| {
                        match timeout {
                            Some(t) => s.connect_timeout(&addr.into(), t),
                            None => s.connect(&addr.into()),
                        }
                        .map(|_| s)
                    });
                match r {
                    Ok(s) => {
                        let _ = s.set_tcp_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = Some((addr, e)),
                }
            }
            let (addr, source) = last.expect("at least one address");
            Err(NetError::Connect {
                addr: addr.to_string(),
                source,
            })
        }
        Endpoint::Unix(p) => {
            let r = Socket::new(Domain::UNIX, Type::STREAM.cloexec(), None)
                .and_then(|s| SockAddr::unix(p).and_then(|a| s.connect(&a)).map(|_| s));
            r.map_err(|source| NetError::Connect {
                addr: p.display().to_string(),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_literals_and_names() {
        assert_eq!(resolve("127.0.0.1:7").unwrap()[0].port(), 7);
        assert!(resolve("[::1]:7").unwrap()[0].is_ipv6());
        assert!(!resolve("localhost:7").unwrap().is_empty());
        assert!(matches!(resolve("nonsense"), Err(NetError::Resolve { .. })));
    }

    #[test]
    fn port_zero_reports_the_real_port_and_port_in_use_is_an_error() {
        let l = Listener::open(&Endpoint::Inet("127.0.0.1:0".into()), Default::default()).unwrap();
        assert!(!l.local.ends_with(":0"), "{}", l.local);
        let again = Listener::open(&Endpoint::Inet(l.local.clone()), Default::default());
        assert!(matches!(again, Err(NetError::Listen { .. })));
    }

    #[test]
    fn a_reuseport_group_spreads_and_keeps_other_servers_out() {
        use std::net::TcpStream;
        let ep = Endpoint::Inet("127.0.0.1:0".into());
        let group = ListenOptions {
            reuse_port: true,
            ..Default::default()
        };
        let first = Listener::open(&ep, group).unwrap();
        let second = first.sibling(group).unwrap();
        let busy = Endpoint::Inet(first.local.clone());
        // Neither another group's first listener nor a plain one gets in.
        for opts in [group, ListenOptions::default()] {
            assert!(matches!(
                Listener::open(&busy, opts),
                Err(NetError::Listen { .. })
            ));
        }
        // The kernel still spreads connections across the group.
        let clients: Vec<TcpStream> = (0..64)
            .map(|_| TcpStream::connect(&first.local).unwrap())
            .collect();
        let accepted = |l: &Listener| std::iter::from_fn(|| l.socket.accept().ok()).count();
        let (a, b) = (accepted(&first), accepted(&second));
        assert_eq!(a + b, clients.len());
        assert!(a > 0 && b > 0, "{a} / {b}");
    }

    #[test]
    fn stale_unix_socket_is_replaced_live_one_and_plain_file_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let ep = Endpoint::Unix(path.clone());
        let live = Listener::open(&ep, Default::default()).unwrap();
        assert!(
            Listener::open(&ep, Default::default()).is_err(),
            "live server kept"
        );
        drop(live);
        assert!(!path.exists(), "removed on drop");
        // A server that died leaves its file behind (std does not remove it).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        assert!(Listener::open(&ep, Default::default()).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(Listener::open(&Endpoint::Unix(file.clone()), Default::default()).is_err());
        assert!(file.exists());
    }
}
