//! `shm-sem`: a POSIX semaphore per wait point, placed in the shared region itself
//! (`sem_init(.., pshared = 1, 0)`); the sleeper `sem_wait`s, the waker `sem_post`s.

use super::{Point, Wake, WAKE_AREA, WAKE_SLOT};
use crate::ipc::sys::Region;
use std::io;
use std::sync::atomic::AtomicU32;

/// The semaphores live in the region; this only knows where.
#[derive(Debug)]
pub struct SemWake;

fn at(point: Point) -> usize {
    WAKE_AREA + point * WAKE_SLOT
}

impl SemWake {
    /// Initialise the four semaphores in `region`, all at 0.
    ///
    /// # Errors
    /// `sem_init`'s errno.
    pub fn new(region: &Region) -> io::Result<SemWake> {
        for p in 0..4 {
            region.sem_at(at(p), 0)?;
        }
        Ok(SemWake)
    }
}

impl Wake for SemWake {
    fn wait(&self, region: &Region, point: Point, _: &AtomicU32, _: u32) -> io::Result<()> {
        region.sem(at(point)).wait()
    }

    fn wake(&self, region: &Region, point: Point, _: &AtomicU32) {
        region.sem(at(point)).post();
    }
}
