//! `pipe`: two pipes, one per direction — a pipe carries bytes one way only (seed 001).
//! Messages are framed by their length, as in the course's pipe example.

use crate::ipc::channel::{Cleanup, Pair, Setup, StreamEnd};
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// Set up both ends.
///
/// # Errors
/// `pipe2`'s errno (`EMFILE`).
pub fn open(_setup: &Setup) -> anyhow::Result<Pair> {
    let (ab_r, ab_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (ba_r, ba_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let capacity = fcntl(&ab_r, FcntlArg::F_GETPIPE_SZ).unwrap_or(0);
    Ok(Pair {
        a: Box::new(StreamEnd::new(ba_r, ab_w)),
        b: Box::new(StreamEnd::new(ab_r, ba_w)),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("two pipes of {capacity} bytes each"),
    })
}
