//! The lab's few `unsafe` system calls, each with its `SAFETY` note: `fork`, `sigaction`, a
//! shared anonymous mapping, and the socket options nix and socket2 do not wrap.
//!
//! Everything else in the lab goes through the safe wrappers of `nix`, `socket2` and `std`.

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{fork, ForkResult, Pid};
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Fork a child that runs `child` and exits with the code it returns; the parent gets the
/// child's pid. In the child every descriptor above 2 is closed except those in `keep`, so the
/// child holds no copies of sockets it was not meant to share.
///
/// # Safety
///
/// The calling process may have other threads, so in the child `child` must only make
/// async-signal-safe calls (`read`, `write`, `close`, `recv`, `send`, `alarm`, `sigaction`,
/// `kill`, `clock_gettime`, `nanosleep`...): no allocation, no locks, no `println!`.
///
/// # Errors
///
/// The `fork` error, if the kernel refuses a new process.
pub unsafe fn fork_child(keep: &[RawFd], child: impl FnOnce() -> i32) -> io::Result<Pid> {
    // SAFETY: the caller promises the child only makes async-signal-safe calls; the parent
    // continues normally.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            close_all_but(keep);
            let code = child();
            // SAFETY: `_exit` ends the child at once without running the parent's atexit
            // handlers or flushing its stdio buffers, which belong to the parent.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Close every descriptor from 3 up except those in `keep` (async-signal-safe: raw syscalls on
/// a fixed-size array).
fn close_all_but(keep: &[RawFd]) {
    let mut sorted = [0 as RawFd; 16];
    let n = keep.len().min(sorted.len());
    sorted[..n].copy_from_slice(&keep[..n]);
    sorted[..n].sort_unstable();
    let mut first: u32 = 3;
    for &fd in &sorted[..n] {
        let Ok(fd) = u32::try_from(fd) else { continue };
        if fd >= first {
            if fd > first {
                close_range(first, fd - 1);
            }
            first = fd + 1;
        }
    }
    close_range(first, u32::MAX);
}

fn close_range(first: u32, last: u32) {
    // SAFETY: close_range only closes descriptors of this process; the child owns no Rust
    // objects that still use them (it was just forked and only uses the descriptors it kept).
    unsafe {
        libc::syscall(libc::SYS_close_range, first, last, 0);
    }
}

/// How many times each signal has reached [`count_signal`]; indexed by signal number.
static SIGNAL_COUNTS: [AtomicU32; 65] = [const { AtomicU32::new(0) }; 65];

extern "C" fn count_signal(sig: libc::c_int) {
    if let Some(c) = usize::try_from(sig).ok().and_then(|i| SIGNAL_COUNTS.get(i)) {
        c.fetch_add(1, Ordering::SeqCst);
    }
}

/// How many times `sig` has been caught by the handler [`catch_signal`] installs.
pub fn signal_count(sig: Signal) -> u32 {
    SIGNAL_COUNTS[sig as usize].load(Ordering::SeqCst)
}

/// Reset the count of `sig` to zero.
pub fn reset_signal_count(sig: Signal) {
    SIGNAL_COUNTS[sig as usize].store(0, Ordering::SeqCst);
}

/// Install a handler for `sig` that only counts it, with or without `SA_RESTART`.
/// Async-signal-safe, so a forked child may call it.
///
/// # Errors
///
/// The `sigaction` error (an invalid signal).
pub fn catch_signal(sig: Signal, restart: bool) -> nix::Result<()> {
    let flags = if restart {
        SaFlags::SA_RESTART
    } else {
        SaFlags::empty()
    };
    let action = SigAction::new(SigHandler::Handler(count_signal), flags, SigSet::empty());
    // SAFETY: the handler only increments an atomic counter, which is async-signal-safe.
    unsafe { sigaction(sig, &action) }.map(|_| ())
}

/// Give `sig` its default action (SIGPIPE: terminate). Async-signal-safe.
///
/// # Errors
///
/// The `sigaction` error (an invalid signal).
pub fn default_signal(sig: Signal) -> nix::Result<()> {
    let action = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: restoring the default disposition installs no Rust code as a handler.
    unsafe { sigaction(sig, &action) }.map(|_| ())
}

/// Ignore `sig` (as every socklab process does with SIGPIPE). Async-signal-safe.
///
/// # Errors
///
/// The `sigaction` error (an invalid signal, or SIGKILL/SIGSTOP).
pub fn ignore_signal(sig: Signal) -> nix::Result<()> {
    let action = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: ignoring a signal installs no Rust code as a handler.
    unsafe { sigaction(sig, &action) }.map(|_| ())
}

/// A page of anonymous memory mapped `MAP_SHARED`: after `fork`, parent and child see the
/// same bytes. Accessed as 64-bit words through atomics, so both sides can read and write it.
#[derive(Debug)]
pub struct SharedPage {
    ptr: NonNull<AtomicU64>,
}

/// The number of 64-bit words in a [`SharedPage`].
pub const SHARED_WORDS: usize = 512;

impl SharedPage {
    /// Map one zeroed page, readable and writable, shared with future children.
    ///
    /// # Errors
    ///
    /// The `mmap` error.
    pub fn new() -> nix::Result<Self> {
        let len = NonZeroUsize::new(SHARED_WORDS * 8).expect("non-zero");
        // SAFETY: a fresh anonymous mapping aliases no existing memory.
        let ptr = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(Self { ptr: ptr.cast() })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < SHARED_WORDS, "shared page index out of range");
        // SAFETY: the mapping is page-aligned, SHARED_WORDS * 8 bytes long and lives as long
        // as `self`; every access goes through atomics, so concurrent use by the other process
        // is not a data race.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }

    /// Read word `i`.
    pub fn load(&self, i: usize) -> u64 {
        self.word(i).load(Ordering::SeqCst)
    }

    /// Write word `i`.
    pub fn store(&self, i: usize, v: u64) {
        self.word(i).store(v, Ordering::SeqCst);
    }

    /// Write `text` (at most 8·`words` bytes) as a length word at `at` followed by the bytes.
    /// Allocation-free, so a forked child may call it.
    pub fn write_text(&self, at: usize, words: usize, text: &[u8]) {
        let n = text.len().min(words * 8);
        self.store(at, n as u64);
        for (k, chunk) in text[..n].chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.store(at + 1 + k, u64::from_ne_bytes(w));
        }
    }

    /// Copy text written by [`SharedPage::write_text`] into `out`, returning its length (cut
    /// to `out`'s size). Allocation-free, so a forked child may call it.
    pub fn read_into(&self, at: usize, out: &mut [u8]) -> usize {
        let n = (self.load(at) as usize).min(out.len());
        for (k, chunk) in out[..n].chunks_mut(8).enumerate() {
            let w = self.load(at + 1 + k).to_ne_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        n
    }

    /// Read text written by [`SharedPage::write_text`].
    pub fn read_text(&self, at: usize) -> String {
        let n = self.load(at) as usize;
        let mut bytes = Vec::with_capacity(n);
        for k in 0..n.div_ceil(8) {
            bytes.extend_from_slice(&self.load(at + 1 + k).to_ne_bytes());
        }
        bytes.truncate(n);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this length and no reference into it
        // outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), SHARED_WORDS * 8) };
    }
}

/// Set an integer socket option that neither nix nor socket2 wraps (`TCP_DEFER_ACCEPT`).
///
/// # Errors
///
/// The `setsockopt` error.
pub fn set_int_option(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the pointer and length describe a live c_int; the descriptor is borrowed open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_page_round_trips_text() {
        let page = SharedPage::new().unwrap();
        page.write_text(10, 4, b"note from parent 12");
        assert_eq!(page.read_text(10), "note from parent 12");
        page.write_text(10, 1, b"too long for one word");
        assert_eq!(page.read_text(10), "too long");
    }
}
