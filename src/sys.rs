//! The few system calls that need `unsafe`, each wrapped once with its `SAFETY` note.
//! Everything else in socklab goes through safe wrappers (`socket2`, `nix`, `std`).

use std::io;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

/// Which side of a [`fork`] we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// The parent, with the child's process id.
    Parent(nix::unistd::Pid),
    /// The new child process.
    Child,
}

/// Number of threads in this process, from `/proc/self/status`.
pub fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// `fork(2)`, refused unless this process has a single thread.
///
/// # Errors
/// The `fork` errno (`EAGAIN`, `ENOMEM`), or an error if other threads exist: a child of a
/// multi-threaded process may find a lock held forever by a thread that does not exist there.
pub fn fork() -> io::Result<Fork> {
    if thread_count()? != 1 {
        return Err(io::Error::other(
            "refusing to fork a multi-threaded process",
        ));
    }
    // SAFETY: the process has exactly one thread (checked just above, and nothing between
    // the check and the call starts one), so the child gets a consistent copy of every lock
    // and allocator state and may go on running ordinary Rust code.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { child } => Ok(Fork::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Fork::Child),
    }
}

/// In a freshly forked child: ask the kernel to send SIGTERM to this process when its parent
/// dies, so that workers never outlive a server that was killed (SIGKILL cannot be caught
/// to stop them). If the parent is already gone (it died between `fork` and this call), the
/// child exits at once.
///
/// # Errors
/// `prctl`'s errno.
pub fn die_with_parent(parent: nix::unistd::Pid) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
    if nix::unistd::getppid() != parent {
        std::process::exit(0);
    }
    Ok(())
}

/// Have the process `cmd` will start receive `signal` when the thread spawning it exits
/// (the kernel's parent-death signal, `PR_SET_PDEATHSIG`), so it never outlives its parent,
/// whatever ends the parent. If the parent is already gone when the child gets there, the
/// spawn fails instead.
pub fn kill_with_parent(cmd: &mut std::process::Command, signal: nix::sys::signal::Signal) {
    use std::os::unix::process::CommandExt as _;
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec; it only makes
    // async-signal-safe system calls (prctl, getppid) and builds an `io::Error` from an
    // errno, which does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal)?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Install `handler` for `signal` with `flags` (an empty mask while it runs); returns the
/// handler that was in place.
///
/// # Errors
/// `sigaction`'s errno (`EINVAL` for a signal that cannot be caught).
pub fn set_handler(
    signal: nix::sys::signal::Signal,
    handler: nix::sys::signal::SigHandler,
    flags: nix::sys::signal::SaFlags,
) -> io::Result<nix::sys::signal::SigHandler> {
    use nix::sys::signal::{SigAction, SigSet};
    let action = SigAction::new(handler, flags, SigSet::empty());
    // SAFETY: the handlers socklab installs (in `signals`) only touch atomics and call
    // `write(2)`, both async-signal-safe; `SIG_IGN`/`SIG_DFL` need no care.
    let before = unsafe { nix::sys::signal::sigaction(signal, &action) }?;
    Ok(before.handler())
}

/// `poll(2)` on a caller-kept array of `pollfd`, retrying nothing: `EINTR` is returned as
/// [`io::ErrorKind::Interrupted`] so the caller can look at its signal flags. `None` waits
/// forever.
///
/// # Errors
/// `poll`'s errno.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout_ms(timeout);
    // SAFETY: `fds` is a valid, exclusively borrowed slice of `pollfd` whose length is passed
    // along with it; the kernel writes only the `revents` fields within it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A wait timeout in whole milliseconds for `poll`/`epoll_wait`: -1 for none, rounded up so
/// that a deadline 0.4 ms away does not become a busy loop of 0 ms waits.
pub fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        Some(t) => t.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
    }
}

/// Counters in memory shared by a process and the children it forks later (an anonymous
/// `MAP_SHARED` mapping): how the process-based models count connections across processes.
/// Several cells, so that each preforked worker counts in its own and the parent can take
/// a killed worker's count back ([`SharedCounter::cell`]).
#[derive(Debug)]
pub struct SharedCounter {
    ptr: std::ptr::NonNull<AtomicUsize>,
    cells: usize,
}

// SAFETY: the pointees are `AtomicUsize`s, which may be used from any thread; the mapping
// lives as long as the `SharedCounter`.
unsafe impl Send for SharedCounter {}
// SAFETY: as above, only atomic operations reach the shared memory.
unsafe impl Sync for SharedCounter {}

impl SharedCounter {
    /// Map a new counter of one cell, starting at zero.
    ///
    /// # Errors
    /// `mmap`'s errno.
    pub fn new() -> io::Result<SharedCounter> {
        SharedCounter::with_cells(1)
    }

