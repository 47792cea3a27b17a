//! `fifo`: two named pipes in a private temp directory. Opening a FIFO blocks until the other
//! side opens it too, so the read end is opened non-blocking first, then the write end, then
//! the read end is made blocking; the names are removed as soon as both ends are open.

use crate::ipc::channel::{Cleanup, Pair, PrivateDir, Setup, StreamEnd};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use std::os::fd::OwnedFd;
use std::path::Path;

fn both_ends(path: &Path) -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR)?;
    let rd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let wr = nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    fcntl(&rd, FcntlArg::F_SETFL(OFlag::empty()))?;
    Ok((rd, wr))
}

/// Set up both ends.
///
/// # Errors
/// `mkdir`/`mkfifo`/`open` errors.
pub fn open(_setup: &Setup) -> anyhow::Result<Pair> {
    let mut dir = PrivateDir::new()?;
    let (ab, ba) = (dir.path("a-to-b"), dir.path("b-to-a"));
    let (ab_r, ab_w) = both_ends(&ab)?;
    let (ba_r, ba_w) = both_ends(&ba)?;
    let shown = dir.dir().display().to_string();
    dir.remove();
    Ok(Pair {
        a: Box::new(StreamEnd::new(ba_r, ab_w)),
        b: Box::new(StreamEnd::new(ab_r, ba_w)),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("two FIFOs in {shown}, removed once open"),
    })
}
