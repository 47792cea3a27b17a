//! TCP socket states as the kernel reports them, read through `NETLINK_SOCK_DIAG` (what `ss`
//! uses). Messages are built and parsed with `netlink-packet-sock-diag`.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
    SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};
use std::fmt;
use std::io;
use std::net::SocketAddr;

/// A TCP state, numbered as in the kernel's `include/net/tcp_states.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// Data flows both ways.
    Established,
    /// Our SYN is sent, waiting for the SYN-ACK.
    SynSent,
    /// A SYN arrived and was answered; the handshake is not finished for the server.
    SynRecv,
    /// We sent FIN, not yet acknowledged.
    FinWait1,
    /// Our FIN is acknowledged; waiting for the peer's FIN.
    FinWait2,
    /// Both FINs seen, we closed first: waiting 2·MSL before forgetting the connection.
    TimeWait,
    /// Closed.
    Close,
    /// The peer sent FIN; we have not closed yet.
    CloseWait,
    /// We closed after the peer; our FIN is not acknowledged yet.
    LastAck,
    /// A listening socket.
    Listen,
    /// Both sides sent FIN at the same time.
    Closing,
    /// A state number this program does not know.
    Other(u8),
}

impl TcpState {
    /// The state for the kernel's number.
    pub fn from_kernel(n: u8) -> Self {
        match n {
            1 => Self::Established,
            2 => Self::SynSent,
            3 => Self::SynRecv,
            4 => Self::FinWait1,
            5 => Self::FinWait2,
            6 => Self::TimeWait,
            7 => Self::Close,
            8 => Self::CloseWait,
            9 => Self::LastAck,
            10 => Self::Listen,
            11 => Self::Closing,
            // TCP_NEW_SYN_RECV: a request socket, reported as SYN_RECV by `ss` too.
            12 => Self::SynRecv,
            n => Self::Other(n),
        }
    }

    /// The name `ss` and the course use: `ESTABLISHED`, `TIME_WAIT`...
    pub fn name(self) -> String {
        match self {
            Self::Established => "ESTABLISHED".into(),
            Self::SynSent => "SYN_SENT".into(),
            Self::SynRecv => "SYN_RECV".into(),
            Self::FinWait1 => "FIN_WAIT1".into(),
            Self::FinWait2 => "FIN_WAIT2".into(),
            Self::TimeWait => "TIME_WAIT".into(),
            Self::Close => "CLOSE".into(),
            Self::CloseWait => "CLOSE_WAIT".into(),
            Self::LastAck => "LAST_ACK".into(),
            Self::Listen => "LISTEN".into(),
            Self::Closing => "CLOSING".into(),
            Self::Other(n) => format!("STATE_{n}"),
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// A few counters from the kernel's `struct tcp_info` (the `INET_DIAG_INFO` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments carrying data sent so far.
    pub data_segs_out: u32,
    /// Segments sent so far, including the handshake and pure ACKs.
    pub segs_out: u32,
}

/// One TCP socket as `ss` would list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSock {
    /// Local address and port.
    pub local: SocketAddr,
    /// Peer address and port (`0.0.0.0:0` for a listener).
    pub peer: SocketAddr,
    /// The TCP state.
    pub state: TcpState,
    /// For a listener, the accept-queue length; otherwise bytes received but not yet read.
    pub recv_q: u32,
    /// For a listener, the backlog; otherwise bytes sent but not yet acknowledged.
    pub send_q: u32,
    /// Counters from `tcp_info`, when they were asked for and the kernel gave them.
    pub counters: Option<TcpCounters>,
}

impl fmt::Display for TcpSock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.state == TcpState::Listen {
            write!(
                f,
                "LISTEN accept-queue={} backlog={}",
                self.recv_q, self.send_q
            )
        } else {
            write!(
                f,
                "{} recv-q={} send-q={}",
                self.state, self.recv_q, self.send_q
            )
        }
    }
}

/// Why a sock_diag answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// The netlink socket could not be opened or used.
    #[error("sock_diag: {0}")]
    Io(#[from] io::Error),
    /// The kernel's answer did not parse.
    #[error("sock_diag: malformed answer: {0}")]
    Decode(String),
    /// The kernel answered with an error code.
    #[error("sock_diag: kernel answered errno {0}")]
    Kernel(i32),
}

/// The outcome of decoding one buffer of netlink messages.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The sockets the buffer described.
    pub socks: Vec<TcpSock>,
    /// Whether the buffer ended the dump (`NLMSG_DONE`).
    pub done: bool,
}

