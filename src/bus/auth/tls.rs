//! TLS with `rustls`: configurations from PEM files, a non-blocking server side for the
//! broker's event loops, a blocking client stream for `bus pub/sub/bench`, and the
//! client certificate's subject as a user name.
//!
//! The server side, [`TlsConn`], keeps the event loop's contract for a plain socket:
//! [`TlsConn::recv`] answers plaintext bytes, `Ok(0)` at the end, `WouldBlock` when the
//! socket has nothing more -- and a short read still means the socket was drained (it reads
//! ciphertext until the buffer is full or the socket would block), which edge-triggered
//! epoll relies on. [`TlsConn::send`] takes plaintext into rustls (whose buffer is capped at
//! 64 KiB, so a peer that does not read backs up into the session's output buffer, where
//! the loop's caps apply) and writes what it can; [`TlsConn::flush`] writes what rustls
//! still holds (handshake messages, alerts, records) when the socket is writable again.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use socket2::Socket;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

/// How a verified client certificate names its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum CertIdentity {
    /// The subject's common name (mosquitto's `use_identity_as_username`).
    #[default]
    Cn,
    /// The whole subject, as `CN=alice, O=Example` (mosquitto's `use_subject_as_username`).
    Subject,
    /// Certificates are checked, but the user name and password come from CONNECT.
    None,
}

fn pem_err(what: &str, path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(crate::client::UsageError(format!(
        "{what} {}: {e}",
        path.display()
    )))
}

/// The certificates of a PEM file (a chain, or the CAs to trust).
///
/// # Errors
/// A missing or unreadable file, or one without a certificate.
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err("cannot read certificates from", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("bad certificate in", path, e))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate in", path, "(expected PEM)"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// A missing or unreadable file, or one without a key.
pub fn load_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err("no usable private key in", path, e))
}

fn roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| pem_err("unusable CA certificate in", path, e))?;
    }
    Ok(roots)
}

/// The server's configuration: its certificate chain and key, and, with `client_ca`,
/// client certificates required and verified against those CAs.
///
/// # Errors
/// Unreadable or mismatched files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots(ca)?))
                .build()
                .map_err(|e| pem_err("cannot verify clients with", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder.with_single_cert(chain, key).map_err(|e| {
        anyhow::Error::new(crate::client::UsageError(format!(
            "certificate {} and its key do not go together: {e}",
            cert.display()
        )))
    })?;
    Ok(Arc::new(cfg))
}

/// What a client trusts and shows.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificates to trust (PEM); none: the system's.
    pub cafile: Option<std::path::PathBuf>,
    /// A client certificate chain to show (PEM).
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    pub key: Option<std::path::PathBuf>,
}

/// A client configuration.
///
/// # Errors
/// Unreadable files, a certificate without its key, no usable system CAs.
pub fn client_config(o: &ClientTls) -> anyhow::Result<Arc<ClientConfig>> {
    let roots = match &o.cafile {
        Some(p) => roots(p)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            for c in found.certs {
                let _ = roots.add(c);
            }
            if roots.is_empty() {
                return Err(crate::client::UsageError(
                    "no system CA certificates found: give --cafile".into(),
                )
                .into());
            }
            roots
        }
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let cfg = match (&o.cert, &o.key) {
        (Some(c), Some(k)) => builder
            .with_client_auth_cert(load_certs(c)?, load_key(k)?)
            .map_err(|e| pem_err("client certificate", c, e))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(crate::client::UsageError("--cert and --key go together".into()).into()),
    };
    Ok(Arc::new(cfg))
}

/// The user name a verified client certificate gives (`None` if there is no certificate,
/// the mode is [`CertIdentity::None`], or the certificate has no common name).
pub fn cert_user(cert: &CertificateDer<'_>, mode: CertIdentity) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    match mode {
        CertIdentity::None => None,
        CertIdentity::Cn => c
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        CertIdentity::Subject => Some(c.subject().to_string()),
    }
}

/// One TLS connection over a non-blocking socket: the broker's side of a client's, or a
/// client's (the load generator drives many at once).
#[derive(Debug)]
pub struct TlsConn {
    conn: rustls::Connection,
    /// The peer closed (TCP end or close_notify).
    eof: bool,
}

impl TlsConn {
    /// A connection that has yet to shake hands.
    ///
    /// # Errors
    /// rustls refused the configuration.
    pub fn new(cfg: &Arc<ServerConfig>) -> io::Result<TlsConn> {
        let conn = ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
        Ok(TlsConn {
            conn: conn.into(),
            eof: false,
        })
    }

