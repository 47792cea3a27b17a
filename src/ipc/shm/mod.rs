//! The shared-memory ring, and the wake-ups the course discusses (`shm-futex`, `shm-eventfd`,
//! `shm-signal`, `shm-sem`, `shm-spin`), one file each.
//!
//! One anonymous `MAP_SHARED` region holds two single-producer/single-consumer rings, one per
//! direction. Each ring has a `head` (messages published, written only by the producer) and a
//! `tail` (messages consumed, written only by the consumer), 32-bit counters that wrap, each
//! on its own cache line, and `slots` fixed-size slots of `[length u32][message]`; the message
//! itself carries its sequence number in its header. Nothing is copied by the kernel: the
//! producer copies into the slot and publishes with a release store of `head`; the consumer
//! acquires `head`, copies out, and releases the slot with a store of `tail`.
//!
//! Waiting is where the mechanisms differ. A side with nothing to do (consumer: ring empty;
//! producer: ring full) raises its *sleeping* flag, looks at the counter once more, and sleeps
//! on its wake-up; the other side, after moving its counter, wakes it only if the flag is up.
//! Both use sequentially consistent order for "store my counter, load your flag" and "store
//! my flag, load your counter", so at least one of them sees the other: no wake-up is lost,
//! and while the other side is busy no system call is made at all. A wake-up that arrives
//! when nobody sleeps (a stale `eventfd` count, a semaphore unit, a pending signal) only makes
//! the next wait return early and look again.

pub mod eventfd;
pub mod futex;
pub mod sem;
pub mod signal;
pub mod spin;

use super::channel::{Cleanup, End, Pair, Setup};
use super::sys::{self, Region};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The wake-up a ring uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeKind {
    /// `futex(FUTEX_WAIT)` on the counter itself, `FUTEX_WAKE` from the other side.
    Futex,
    /// A blocking `read` of an `eventfd`, a `write` to wake.
    Eventfd,
    /// `sigwaitinfo` for SIGUSR1, `tgkill` to wake (the course's doorbell).
    Signal,
    /// `sem_wait` on a semaphore in the shared region, `sem_post` to wake.
    Sem,
    /// No sleeping: poll the counter in a loop.
    Spin,
}

/// Where a side waits: index into the wake-up's objects.
/// 0/1: ring a→b not empty / not full, 2/3: ring b→a not empty / not full.
pub type Point = usize;

/// A way to sleep until the other side moves a counter, and to wake it.
pub trait Wake: Send + Sync {
    /// Sleep at `point` until woken, while `word` still holds `seen` (it may return early).
    ///
    /// # Errors
    /// `Interrupted` on a signal (the other side failed); other errors of the system call.
    fn wait(&self, region: &Region, point: Point, word: &AtomicU32, seen: u32) -> io::Result<()>;
    /// Wake the side sleeping at `point`.
    fn wake(&self, region: &Region, point: Point, word: &AtomicU32);
}

/// Cache line spacing (two lines: the adjacent-line prefetcher pulls pairs).
const LINE: usize = 128;
/// Per ring: head, tail, sleeping flags, wake-up data, each on its own line.
const RING_LINES: usize = 4;
/// Where the wake-ups keep data of their own (semaphores, thread ids), per point.
pub const WAKE_AREA: usize = 2 * RING_LINES * LINE;
/// Bytes of wake-up data per point.
pub const WAKE_SLOT: usize = 64;
/// Where the slots start.
const DATA: usize = 4096;

/// Offsets of one ring in the region.
#[derive(Debug, Clone, Copy)]
struct Ring {
    head: usize,
    tail: usize,
    /// The sleeping flags: consumer (not empty) at +0, producer (not full) at +4.
    flags: usize,
    slots: usize,
    /// The first wait point of this ring (not empty; +1 is not full).
    point: Point,
}

impl Ring {
    fn new(index: usize, slots_at: usize) -> Ring {
        let base = index * RING_LINES * LINE;
        Ring {
            head: base,
            tail: base + LINE,
            flags: base + 2 * LINE,
            slots: slots_at,
            point: index * 2,
        }
    }
}

/// The shape of the rings for a run.
#[derive(Debug, Clone, Copy)]
struct Shape {
    slot: usize,
    count: u32,
}

impl Shape {
    fn for_len(len: usize) -> Shape {
        let slot = (4 + len).div_ceil(64) * 64;
        // A power of two, so a counter finds its slot with a mask, not a division.
        let count = (((4 << 20) / slot).clamp(4, 1024) as u32)
            .next_power_of_two()
            .min(1024);
        Shape { slot, count }
    }
}

/// One side's end: produces into one ring, consumes from the other.
pub struct ShmEnd {
    region: Arc<Region>,
    wake: Arc<dyn Wake>,
    spin: bool,
    shape: Shape,
    tx: Ring,
    rx: Ring,
    /// The consumer's `tail` as this producer last saw it: while it shows room, the shared
    /// line is not read again (one cache-line transfer per batch, not per message).
    tail_seen: u32,
    /// The producer's `head` as this consumer last saw it, likewise.
    head_seen: u32,
}