/// Decode a buffer holding one or more netlink messages of a sock_diag dump.
///
/// # Errors
///
/// [`DiagError::Decode`] when a message does not parse, [`DiagError::Kernel`] for an error
/// message from the kernel.
pub fn decode(mut buf: &[u8]) -> Result<Decoded, DiagError> {
    let mut out = Decoded::default();
    while !buf.is_empty() {
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(buf)
            .map_err(|e| DiagError::Decode(e.to_string()))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                out.socks.push(from_response(&resp));
            }
            NetlinkPayload::Done(_) => {
                out.done = true;
                return Ok(out);
            }
            NetlinkPayload::Error(e) => {
                if let Some(code) = e.code {
                    return Err(DiagError::Kernel(code.get()));
                }
            }
            _ => {}
        }
        // Messages are padded to 4 bytes.
        let step = (len + 3) & !3;
        if len == 0 || step > buf.len() {
            break;
        }
        buf = &buf[step..];
    }
    Ok(out)
}

fn from_response(resp: &InetResponse) -> TcpSock {
    let h = &resp.header;
    let id = &h.socket_id;
    let counters = resp.nlas.iter().find_map(|nla| match nla {
        Nla::TcpInfo(info) => Some(TcpCounters {
            data_segs_out: info.data_segs_out,
            segs_out: info.segs_out,
        }),
        _ => None,
    });
    TcpSock {
        local: SocketAddr::new(id.source_address, id.source_port),
        peer: SocketAddr::new(id.destination_address, id.destination_port),
        state: TcpState::from_kernel(h.state),
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        counters,
    }
}

/// Build the dump request for every TCP socket of one family (`AF_INET` or `AF_INET6`).
pub fn request(family: u8, with_counters: bool) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET6 {
        SocketId::new_v6()
    } else {
        SocketId::new_v4()
    };
    let extensions = if with_counters {
        ExtensionFlags::INFO
    } else {
        ExtensionFlags::empty()
    };
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// Every TCP socket of the family of `like` (IPv4 or IPv6), as the kernel reports them now.
///
/// # Errors
///
/// A [`DiagError`] if netlink cannot be used or answers something unreadable.
pub fn dump(ipv6: bool, with_counters: bool) -> Result<Vec<TcpSock>, DiagError> {
    let family = if ipv6 { AF_INET6 } else { AF_INET };
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    socket.send(&request(family, with_counters), 0)?;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        if n == 0 {
            break;
        }
        let decoded = decode(&buf[..n])?;
        all.extend(decoded.socks);
        if decoded.done {
            break;
        }
    }
    Ok(all)
}

/// The socket with this local address and, if given, this peer; `None` if the kernel lists
/// none (a closed socket, or a bound socket that is not listening).
///
/// # Errors
///
/// A [`DiagError`] if netlink cannot be used.
pub fn find(local: SocketAddr, peer: Option<SocketAddr>) -> Result<Option<TcpSock>, DiagError> {
    find_with(local, peer, false)
}

