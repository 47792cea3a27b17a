//! `posix-mq`: two POSIX message queues (`mq_open`), one per direction, unlinked as soon as
//! both ends hold them open. A message larger than `fs.mqueue.msgsize_max` is refused with
//! the limit named (privileged processes may exceed it; socklab holds to it, so the table
//! shows what an ordinary user gets).

use crate::ipc::channel::{errno, proc_value, Cleanup, End, LimitError, Pair, Setup};
use nix::mqueue::{mq_close, mq_open, mq_receive, mq_send, mq_unlink, MQ_OFlag, MqAttr, MqdT};
use nix::sys::stat::Mode;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

const MSGSIZE_MAX: &str = "/proc/sys/fs/mqueue/msgsize_max";
const MSG_MAX: &str = "/proc/sys/fs/mqueue/msg_max";

/// An open queue descriptor, closed on drop.
#[derive(Debug)]
pub struct Queue(Option<MqdT>);

impl Queue {
    fn get(&self) -> &MqdT {
        self.0.as_ref().expect("open until dropped")
    }

    /// `mq_send` one message (priority 0), waiting while the queue is full.
    ///
    /// # Errors
    /// The errno; `EINTR` as Interrupted.
    pub fn send(&self, msg: &[u8]) -> io::Result<()> {
        mq_send(self.get(), msg, 0).map_err(errno)
    }

    /// `mq_receive` the oldest message into `buf` (at least the queue's message size).
    ///
    /// # Errors
    /// The errno; `EINTR` as Interrupted.
    pub fn receive(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut prio = 0;
        mq_receive(self.get(), buf, &mut prio).map_err(errno)
    }
}

// A queue descriptor may be used by several threads at once (the producer/consumer buffer
// does): mq_send and mq_receive are system calls the kernel serialises.

impl Drop for Queue {
    fn drop(&mut self) {
        if let Some(q) = self.0.take() {
            let _ = mq_close(q);
        }
    }
}

/// The largest message the queues may carry here, and the messages each may hold.
pub fn limits() -> (usize, usize) {
    (
        proc_value(MSGSIZE_MAX).unwrap_or(8192),
        proc_value(MSG_MAX).unwrap_or(10),
    )
}

/// Check that a `len`-byte message fits under `fs.mqueue.msgsize_max`.
///
/// # Errors
/// A [`LimitError`] naming the limit.
pub fn check(len: usize, what: &str) -> anyhow::Result<()> {
    let (max, _) = limits();
    if len > max {
        return Err(LimitError(format!(
            "{what}: a POSIX message queue carries at most {max} bytes per message \
             (fs.mqueue.msgsize_max), so --size is at most {} with socklab's 16-byte header; \
             raise it with `sysctl fs.mqueue.msgsize_max={len}`",
            max.saturating_sub(crate::ipc::message::HEADER)
        ))
        .into());
    }
    Ok(())
}

static QUEUES: AtomicU32 = AtomicU32::new(0);

/// Create a queue of `depth` messages of `len` bytes, open it twice (one descriptor per end)
/// and unlink its name at once.
///
/// # Errors
/// `mq_open`'s errno.
pub fn queue_pair(len: usize, depth: usize, tag: &str) -> anyhow::Result<(Queue, Queue)> {
    let name = format!(
        "/socklab-{}-{}-{tag}",
        std::process::id(),
        QUEUES.fetch_add(1, Ordering::SeqCst)
    );
    let attr = MqAttr::new(0, depth as _, len as _, 0);
    let flags = MQ_OFlag::O_CREAT | MQ_OFlag::O_EXCL | MQ_OFlag::O_RDWR | MQ_OFlag::O_CLOEXEC;
    let first = mq_open(
        name.as_str(),
        flags,
        Mode::S_IRUSR | Mode::S_IWUSR,
        Some(&attr),
    );
    let first = Queue(Some(first.map_err(|e| {
        anyhow::anyhow!("mq_open({name}, {depth} messages of {len} bytes): {e}")
    })?));
    let second = mq_open(
        name.as_str(),
        MQ_OFlag::O_RDWR | MQ_OFlag::O_CLOEXEC,
        Mode::empty(),
        None,
    );
    let _ = mq_unlink(name.as_str());
    Ok((first, Queue(Some(second?))))
}

/// One end: it sends on one queue and receives on the other.
#[derive(Debug)]
pub struct MqEnd {
    tx: Queue,
    rx: Queue,
}

impl End for MqEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.tx.send(msg)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.rx.receive(buf)
    }
}

/// Set up both ends.
///
/// # Errors
/// A [`LimitError`] above `msgsize_max`, or `mq_open`'s errno.
pub fn open(setup: &Setup) -> anyhow::Result<Pair> {
    let len = setup.message_len();
    check(len, "posix-mq")?;
    let depth = limits().1.clamp(1, 10);
    let (ab_tx, ab_rx) = queue_pair(len, depth, "ab")?;
    let (ba_tx, ba_rx) = queue_pair(len, depth, "ba")?;
    Ok(Pair {
        a: Box::new(MqEnd {
            tx: ab_tx,
            rx: ba_rx,
        }),
        b: Box::new(MqEnd {
            tx: ba_tx,
            rx: ab_rx,
        }),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("two queues of {depth} messages of {len} bytes, unlinked once open"),
    })
}