impl std::fmt::Debug for ShmEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmEnd")
            .field("spin", &self.spin)
            .finish_non_exhaustive()
    }
}

impl ShmEnd {
    /// Wait at `point` while `word` holds `seen`.
    fn wait(
        &self,
        point: Point,
        flag: usize,
        word: &AtomicU32,
        seen: u32,
        spins: &mut u32,
    ) -> io::Result<()> {
        if self.spin {
            return spin::pause(spins);
        }
        let flag = self.region.u32_at(flag);
        flag.store(1, Ordering::SeqCst);
        if word.load(Ordering::SeqCst) != seen {
            flag.store(0, Ordering::Relaxed);
            return Ok(());
        }
        let r = self.wake.wait(&self.region, point, word, seen);
        flag.store(0, Ordering::Relaxed);
        r
    }

    /// After moving `word`, wake the other side if it sleeps at `point`.
    fn notify(&self, point: Point, flag: usize, word: &AtomicU32) {
        if !self.spin && self.region.u32_at(flag).load(Ordering::SeqCst) != 0 {
            self.wake.wake(&self.region, point, word);
        }
    }
}

impl End for ShmEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        let r = self.tx;
        let (head, tail) = (self.region.u32_at(r.head), self.region.u32_at(r.tail));
        let h = head.load(Ordering::Relaxed);
        let mut spins = 0;
        while h.wrapping_sub(self.tail_seen) >= self.shape.count {
            let t = tail.load(Ordering::Acquire);
            self.tail_seen = t;
            if h.wrapping_sub(t) < self.shape.count {
                break;
            }
            self.wait(r.point + 1, r.flags + 4, tail, t, &mut spins)?;
        }
        let at = r.slots + (h & (self.shape.count - 1)) as usize * self.shape.slot;
        self.region
            .u32_at(at)
            .store(msg.len() as u32, Ordering::Relaxed);
        self.region.write(at + 4, msg);
        if self.spin {
            head.store(h.wrapping_add(1), Ordering::Release);
        } else {
            // SeqCst: ordered before the load of the consumer's sleeping flag (see above).
            head.store(h.wrapping_add(1), Ordering::SeqCst);
            self.notify(r.point, r.flags, head);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.rx;
        let (head, tail) = (self.region.u32_at(r.head), self.region.u32_at(r.tail));
        let t = tail.load(Ordering::Relaxed);
        let mut spins = 0;
        while self.head_seen == t {
            let h = head.load(Ordering::Acquire);
            self.head_seen = h;
            if h != t {
                break;
            }
            self.wait(r.point, r.flags, head, h, &mut spins)?;
        }
        let at = r.slots + (t & (self.shape.count - 1)) as usize * self.shape.slot;
        let len = self.region.u32_at(at).load(Ordering::Relaxed) as usize;
        if len > buf.len() || len + 4 > self.shape.slot {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a slot announces {len} bytes, more than the {} expected",
                    buf.len() - 1
                ),
            ));
        }
        self.region.read(at + 4, &mut buf[..len]);
        if self.spin {
            tail.store(t.wrapping_add(1), Ordering::Release);
        } else {
            tail.store(t.wrapping_add(1), Ordering::SeqCst);
            self.notify(r.point + 1, r.flags + 4, tail);
        }
        Ok(len)
    }
}

/// Set up the region, its two rings and the wake-up.
///
/// # Errors
/// `mmap` or the wake-up's setup errors.
pub fn open(setup: &Setup, kind: WakeKind) -> anyhow::Result<Pair> {
    let shape = Shape::for_len(setup.message_len());
    let ring_bytes = shape.slot * shape.count as usize;
    let region = Arc::new(Region::new(DATA + 2 * ring_bytes)?);
    let wake: Arc<dyn Wake> = match kind {
        WakeKind::Futex => Arc::new(futex::FutexWake),
        WakeKind::Eventfd => Arc::new(eventfd::EventfdWake::new()?),
        WakeKind::Signal => Arc::new(signal::SignalWake),
        WakeKind::Sem => Arc::new(sem::SemWake::new(&region)?),
        WakeKind::Spin => Arc::new(spin::SpinWake),
    };
    let (ab, ba) = (Ring::new(0, DATA), Ring::new(1, DATA + ring_bytes));
    let spin = kind == WakeKind::Spin;
    let end = |tx, rx| ShmEnd {
        region: region.clone(),
        wake: wake.clone(),
        spin,
        shape,
        tx,
        rx,
        tail_seen: 0,
        head_seen: 0,
    };
    let (a, b) = (end(ab, ba), end(ba, ab));
    let _ = sys::INTERRUPTS.load(Ordering::Relaxed);
    Ok(Pair {
        a: Box::new(a),
        b: Box::new(b),
        cleanup: Cleanup::default(),
        window: None,
        note: format!(
            "two rings of {} slots of {} bytes in one MAP_SHARED region ({} KiB)",
            shape.count,
            shape.slot,
            region.len() / 1024
        ),
    })
}