/// Like [`find`], also asking for the `tcp_info` counters.
///
/// # Errors
///
/// A [`DiagError`] if netlink cannot be used.
pub fn find_with(
    local: SocketAddr,
    peer: Option<SocketAddr>,
    with_counters: bool,
) -> Result<Option<TcpSock>, DiagError> {
    let socks = dump(local.is_ipv6(), with_counters)?;
    Ok(socks
        .into_iter()
        .find(|s| s.local == local && peer.is_none_or(|p| s.peer == p)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::DoneMessage;
    use netlink_packet_sock_diag::inet::{InetResponseHeader, Timer};
    use std::net::{IpAddr, Ipv4Addr};

    fn response(
        state: u8,
        src: u16,
        dst: u16,
        rq: u32,
        sq: u32,
    ) -> NetlinkMessage<SockDiagMessage> {
        let header = InetResponseHeader {
            family: AF_INET,
            state,
            timer: None::<Timer>,
            socket_id: SocketId {
                source_port: src,
                destination_port: dst,
                source_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                destination_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
                interface_id: 0,
                cookie: [0; 8],
            },
            recv_queue: rq,
            send_queue: sq,
            uid: 0,
            inode: 42,
        };
        let resp = InetResponse {
            header,
            nlas: Default::default(),
        };
        let mut nl = NetlinkHeader::default();
        nl.message_type = netlink_packet_sock_diag::SOCK_DIAG_BY_FAMILY;
        let mut msg = NetlinkMessage::new(
            nl,
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(Box::new(resp))),
        );
        msg.finalize();
        msg
    }

    fn bytes(msgs: &[NetlinkMessage<SockDiagMessage>]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in msgs {
            let mut b = vec![0; m.buffer_len()];
            m.serialize(&mut b);
            out.extend(b);
        }
        out
    }

    fn done() -> NetlinkMessage<SockDiagMessage> {
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(DoneMessage::default()),
        );
        m.finalize();
        m
    }

    #[test]
    fn decodes_a_listener_and_a_connection() {
        let buf = bytes(&[response(10, 5000, 0, 3, 2), response(1, 5000, 40000, 7, 0)]);
        let d = decode(&buf).unwrap();
        assert!(!d.done);
        assert_eq!(d.socks.len(), 2);
        assert_eq!(d.socks[0].state, TcpState::Listen);
        assert_eq!(d.socks[0].local, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(d.socks[0].to_string(), "LISTEN accept-queue=3 backlog=2");
        assert_eq!(d.socks[1].state, TcpState::Established);
        assert_eq!(d.socks[1].peer, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(d.socks[1].to_string(), "ESTABLISHED recv-q=7 send-q=0");
        assert_eq!(d.socks[1].counters, None);
    }

    #[test]
    fn done_ends_the_dump() {
        let buf = bytes(&[response(6, 1, 2, 0, 0), done()]);
        let d = decode(&buf).unwrap();
        assert!(d.done);
        assert_eq!(d.socks[0].state, TcpState::TimeWait);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let buf = bytes(&[response(1, 1, 2, 0, 0)]);
        for cut in 1..buf.len() {
            let _ = decode(&buf[..cut]);
        }
        assert!(decode(&buf[..10]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn garbage_after_a_valid_answer_never_mislabels_the_socket(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut buf = bytes(&[response(8, 80, 9000, 0, 0)]);
            buf.extend(tail);
            if let Ok(d) = decode(&buf) {
                proptest::prop_assert_eq!(d.socks[0].state, TcpState::CloseWait);
            }
        }
    }

    #[test]
    fn the_live_kernel_reports_a_listener_and_a_connection_with_counters() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut conn, peer) = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        conn.read_exact(&mut [0u8; 4]).unwrap();
        let l = find(addr, None).unwrap().expect("the listener is listed");
        assert_eq!(l.state, TcpState::Listen);
        let c = find_with(peer, Some(addr), true)
            .unwrap()
            .expect("the client is listed");
        assert_eq!(c.state, TcpState::Established);
        assert!(c.counters.expect("tcp_info asked for").data_segs_out >= 1);
        drop(client);
    }

    #[test]
    fn state_names_follow_the_kernel_numbers() {
        let names: Vec<String> = (1..=12).map(|n| TcpState::from_kernel(n).name()).collect();
        assert_eq!(
            names,
            [
                "ESTABLISHED",
                "SYN_SENT",
                "SYN_RECV",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "TIME_WAIT",
                "CLOSE",
                "CLOSE_WAIT",
                "LAST_ACK",
                "LISTEN",
                "CLOSING",
                "SYN_RECV"
            ]
        );
        assert_eq!(TcpState::from_kernel(99).name(), "STATE_99");
    }

    #[test]
    fn the_request_asks_for_a_dump_of_all_states() {
        // struct nlmsghdr (16 bytes), then struct inet_diag_req_v2.
        let buf = request(AF_INET, true);
        assert_eq!(buf.len(), 16 + 56);
        assert_eq!(u32::from_ne_bytes(buf[..4].try_into().unwrap()), 72);
        assert_eq!(
            u16::from_ne_bytes(buf[4..6].try_into().unwrap()),
            netlink_packet_sock_diag::SOCK_DIAG_BY_FAMILY
        );
        assert_eq!(
            u16::from_ne_bytes(buf[6..8].try_into().unwrap()),
            NLM_F_REQUEST | NLM_F_DUMP
        );
        assert_eq!(buf[16], AF_INET);
        assert_eq!(buf[17], IPPROTO_TCP);
        assert_eq!(buf[18], ExtensionFlags::INFO.bits());
        let states = u32::from_ne_bytes(buf[20..24].try_into().unwrap());
        assert_eq!(states, StateFlags::all().bits());
        assert_eq!(request(AF_INET6, false)[16], AF_INET6);
        assert_eq!(request(AF_INET6, false)[18], 0);
    }
}
