//! `shm-spin`: no sleeping at all — the waiting side polls the counter in a loop, so a wake-up
//! costs only the cache line's trip between CPUs, and each waiting side burns its CPU (the
//! report's CPU per message shows it). After 65,536 idle polls it yields the CPU once, so a
//! run with both sides on one CPU (`--pin same`) still moves; a signal from the other side
//! (it failed, or died) ends the wait.

use super::{Point, Wake};
use crate::ipc::sys::{Region, INTERRUPTS};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

/// The spinning "wake-up" (never called: the ring spins itself through [`pause`]).
#[derive(Debug)]
pub struct SpinWake;

impl Wake for SpinWake {
    fn wait(&self, _: &Region, _: Point, _: &AtomicU32, _: u32) -> io::Result<()> {
        Ok(())
    }

    fn wake(&self, _: &Region, _: Point, _: &AtomicU32) {}
}

thread_local! {
    static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// One poll of a spinning wait; `spins` counts the polls of this wait.
///
/// # Errors
/// `Interrupted` when a SIGUSR2/SIGCHLD arrived since the last interrupt this thread saw.
pub fn pause(spins: &mut u32) -> io::Result<()> {
    *spins = spins.wrapping_add(1);
    if (*spins).is_multiple_of(1024) {
        let now = INTERRUPTS.load(Ordering::Relaxed);
        if now != SEEN.get() {
            SEEN.set(now);
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        if (*spins).is_multiple_of(65536) {
            std::thread::yield_now();
        }
    }
    std::hint::spin_loop();
    Ok(())
}