    /// A client connection, handshake done or under way (from [`Stream::into_parts`]).
    pub fn client(conn: ClientConnection) -> TlsConn {
        TlsConn {
            conn: conn.into(),
            eof: false,
        }
    }

    /// Whether the handshake is still going on.
    pub fn handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The user name the client's certificate gives.
    pub fn peer_user(&self, mode: CertIdentity) -> Option<String> {
        self.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| cert_user(c, mode))
    }

    /// Read plaintext into `buf`: `Ok(0)` at the end, `WouldBlock` when nothing more has
    /// arrived; a short read means the socket would block (or ended).
    ///
    /// # Errors
    /// I/O errors, and TLS errors as `InvalidData` (after the alert was sent if possible).
    pub fn recv(&mut self, sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        loop {
            while got < buf.len() {
                match self.conn.reader().read(&mut buf[got..]) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The peer closed without close_notify: an end like any other.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.eof = true;
                        break;
                    }
                    Err(e) => return if got > 0 { Ok(got) } else { Err(e) },
                }
            }
            if got == buf.len() || self.eof {
                return Ok(got);
            }
            let mut s = sock;
            match self.conn.read_tls(&mut s) {
                Ok(0) => self.eof = true,
                Ok(_) => {
                    if let Err(e) = self.conn.process_new_packets() {
                        // Tell the peer why, if the socket takes it.
                        let _ = self.flush(sock);
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                    if self.conn.wants_write() {
                        match self.flush(sock) {
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
                            _ => {}
                        }
                    }
                }
                Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(got),
                Err(e) => return Err(e),
            }
        }
    }

    /// Take plaintext to send; returns how much was taken (`WouldBlock` if none could be:
    /// rustls's buffer is full and the socket takes nothing).
    ///
    /// # Errors
    /// I/O errors other than `WouldBlock` after some was taken.
    pub fn send(&mut self, sock: &Socket, data: &[u8]) -> io::Result<usize> {
        let mut taken = 0;
        loop {
            taken += self.conn.writer().write(&data[taken..])?;
            match self.flush(sock) {
                Ok(()) if taken < data.len() => continue,
                Ok(()) => return Ok(taken),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && taken > 0 => return Ok(taken),
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether rustls holds bytes for the socket.
    pub fn pending(&self) -> bool {
        self.conn.wants_write()
    }

    /// Write what rustls holds.
    ///
    /// # Errors
    /// `WouldBlock` if some is left; I/O errors.
    pub fn flush(&mut self, sock: &Socket) -> io::Result<()> {
        let mut s = sock;
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut s)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Queue a close_notify (sent by the next flush).
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }
}

/// A blocking client connection: plain or TLS.
#[derive(Debug)]
pub enum Stream {
    /// A plain socket.
    Plain(Socket),
    /// TLS over a socket.
    Tls(Box<rustls::StreamOwned<ClientConnection, Socket>>),
}

impl Stream {
    /// TLS over `sock`, checking the server's certificate against `host` (a name or an IP
    /// address). The handshake happens with the first read or write.
    ///
    /// # Errors
    /// A host that is not a valid server name.
    pub fn tls(sock: Socket, cfg: Arc<ClientConfig>, host: &str) -> anyhow::Result<Stream> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            crate::client::UsageError(format!(
                "{host:?} cannot be checked against a certificate: {e}"
            ))
        })?;
        let conn = ClientConnection::new(cfg, name)?;
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, sock))))
    }

    /// The socket and, for TLS, the connection state, to be driven without blocking.
    pub fn into_parts(self) -> (Socket, Option<TlsConn>) {
        match self {
            Stream::Plain(s) => (s, None),
            Stream::Tls(t) => {
                let rustls::StreamOwned { conn, sock } = *t;
                (sock, Some(TlsConn::client(conn)))
            }
        }
    }

    /// The socket underneath (for timeouts and shutdown).
    pub fn socket(&self) -> &Socket {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.sock,
        }
    }

    /// Send close_notify (TLS) and shut the socket's sending side.
    pub fn shutdown(&mut self) {
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.conn.complete_io(&mut t.sock);
        }
        let _ = self.socket().shutdown(std::net::Shutdown::Write);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use std::time::Duration;

    /// A CA, a server certificate for 127.0.0.1/localhost, and a client certificate for
    /// `alice`, written as PEM files into `dir`.
    fn pki(dir: &Path) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(vec![]).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, cn: &str, file: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(names).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.distinguished_name
                .push(DnType::OrganizationName, "socklab tests");
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        };
        std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
        leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "server",
            "server",
        );
        leaf(vec![], "alice", "alice");
    }

    /// A blocking socket pair over loopback TCP.
    fn pair() -> (Socket, Socket) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (Socket::from(c), Socket::from(s))
    }

    /// Drive the server side on its own thread: echo plaintext back, upper-cased.
    fn serve(mut conn: TlsConn, sock: Socket) -> std::thread::JoinHandle<Option<String>> {
        sock.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 7]; // small: many short reads
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut user = None;
            while std::time::Instant::now() < deadline {
                match conn.recv(&sock, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        user = conn.peer_user(CertIdentity::Cn);
                        let up = buf[..n].to_ascii_uppercase();
                        let mut off = 0;
                        while off < up.len() {
                            match conn.send(&sock, &up[off..]) {
                                Ok(k) => off += k,
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    std::thread::sleep(Duration::from_millis(1))
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let _ = conn.flush(&sock);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => return None,
                }
            }
            while conn.pending() {
                let _ = conn.flush(&sock);
            }
            user
        })
    }

    #[test]
    fn round_trip_with_client_certificate_as_user() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let d = dir.path();
        let scfg = server_config(
            &d.join("server.pem"),
            &d.join("server.key"),
            Some(&d.join("ca.pem")),
        )
        .unwrap();
        let ccfg = client_config(&ClientTls {
            cafile: Some(d.join("ca.pem")),
            cert: Some(d.join("alice.pem")),
            key: Some(d.join("alice.key")),
        })
        .unwrap();
        let (c, s) = pair();
        let server = serve(TlsConn::new(&scfg).unwrap(), s);
        let mut client = Stream::tls(c, ccfg, "127.0.0.1").unwrap();
        let msg = b"hello over tls, in pieces longer than the server's buffer".repeat(50);
        client.write_all(&msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.to_ascii_uppercase());
        client.shutdown();
        assert_eq!(server.join().unwrap().as_deref(), Some("alice"));
    }

    #[test]
    fn unknown_ca_and_plain_bytes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let d = dir.path();
        let scfg = server_config(&d.join("server.pem"), &d.join("server.key"), None).unwrap();
        // A client trusting another CA.
        let other = tempfile::tempdir().unwrap();
        pki(other.path());
        let ccfg = client_config(&ClientTls {
            cafile: Some(other.path().join("ca.pem")),
            ..Default::default()
        })
        .unwrap();
        let (c, s) = pair();
        let server = serve(TlsConn::new(&scfg).unwrap(), s);
        let mut client = Stream::tls(c, ccfg, "127.0.0.1").unwrap();
        let e = client.write_all(b"x").unwrap_err();
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
        drop(client);
        assert_eq!(server.join().unwrap(), None);
        // Plain MQTT bytes (a CONNECT) on the TLS side.
        let (c, s) = pair();
        let server = serve(TlsConn::new(&scfg).unwrap(), s);
        (&c).write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0])
            .unwrap();
        assert_eq!(server.join().unwrap(), None, "refused as a TLS error");
        let mut rest = Vec::new();
        let _ = (&c).read_to_end(&mut rest);
        assert!(
            rest.first() == Some(&21) || rest.is_empty(),
            "an alert or nothing"
        );
    }

    #[test]
    fn bad_files_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let d = dir.path();
        let e = server_config(&d.join("missing.pem"), &d.join("server.key"), None).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = server_config(&d.join("server.pem"), &d.join("alice.key"), None).unwrap_err();
        assert!(e.to_string().contains("do not go together"), "{e}");
        let e = server_config(&d.join("server.key"), &d.join("server.key"), None).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = client_config(&ClientTls {
            cafile: Some(d.join("ca.pem")),
            cert: Some(d.join("alice.pem")),
            key: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
    }

    #[test]
    fn subject_and_cn_identities() {
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let cert = load_certs(&dir.path().join("alice.pem")).unwrap().remove(0);
        assert_eq!(cert_user(&cert, CertIdentity::Cn).as_deref(), Some("alice"));
        let subject = cert_user(&cert, CertIdentity::Subject).unwrap();
        assert!(
            subject.contains("CN=alice") && subject.contains("O=socklab tests"),
            "{subject}"
        );
        assert_eq!(cert_user(&cert, CertIdentity::None), None);
    }
}
