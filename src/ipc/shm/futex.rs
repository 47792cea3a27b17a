//! `shm-futex`: sleep with `FUTEX_WAIT` on the ring's counter itself ("sleep while head is
//! still h"), wake with `FUTEX_WAKE`. The kernel compares the word before sleeping, so a
//! change that happened in between is never slept through.

use super::{Point, Wake};
use crate::ipc::sys::{futex_wait, futex_wake, Region};
use std::io;
use std::sync::atomic::AtomicU32;

/// The futex wake-up (it needs no state: the counters are the futex words).
#[derive(Debug)]
pub struct FutexWake;

impl Wake for FutexWake {
    fn wait(&self, _: &Region, _: Point, word: &AtomicU32, seen: u32) -> io::Result<()> {
        futex_wait(word, seen)
    }

    fn wake(&self, _: &Region, _: Point, word: &AtomicU32) {
        futex_wake(word, 1);
    }
}
