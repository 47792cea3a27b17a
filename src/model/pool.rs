//! `pool`: a dispatcher thread accepts and hands connections to `--workers` threads through a
//! bounded queue: the course's producer/consumer, with a mutex and two condition variables.
//!
//! ```text
//! dispatcher:                         worker (x N):
//! loop:                               loop:
//!     conn = accept(listener)             lock; while queue empty: wait(not_empty)
//!     lock; while queue full:             conn = pop; signal(not_full); unlock
//!         wait(not_full)                  serve conn until the client closes
//!     push conn; signal(not_empty)
//!     unlock
//! ```
//!
//! The lock is held only to take a connection, never while serving one. When the queue is
//! full the dispatcher stops accepting and new clients wait in the listen backlog. On a stop
//! request the queue is closed: workers finish what they have, answer what already arrived
//! on queued connections, and exit.

use crate::model::{for_each_connection, serve_blocking, Ctx, Slot, Tracker};
use crate::net::Listener;
use crate::signals::{self, Signals};
use socket2::Socket;
use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A bounded FIFO for producer/consumer threads; closing it wakes everyone.
#[derive(Debug)]
pub struct BoundedQueue<T> {
    state: Mutex<QueueState<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
}

#[derive(Debug)]
struct QueueState<T> {
    items: VecDeque<T>,
    closed: bool,
}

impl<T> BoundedQueue<T> {
    /// A queue holding at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        BoundedQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                closed: false,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add an item, waiting while the queue is full. Gives the item back if the queue was
    /// closed meanwhile, or if `give_up` turns true while waiting (checked every 50 ms).
    pub fn push(&self, item: T, give_up: impl Fn() -> bool) -> Result<(), T> {
        let mut s = self.lock();
        while s.items.len() >= self.capacity && !s.closed {
            if give_up() {
                return Err(item);
            }
            s = self
                .not_full
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if s.closed {
            return Err(item);
        }
        s.items.push_back(item);
        drop(s);
        self.not_empty.notify_one();
        Ok(())
    }

    /// Take the oldest item, waiting while the queue is empty; `None` once it is closed and
    /// empty.
    pub fn pop(&self) -> Option<T> {
        let mut s = self.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                drop(s);
                self.not_full.notify_one();
                return Some(item);
            }
            if s.closed {
                return None;
            }
            s = self.not_empty.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Close the queue: no more pushes; `pop` drains what is left, then returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Remove every waiting item.
    pub fn clear(&self) -> Vec<T> {
        self.lock().items.drain(..).collect()
    }
}

/// Serve on `listener` with a dispatcher (this thread) and `ctx.opts.workers` workers.
///
/// # Errors
/// A fatal listener error, or no worker thread could be started.
pub fn run(listener: &Listener, ctx: &Ctx, signals: &Signals) -> io::Result<()> {
    let workers = ctx.opts.workers.max(1);
    let queue: BoundedQueue<(Socket, Slot<'_>)> = BoundedQueue::new(workers);
    let tracker = Tracker::default();
    std::thread::scope(|scope| {
        for i in 0..workers {
            let (queue, tracker) = (&queue, &tracker);
            std::thread::Builder::new()
                .name(format!("pool-{i}"))
                .stack_size(256 * 1024)
                .spawn_scoped(scope, move || {
                    while let Some((sock, slot)) = queue.pop() {
                        let conn = tracker.add(sock);
                        serve_blocking(&conn.socket, ctx, &conn.busy, None).log(&slot.peer);
                        tracker.remove(&conn);
                    }
                })?;
        }
        let result = for_each_connection(listener, ctx, signals, |sock, slot| {
            // Dropped (closed) if the server stops while the queue is full.
            let _ = queue.push((sock, slot), signals::stop_requested);
        });
        // Stop: workers finish their connection and drain the queue (answering only what
        // already arrived), idle connections are woken, stragglers cut after the grace.
        queue.close();
        let deadline = Instant::now() + ctx.opts.grace;
        while !(queue.is_empty() && tracker.is_empty()) && Instant::now() < deadline {
            tracker.close_idle();
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(queue.clear());
        tracker.drain(Duration::ZERO);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn queue_is_fifo_bounded_and_closable() {
        let q = Arc::new(BoundedQueue::new(2));
        q.push(1, || false).unwrap();
        q.push(2, || false).unwrap();
        // Full: a push that gives up returns the item.
        assert_eq!(q.push(3, || true), Err(3));
        let q2 = q.clone();
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            while let Some(x) = q2.pop() {
                got.push(x);
            }
            got
        });
        q.push(3, || false).unwrap();
        q.push(4, || false).unwrap();
        q.close();
        assert_eq!(q.push(5, || false), Err(5));
        assert_eq!(consumer.join().unwrap(), vec![1, 2, 3, 4]);
    }
}
