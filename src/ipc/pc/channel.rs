//! Message passing: producers `send`, consumers `recv`, and the channel does all the
//! synchronisation ("no semaphores needed", seed 003). `crossbeam_channel::bounded` because
//! it allows many receivers (std's `mpsc` has one).

use super::{Buffer, Item};

/// A bounded many-to-many channel.
pub struct ChannelBuffer {
    tx: crossbeam_channel::Sender<Item>,
    rx: crossbeam_channel::Receiver<Item>,
    cap: usize,
}

impl ChannelBuffer {
    /// A channel holding `cap` items.
    pub fn new(cap: usize) -> ChannelBuffer {
        let (tx, rx) = crossbeam_channel::bounded(cap);
        ChannelBuffer { tx, rx, cap }
    }
}

impl Buffer for ChannelBuffer {
    fn put(&self, item: Item) -> anyhow::Result<()> {
        self.tx
            .send(item)
            .map_err(|_| anyhow::anyhow!("channel closed"))
    }

    fn take(&self) -> anyhow::Result<Item> {
        self.rx
            .recv()
            .map_err(|_| anyhow::anyhow!("channel closed"))
    }

    fn capacity(&self) -> usize {
        self.cap
    }
}
