//! The bounded buffer with a mutex and two condition variables (seed 004, "2nd cut"): wait in
//! a `while` loop, broadcast after each change. Counts the wake-ups that found nothing to do.

use super::{Buffer, Item};
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

struct State {
    queue: VecDeque<Item>,
    waits: u64,
    woken_empty: u64,
}

/// Mutex + `not_full` + `not_empty`.
pub struct CondvarBuffer {
    state: Mutex<State>,
    not_full: Condvar,
    not_empty: Condvar,
    cap: usize,
}

impl CondvarBuffer {
    /// An empty buffer of `cap` items.
    pub fn new(cap: usize) -> CondvarBuffer {
        CondvarBuffer {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(cap),
                waits: 0,
                woken_empty: 0,
            }),
            not_full: Condvar::new(),
            not_empty: Condvar::new(),
            cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Buffer for CondvarBuffer {
    fn put(&self, item: Item) -> anyhow::Result<()> {
        let mut s = self.lock();
        while s.queue.len() >= self.cap {
            s.waits += 1;
            s = self.not_full.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.queue.push_back(item);
        drop(s);
        self.not_empty.notify_all();
        Ok(())
    }

    fn take(&self) -> anyhow::Result<Item> {
        let mut s = self.lock();
        while s.queue.is_empty() {
            s.waits += 1;
            s = self.not_empty.wait(s).unwrap_or_else(|e| e.into_inner());
            if s.queue.is_empty() {
                // Woken, but another consumer got here first (or a spurious wake-up).
                s.woken_empty += 1;
            }
        }
        let item = s.queue.pop_front().expect("not empty");
        drop(s);
        self.not_full.notify_all();
        Ok(item)
    }

    fn capacity(&self) -> usize {
        self.cap
    }

    fn wakeups(&self) -> Option<(u64, u64)> {
        let s = self.lock();
        Some((s.waits, s.woken_empty))
    }
}
