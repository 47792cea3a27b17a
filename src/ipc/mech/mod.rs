//! The mechanisms, one file each (the shared-memory ring and its wake-ups live in
//! [`super::shm`]). Adding a mechanism is one file with an `open` function and one arm in
//! [`Mechanism`].

pub mod fifo;
pub mod pipe;
pub mod posix_mq;
pub mod socketpair;
pub mod sysv_mq;
pub mod tcp;
pub mod threads;
pub mod udp;
pub mod unix;

use super::channel::{Between, Pair, Setup};
use super::shm::{self, WakeKind};
use crate::client::UsageError;

/// Every IPC mechanism socklab measures, by its name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mechanism {
    /// Two pipes, one per direction (a pipe is one-way).
    Pipe,
    /// Two named pipes (FIFOs) in a private temp directory, removed once open.
    Fifo,
    /// `socketpair(AF_UNIX, SOCK_STREAM)`: one duplex byte stream.
    Socketpair,
    /// `socketpair(AF_UNIX, SOCK_DGRAM)`: datagrams, boundaries kept.
    SocketpairDgram,
    /// `socketpair(AF_UNIX, SOCK_SEQPACKET)`: a connection that keeps message boundaries.
    SocketpairSeqpacket,
    /// A Unix stream socket reached by path (bind, listen, connect, accept).
    Unix,
    /// Two Unix datagram sockets bound to paths and connected to each other.
    UnixDgram,
    /// TCP over 127.0.0.1 with `TCP_NODELAY`.
    Tcp,
    /// TCP over ::1 with `TCP_NODELAY`.
    Tcp6,
    /// UDP over 127.0.0.1 (with credit-based flow control in stream mode: UDP drops).
    Udp,
    /// Two POSIX message queues (`mq_open`), unlinked once open.
    PosixMq,
    /// Two SysV message queues (`msgget`), removed at the end.
    SysvMq,
    /// A shared-memory ring woken with `futex`.
    ShmFutex,
    /// A shared-memory ring woken with `eventfd`.
    ShmEventfd,
    /// A shared-memory ring woken with a signal (SIGUSR1), as in the course's example.
    ShmSignal,
    /// A shared-memory ring woken with a POSIX semaphore in the shared region.
    ShmSem,
    /// A shared-memory ring polled in a busy loop (costs a whole CPU per waiting side).
    ShmSpin,
    /// `std::sync::mpsc::sync_channel` (threads only).
    Mpsc,
    /// `crossbeam_channel::bounded` (threads only).
    Crossbeam,
}

impl Mechanism {
    /// Every mechanism, in the order of the tables.
    pub const ALL: [Mechanism; 19] = [
        Mechanism::Pipe,
        Mechanism::Fifo,
        Mechanism::Socketpair,
        Mechanism::SocketpairDgram,
        Mechanism::SocketpairSeqpacket,
        Mechanism::Unix,
        Mechanism::UnixDgram,
        Mechanism::Tcp,
        Mechanism::Tcp6,
        Mechanism::Udp,
        Mechanism::PosixMq,
        Mechanism::SysvMq,
        Mechanism::ShmFutex,
        Mechanism::ShmEventfd,
        Mechanism::ShmSignal,
        Mechanism::ShmSem,
        Mechanism::ShmSpin,
        Mechanism::Mpsc,
        Mechanism::Crossbeam,
    ];

    /// The name on the command line.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Whether it only exists between threads (a Rust channel).
    pub fn threads_only(self) -> bool {
        matches!(self, Mechanism::Mpsc | Mechanism::Crossbeam)
    }

    /// The mechanisms that work between `between`.
    pub fn available(between: Between) -> Vec<Mechanism> {
        Mechanism::ALL
            .into_iter()
            .filter(|m| between == Between::Threads || !m.threads_only())
            .collect()
    }

    /// Set up both ends.
    ///
    /// # Errors
    /// A [`super::channel::LimitError`] for a size the mechanism cannot carry, a
    /// [`UsageError`] for a channel between processes, or the system call's error.
    pub fn open(self, setup: &Setup) -> anyhow::Result<Pair> {
        if self.threads_only() && setup.between == Between::Processes {
            return Err(UsageError(format!(
                "{} carries messages between threads only: add --between threads",
                self.name()
            ))
            .into());
        }
        use nix::sys::socket::SockType;
        match self {
            Mechanism::Pipe => pipe::open(setup),
            Mechanism::Fifo => fifo::open(setup),
            Mechanism::Socketpair => socketpair::open(setup, SockType::Stream),
            Mechanism::SocketpairDgram => socketpair::open(setup, SockType::Datagram),
            Mechanism::SocketpairSeqpacket => socketpair::open(setup, SockType::SeqPacket),
            Mechanism::Unix => unix::open_stream(setup),
            Mechanism::UnixDgram => unix::open_dgram(setup),
            Mechanism::Tcp => tcp::open(setup, false),
            Mechanism::Tcp6 => tcp::open(setup, true),
            Mechanism::Udp => udp::open(setup),
            Mechanism::PosixMq => posix_mq::open(setup),
            Mechanism::SysvMq => sysv_mq::open(setup),
            Mechanism::ShmFutex => shm::open(setup, WakeKind::Futex),
            Mechanism::ShmEventfd => shm::open(setup, WakeKind::Eventfd),
            Mechanism::ShmSignal => shm::open(setup, WakeKind::Signal),
            Mechanism::ShmSem => shm::open(setup, WakeKind::Sem),
            Mechanism::ShmSpin => shm::open(setup, WakeKind::Spin),
            Mechanism::Mpsc => threads::open_mpsc(setup),
            Mechanism::Crossbeam => threads::open_crossbeam(setup),
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Mechanism {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}