    /// Map `cells` counters (at least one), all starting at zero.
    ///
    /// # Errors
    /// `mmap`'s errno.
    pub fn with_cells(cells: usize) -> io::Result<SharedCounter> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let cells = cells.max(1);
        let bytes = cells
            .checked_mul(std::mem::size_of::<AtomicUsize>())
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh anonymous mapping, not aliasing any Rust object; the kernel
        // zero-fills it, and an all-zero `AtomicUsize` is a valid 0.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(SharedCounter {
            ptr: ptr.cast(),
            cells,
        })
    }

    /// The first cell.
    pub fn get(&self) -> &AtomicUsize {
        self.cell(0)
    }

    /// Cell `i` (the last one if `i` is past the end).
    pub fn cell(&self, i: usize) -> &AtomicUsize {
        let i = i.min(self.cells - 1);
        // SAFETY: `ptr` points to a live, page-aligned mapping of `cells` `AtomicUsize`s
        // (see `with_cells`) and `i < cells`; only shared references are ever made to them.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }

    /// Number of cells.
    pub fn cells(&self) -> usize {
        self.cells
    }

    /// The sum of every cell.
    pub fn total(&self) -> usize {
        (0..self.cells)
            .map(|i| self.cell(i).load(std::sync::atomic::Ordering::SeqCst))
            .fold(0usize, usize::wrapping_add)
    }
}

impl Drop for SharedCounter {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `with_cells` with this length and is not used
        // after drop (every reference handed out borrows `self`).
        let _ = unsafe {
            nix::sys::mman::munmap(
                self.ptr.cast(),
                self.cells * std::mem::size_of::<AtomicUsize>(),
            )
        };
    }
}

/// Raise this process's soft limit on open descriptors to its hard limit (`serve` and
/// `bench` both need it: 10,000 connections are 10,000 descriptors, and the usual soft
/// limit is 1,024). Returns the limit now in force.
///
/// # Errors
/// `getrlimit`/`setrlimit` errors.
pub fn raise_fd_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// Types that own their descriptor, so it stays open and the same while they live: the
/// condition tokio's `AsyncFd::register` asks its caller to uphold.
pub trait OwnsFd: std::os::fd::AsRawFd {}
impl OwnsFd for socket2::Socket {}
impl OwnsFd for std::os::fd::OwnedFd {}

/// Register an owned descriptor with the current tokio runtime.
///
/// # Errors
/// The registration error (e.g. the descriptor cannot be watched by epoll).
///
/// # Panics
/// Outside a tokio runtime.
pub fn async_fd<T: OwnsFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `T: OwnsFd` owns its descriptor: it is valid and open for as long as the value
    // lives (which the `AsyncFd` owns), and `as_raw_fd` always returns that same descriptor.
    unsafe { tokio::io::unix::AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}

/// A read-only mapping of part of a file (the `mmap` send strategy).
#[derive(Debug)]
pub struct Mapping {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
    /// Where the requested bytes start inside the (page-aligned) mapping.
    skip: usize,
}

impl Mapping {
    /// Map `len` bytes of `file` from `offset`. The file's current size is checked first: a
    /// region past the end is refused (`EIO`) instead of mapped, since touching a mapped
    /// page beyond the end of a file raises SIGBUS. (A file truncated by another process
    /// *while* mapped can still do so; serve files nobody truncates, or use `sendfile`.)
    ///
    /// # Errors
    /// `fstat`/`mmap` errors, or `EIO` for a region past the end of the file.
    pub fn new(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Mapping> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let size = file.metadata()?.len();
        if len == 0 || offset.saturating_add(len as u64) > size {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let page = 4096u64;
        let aligned = offset - offset % page;
        let skip = (offset - aligned) as usize;
        let total = std::num::NonZeroUsize::new(len + skip).expect("len > 0");
        // SAFETY: a fresh private read-only mapping of an open file, not aliasing any Rust
        // object; its bytes are only read through `as_slice` while `self` lives, and the
        // region lies within the file's current size (checked above).
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                total,
                ProtFlags::PROT_READ,
                MapFlags::MAP_PRIVATE,
                file,
                aligned as libc::off_t,
            )
        }?;
        Ok(Mapping {
            ptr,
            len: len + skip,
            skip,
        })
    }

    /// The mapped bytes that were asked for.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` readable bytes mapped by `new` and kept until drop.
        let all = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const u8, self.len) };
        &all[self.skip..]
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length, and no slice
        // of it outlives `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn shared_counter_starts_at_zero_and_counts() {
        let c = SharedCounter::new().unwrap();
        assert_eq!(c.get().fetch_add(2, Ordering::SeqCst), 0);
        assert_eq!(c.get().load(Ordering::SeqCst), 2);
        let c = SharedCounter::with_cells(3).unwrap();
        c.cell(0).fetch_add(1, Ordering::SeqCst);
        c.cell(2).fetch_add(5, Ordering::SeqCst);
        assert_eq!((c.cells(), c.total()), (3, 6));
        assert_eq!(
            c.cell(9).load(Ordering::SeqCst),
            5,
            "clamped to the last cell"
        );
    }

    #[test]
    fn the_soft_descriptor_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, Resource};
        let limit = raise_fd_limit().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (limit, limit));
    }

    #[test]
    fn fork_is_refused_with_threads() {
        // The test harness runs tests on threads, so this process has more than one.
        if thread_count().unwrap() > 1 {
            assert!(fork().is_err());
        }
    }

    #[test]
    fn poll_times_out_on_a_quiet_pipe() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        use std::os::fd::AsRawFd;
        let mut fds = [libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(5))).unwrap(), 0);
    }
}
