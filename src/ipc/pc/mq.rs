//! A POSIX message queue as the bounded buffer: it holds `--capacity` messages of 16 bytes
//! (at most `fs.mqueue.msg_max` for an ordinary user), `mq_send` waits while it is full,
//! `mq_receive` while it is empty. The name is unlinked as soon as the queue is open.

use super::{Buffer, Item};
use crate::ipc::channel::LimitError;
use crate::ipc::mech::posix_mq::{self, Queue};

/// One queue, opened twice (the producers' and the consumers' descriptor).
pub struct MqBuffer {
    tx: Queue,
    rx: Queue,
    cap: usize,
}

impl MqBuffer {
    /// A queue of `cap` messages.
    ///
    /// # Errors
    /// A [`LimitError`] above `fs.mqueue.msg_max`, or `mq_open`'s errno.
    pub fn new(cap: usize) -> anyhow::Result<MqBuffer> {
        let (_, msg_max) = posix_mq::limits();
        if cap > msg_max {
            return Err(LimitError(format!(
                "mq: a POSIX message queue holds at most {msg_max} messages (fs.mqueue.msg_max); \
                 use --capacity {msg_max} or raise it with `sysctl fs.mqueue.msg_max={cap}`"
            ))
            .into());
        }
        let (tx, rx) = posix_mq::queue_pair(16, cap, "pc")?;
        Ok(MqBuffer { tx, rx, cap })
    }
}

impl Buffer for MqBuffer {
    fn put(&self, item: Item) -> anyhow::Result<()> {
        loop {
            match self.tx.send(&item.to_bytes()) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                other => return Ok(other?),
            }
        }
    }

    fn take(&self) -> anyhow::Result<Item> {
        let mut b = [0u8; 16];
        loop {
            match self.rx.receive(&mut b) {
                Ok(n) => return Item::from_bytes(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn capacity(&self) -> usize {
        self.cap
    }
}
