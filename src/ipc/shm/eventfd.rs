//! `shm-eventfd`: one `eventfd` per wait point; the sleeper blocks in `read`, the waker
//! `write`s 1. The descriptors are made before `fork`, so both processes hold them.

use super::{Point, Wake};
use crate::ipc::channel::errno;
use crate::ipc::sys::Region;
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::sync::atomic::AtomicU32;

/// Four eventfds: not-empty and not-full of each ring.
#[derive(Debug)]
pub struct EventfdWake {
    fds: [EventFd; 4],
}

impl EventfdWake {
    /// Create the four eventfds.
    ///
    /// # Errors
    /// `eventfd`'s errno.
    pub fn new() -> io::Result<EventfdWake> {
        let one = || EventFd::from_flags(EfdFlags::EFD_CLOEXEC);
        Ok(EventfdWake {
            fds: [one()?, one()?, one()?, one()?],
        })
    }
}

impl Wake for EventfdWake {
    fn wait(&self, _: &Region, point: Point, _: &AtomicU32, _: u32) -> io::Result<()> {
        self.fds[point].read().map(drop).map_err(errno)
    }

    fn wake(&self, _: &Region, point: Point, _: &AtomicU32) {
        let _ = self.fds[point].write(1);
    }
}
