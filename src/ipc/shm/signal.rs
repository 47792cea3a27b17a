//! `shm-signal`: the course's doorbell. The sleeper keeps SIGUSR1 blocked in its thread,
//! writes its process and thread id into the region, and waits in `sigwaitinfo`; the waker
//! sends SIGUSR1 to exactly that thread with `tgkill`. (The course's child polls a flag set by
//! a handler with `usleep(1000)`; waiting for the signal itself costs no millisecond naps.)

use super::{Point, Wake, WAKE_AREA, WAKE_SLOT};
use crate::ipc::sys::{self, Region};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

/// The waiters' ids live in the region.
#[derive(Debug)]
pub struct SignalWake;

fn at(point: Point) -> usize {
    WAKE_AREA + point * WAKE_SLOT
}

thread_local! {
    static BLOCKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl Wake for SignalWake {
    fn wait(&self, region: &Region, point: Point, word: &AtomicU32, seen: u32) -> io::Result<()> {
        if !BLOCKED.get() {
            let mut set = SigSet::empty();
            set.add(Signal::SIGUSR1);
            nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
            BLOCKED.set(true);
        }
        region
            .i32_at(at(point))
            .store(std::process::id() as i32, Ordering::SeqCst);
        region
            .i32_at(at(point) + 4)
            .store(sys::gettid(), Ordering::SeqCst);
        // A waker that saw the flag before the id was written sent nothing: look at the word
        // once more now that the id is visible, so its change is not slept through.
        if word.load(Ordering::SeqCst) != seen {
            return Ok(());
        }
        sys::wait_signal(Signal::SIGUSR1)
    }

    fn wake(&self, region: &Region, point: Point, _: &AtomicU32) {
        let pid = region.i32_at(at(point)).load(Ordering::SeqCst);
        let tid = region.i32_at(at(point) + 4).load(Ordering::SeqCst);
        if tid > 0 {
            let _ = sys::tgkill(pid, tid, libc::SIGUSR1);
        }
    }
}
