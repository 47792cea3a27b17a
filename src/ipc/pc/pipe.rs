//! A pipe as the bounded buffer: each item is one 16-byte `write` — below `PIPE_BUF`, so
//! writes from several producers never interleave — and one 16-byte `read` (the pipe holds
//! only whole items, so a read of 16 bytes always gets exactly one). Its capacity is set with
//! `F_SETPIPE_SZ`; the kernel rounds it up to a page (256 items).

use super::{Buffer, Item};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::os::fd::OwnedFd;

/// The two ends of one pipe, shared by all threads.
pub struct PipeBuffer {
    rd: OwnedFd,
    wr: OwnedFd,
    cap: usize,
}

impl PipeBuffer {
    /// A pipe sized for `cap` items (at least a page).
    ///
    /// # Errors
    /// `pipe2`/`fcntl` errors.
    pub fn new(cap: usize) -> anyhow::Result<PipeBuffer> {
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let want = (cap * 16).clamp(4096, 1 << 20) as i32;
        let got = fcntl(&wr, FcntlArg::F_SETPIPE_SZ(want))?;
        Ok(PipeBuffer {
            rd,
            wr,
            cap: got as usize / 16,
        })
    }
}

impl Buffer for PipeBuffer {
    fn put(&self, item: Item) -> anyhow::Result<()> {
        let b = item.to_bytes();
        loop {
            match nix::unistd::write(&self.wr, &b) {
                Ok(16) => return Ok(()),
                Ok(n) => anyhow::bail!("a 16-byte write to the pipe wrote {n}"),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn take(&self) -> anyhow::Result<Item> {
        let mut b = [0u8; 16];
        loop {
            match nix::unistd::read(&self.rd, &mut b) {
                Ok(16) => return Item::from_bytes(&b),
                Ok(n) => anyhow::bail!("a 16-byte read from the pipe returned {n}"),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn capacity(&self) -> usize {
        self.cap
    }
}
