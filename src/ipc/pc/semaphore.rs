//! The bounded buffer with three semaphores (seed 004): `emptySlots` (starts at the capacity),
//! `fullSlots` (starts at 0) and `mutex` (a binary semaphore around the queue).

use super::{Buffer, Item};
use crate::ipc::sys::{BoxedSem, Sem};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Three POSIX semaphores and a queue.
pub struct SemBuffer {
    empty_slots: BoxedSem,
    full_slots: BoxedSem,
    mutex: BoxedSem,
    /// Only touched between `mutex.P()` and `mutex.V()`, so this lock is never contended; it
    /// is here because Rust wants shared data behind a lock it can see.
    queue: Mutex<VecDeque<Item>>,
    cap: usize,
}

impl SemBuffer {
    /// An empty buffer of `cap` items.
    ///
    /// # Errors
    /// `sem_init`'s errno.
    pub fn new(cap: usize) -> anyhow::Result<SemBuffer> {
        let cap32 = u32::try_from(cap).map_err(|_| anyhow::anyhow!("capacity too large"))?;
        Ok(SemBuffer {
            empty_slots: Sem::boxed(cap32)?,
            full_slots: Sem::boxed(0)?,
            mutex: Sem::boxed(1)?,
            queue: Mutex::new(VecDeque::with_capacity(cap)),
            cap,
        })
    }
}

/// P: retry when a signal interrupts the wait.
fn p(s: &Sem) -> anyhow::Result<()> {
    loop {
        match s.wait() {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

impl Buffer for SemBuffer {
    fn put(&self, item: Item) -> anyhow::Result<()> {
        p(&self.empty_slots)?;
        p(&self.mutex)?;
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(item);
        self.mutex.post();
        self.full_slots.post();
        Ok(())
    }

    fn take(&self) -> anyhow::Result<Item> {
        p(&self.full_slots)?;
        p(&self.mutex)?;
        let item = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        self.mutex.post();
        self.empty_slots.post();
        item.ok_or_else(|| anyhow::anyhow!("fullSlots let a consumer in, but the queue was empty"))
    }

    fn capacity(&self) -> usize {
        self.cap
    }
}
