//! The IPC module's few `unsafe` system calls, each wrapped once with its `SAFETY` note:
//! shared mappings, `futex`, POSIX semaphores, SysV message queues, `tgkill`/`sigwaitinfo`,
//! and the signal handlers that release named resources on Ctrl-C.
//!
//! Everything else in `ipc` goes through safe wrappers (`nix`, `socket2`, `std`) and is
//! denied `unsafe` outright.

use std::cell::UnsafeCell;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU8, Ordering};

/// A zero-filled anonymous `MAP_SHARED` mapping: after `fork`, parent and child see the same
/// bytes; between threads it is plain shared memory. Only reached through atomics or through
/// copies ordered by atomics (see the users).
#[derive(Debug)]
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by the `Region`; every access to its bytes goes through atomics
// or through copies whose ordering is established by acquire/release atomics (the ring).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Map `len` zeroed bytes (rounded up by the kernel to whole pages).
    ///
    /// # Errors
    /// `mmap`'s errno (`ENOMEM`).
    pub fn new(len: usize) -> io::Result<Region> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let size = NonZeroUsize::new(len.max(1)).expect("non-zero");
        // SAFETY: a fresh anonymous mapping aliases no Rust object; the kernel zero-fills it.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }?;
        Ok(Region {
            ptr: ptr.cast(),
            len: size.get(),
        })
    }

    /// The mapping's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte of the mapping.
    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// An atomic 32-bit word at byte offset `at` (4-aligned, inside the mapping).
    ///
    /// # Panics
    /// If `at` is misaligned or out of range (a bug in the caller's layout).
    pub fn u32_at(&self, at: usize) -> &AtomicU32 {
        assert!(
            at.is_multiple_of(4) && at + 4 <= self.len,
            "bad layout: u32 at {at}"
        );
        // SAFETY: in range and aligned (checked above); the mapping lives as long as `self`,
        // and atomics make concurrent access from the other side well defined.
        unsafe { &*(self.ptr.as_ptr().add(at) as *const AtomicU32) }
    }

    /// An atomic 32-bit signed word at byte offset `at`.
    pub fn i32_at(&self, at: usize) -> &AtomicI32 {
        assert!(
            at.is_multiple_of(4) && at + 4 <= self.len,
            "bad layout: i32 at {at}"
        );
        // SAFETY: as in `u32_at`.
        unsafe { &*(self.ptr.as_ptr().add(at) as *const AtomicI32) }
    }

    /// An atomic byte at offset `at`.
    pub fn u8_at(&self, at: usize) -> &AtomicU8 {
        assert!(at < self.len, "bad layout: u8 at {at}");
        // SAFETY: in range; atomics make concurrent access well defined.
        unsafe { &*(self.ptr.as_ptr().add(at) as *const AtomicU8) }
    }

    /// Copy `src` into the mapping at `at`. The caller orders this write before the other
    /// side's read with a release store it pairs with an acquire load.
    ///
    /// # Panics
    /// If the range leaves the mapping.
    pub fn write(&self, at: usize, src: &[u8]) {
        assert!(at + src.len() <= self.len, "write out of range");
        // SAFETY: the range is inside the mapping (checked); the protocol (the ring's head
        // and tail counters) guarantees the other side does not touch these bytes until the
        // release store that follows.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(at), src.len()) }
    }

    /// Copy bytes of the mapping at `at` into `dst`; ordered like [`Region::write`].
    ///
    /// # Panics
    /// If the range leaves the mapping.
    pub fn read(&self, at: usize, dst: &mut [u8]) {
        assert!(at + dst.len() <= self.len, "read out of range");
        // SAFETY: the range is inside the mapping (checked); the writer finished with these
        // bytes before the release store our caller acquired.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), dst.as_mut_ptr(), dst.len())
        }
    }

    /// A POSIX semaphore placed at byte offset `at` (aligned to 8), initialised to `value`
    /// and shared between processes.
    ///
    /// # Errors
    /// `sem_init`'s errno.
    pub fn sem_at(&self, at: usize, value: u32) -> io::Result<&Sem> {
        let size = std::mem::size_of::<libc::sem_t>();
        assert!(
            at.is_multiple_of(8) && at + size <= self.len,
            "bad layout: sem at {at}"
        );
        // SAFETY: the place is inside the mapping, aligned, zeroed and used for nothing else;
        // `sem_init` with pshared = 1 is valid in memory shared across `fork`.
        let place = unsafe { self.ptr.as_ptr().add(at) } as *mut libc::sem_t;
        // SAFETY: `place` is valid for writes of a sem_t (see above).
        if unsafe { libc::sem_init(place, 1, value) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `Sem` is a transparent wrapper of `UnsafeCell<sem_t>`; the semaphore now
        // lives as long as the mapping, which outlives the reference.
        Ok(unsafe { &*(place as *const Sem) })
    }

    /// The semaphore a previous [`Region::sem_at`] placed at `at`.
    pub fn sem(&self, at: usize) -> &Sem {
        let size = std::mem::size_of::<libc::sem_t>();
        assert!(
            at.is_multiple_of(8) && at + size <= self.len,
            "bad layout: sem at {at}"
        );
        // SAFETY: in range and aligned; the caller initialised a semaphore there with
        // `sem_at` (a zeroed, never-initialised place is the caller's bug, not memory
        // unsafety: sem_wait on it would block).
        unsafe { &*(self.ptr.as_ptr().add(at) as *const Sem) }
    }

    /// An atomic 64-bit word at byte offset `at` (8-aligned).
    pub fn u64_at(&self, at: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(
            at.is_multiple_of(8) && at + 8 <= self.len,
            "bad layout: u64 at {at}"
        );
        // SAFETY: as in `u32_at`.
        unsafe { &*(self.ptr.as_ptr().add(at) as *const std::sync::atomic::AtomicU64) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` with this address and length, and every
        // reference into it borrows `self`.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}

/// `FUTEX_WAIT`: sleep while `word` holds `expected` (shared futex: works across `fork`).
/// Returns at once if it holds something else.
///
/// # Errors
/// `EINTR` as [`io::ErrorKind::Interrupted`]; `EAGAIN` (the word changed) is `Ok`.
pub fn futex_wait(word: &AtomicU32, expected: u32) -> io::Result<()> {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAIT only reads it; no timeout.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            std::ptr::null::<libc::timespec>(),
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Ok(()),
        _ => Err(e),
    }
}

/// `FUTEX_WAKE`: wake up to `n` waiters sleeping on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n);
    }
}

/// A POSIX semaphore (`sem_t`), in process memory ([`Sem::boxed`]) or in a shared mapping
/// ([`Region::sem_at`]).
#[repr(transparent)]
pub struct Sem(UnsafeCell<libc::sem_t>);

// SAFETY: sem_wait/sem_post are made for concurrent use from many threads and processes.
unsafe impl Send for Sem {}
// SAFETY: as above.
unsafe impl Sync for Sem {}

impl std::fmt::Debug for Sem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sem")
    }
}

/// A semaphore of this process, on the heap so it never moves.
#[derive(Debug)]
pub struct BoxedSem(Box<Sem>);

impl std::ops::Deref for BoxedSem {
    type Target = Sem;
    fn deref(&self) -> &Sem {
        &self.0
    }
}

impl Drop for BoxedSem {
    fn drop(&mut self) {
        // SAFETY: initialised by `boxed`, and no thread waits on it any more (we own it).
        unsafe { libc::sem_destroy(self.0 .0.get()) };
    }
}

impl Sem {
    /// A semaphore private to this process, starting at `value`.
    ///
    /// # Errors
    /// `sem_init`'s errno (`EINVAL` above `SEM_VALUE_MAX`).
    pub fn boxed(value: u32) -> io::Result<BoxedSem> {
        // SAFETY: a zeroed sem_t is a valid place for sem_init to write into.
        let b = Box::new(Sem(UnsafeCell::new(unsafe { std::mem::zeroed() })));
        // SAFETY: the box gives the semaphore a fixed address for its whole life.
        if unsafe { libc::sem_init(b.0.get(), 0, value) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(BoxedSem(b))
    }

    /// `sem_wait` (P, down): take one unit, sleeping while there is none.
    ///
    /// # Errors
    /// `EINTR` as [`io::ErrorKind::Interrupted`].
    pub fn wait(&self) -> io::Result<()> {
        // SAFETY: the semaphore was initialised (`boxed`/`sem_at`) and lives as long as `self`.
        if unsafe { libc::sem_wait(self.0.get()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `sem_post` (V, up): add one unit, waking a sleeper.
    pub fn post(&self) {
        // SAFETY: as in `wait`.
        unsafe { libc::sem_post(self.0.get()) };
    }
}

/// The size of `mtype` at the head of a SysV message buffer.
const MSG_HEADER: usize = std::mem::size_of::<libc::c_long>();

/// The SysV key of socklab's queue number `n` in process `pid`: `0x51PPPPnn` (the low 16
/// bits of the pid), so `ipcs -q` shows whose queue it is.
pub fn msg_key(pid: u32, n: u8) -> i32 {
    (0x5100_0000u32 | ((pid & 0xffff) << 8) | u32::from(n)) as i32
}

static MSG_NEXT: AtomicU32 = AtomicU32::new(0);

/// A new SysV message queue of this process (`msgget(key, IPC_CREAT | IPC_EXCL)` with a key
/// from [`msg_key`]), removed by [`msg_remove`].
///
/// # Errors
/// `msgget`'s errno (`ENOSPC`: `kernel.msgmni` queues exist; `EEXIST` for 256 keys in a row).
pub fn msg_create() -> io::Result<i32> {
    let pid = std::process::id();
    let mut last = io::Error::from_raw_os_error(libc::EEXIST);
    for _ in 0..256 {
        let n = (MSG_NEXT.fetch_add(1, Ordering::SeqCst) & 0xff) as u8;
        // SAFETY: plain system call with integer arguments.
        let id = unsafe { libc::msgget(msg_key(pid, n), libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
        if id >= 0 {
            return Ok(id);
        }
        last = io::Error::last_os_error();
        if last.raw_os_error() != Some(libc::EEXIST) {
            break;
        }
    }
    Err(last)
}

/// Remove a SysV message queue (`msgctl(IPC_RMID)`); async-signal-safe.
pub fn msg_remove(id: i32) {
    // SAFETY: IPC_RMID takes no buffer (null is allowed).
    unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
}

/// A buffer laid out as `struct msgbuf { long mtype; char mtext[]; }`.
#[derive(Debug)]
pub struct MsgBuf {
    words: Vec<libc::c_long>,
    cap: usize,
}

impl MsgBuf {
    /// A buffer for messages of up to `cap` bytes, with `mtype` 1.
    pub fn new(cap: usize) -> MsgBuf {
        let words = vec![1; 1 + cap.div_ceil(MSG_HEADER)];
        MsgBuf { words, cap }
    }

    fn text_mut(&mut self) -> &mut [u8] {
        let cap = self.cap;
        // SAFETY: the vector holds 1 + ceil(cap / 8) longs, so the `cap` bytes after the first
        // long are inside it; u8 has no alignment or validity requirements.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().add(1) as *mut u8, cap) }
    }

    /// `msgsnd` of `text` (at most `cap` bytes), blocking while the queue is full.
    ///
    /// # Errors
    /// `EINTR` as Interrupted; `EINVAL` above `msgmax`; `EIDRM` if the queue was removed.
    pub fn send(&mut self, id: i32, text: &[u8]) -> io::Result<()> {
        assert!(text.len() <= self.cap, "message larger than its buffer");
        self.words[0] = 1;
        self.text_mut()[..text.len()].copy_from_slice(text);
        // SAFETY: the buffer starts with the mtype long and holds `text.len()` bytes after it.
        let r = unsafe { libc::msgsnd(id, self.words.as_ptr().cast(), text.len(), 0) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `msgrcv` of the next message into `out`; its length. `E2BIG` if it is larger than
    /// `out` (the message stays queued).
    ///
    /// # Errors
    /// `EINTR` as Interrupted, `E2BIG`, `EIDRM`.
    pub fn recv(&mut self, id: i32, out: &mut [u8]) -> io::Result<usize> {
        let max = out.len().min(self.cap);
        // SAFETY: the buffer has room for the mtype long and `max` <= cap bytes after it.
        let n = unsafe { libc::msgrcv(id, self.words.as_mut_ptr().cast(), max, 0, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        out[..n].copy_from_slice(&self.text_mut()[..n]);
        Ok(n)
    }
}

/// The calling thread's kernel id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// Send `sig` to one thread (`tgkill`): the way a wake-up reaches exactly the waiting thread,
/// in another process or in this one.
pub fn tgkill(pid: i32, tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain system call with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Wait for `sig`, which the calling thread keeps blocked (`sigwaitinfo`).
///
/// # Errors
/// `EINTR` (another signal's handler ran: the interrupt) as Interrupted.
pub fn wait_signal(sig: nix::sys::signal::Signal) -> io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(sig);
    // SAFETY: the set is a valid sigset_t; a null info pointer is allowed.
    let r = unsafe { libc::sigwaitinfo(set.as_ref(), std::ptr::null_mut()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Send `sig` to a thread of this process (`pthread_kill`).
pub fn pthread_kill(thread: libc::pthread_t, sig: i32) {
    // SAFETY: `thread` names a thread that is still joinable (its owner joins it later).
    unsafe { libc::pthread_kill(thread, sig) };
}

/// The calling thread's `pthread_t`.
pub fn pthread_self() -> libc::pthread_t {
    // SAFETY: always safe to call.
    unsafe { libc::pthread_self() }
}

/// How many times an interrupt (SIGUSR2: "the other side failed") or SIGCHLD has arrived:
/// waits that never enter the kernel (spinning) compare it to notice one.
pub static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

const SLOTS: usize = 8;
const PATH_MAX: usize = 256;

/// Named resources to release if SIGINT/SIGTERM ends the run: SysV queue ids, child pids,
/// paths (files, then directories).
static SYSV: [AtomicI32; SLOTS] = [const { AtomicI32::new(-1) }; SLOTS];
static PIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static PATH_USED: [AtomicBool; SLOTS] = [const { AtomicBool::new(false) }; SLOTS];
static PATHS: [[AtomicU8; PATH_MAX]; SLOTS] =
    [const { [const { AtomicU8::new(0) }; PATH_MAX] }; SLOTS];

fn claim<T>(slots: &[T], free: impl Fn(&T) -> bool) -> Option<usize> {
    slots.iter().position(free)
}

/// Remember a SysV queue to remove on SIGINT; forget it with [`forget_sysv`].
pub fn remember_sysv(id: i32) {
    for s in &SYSV {
        if s.compare_exchange(-1, id, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Forget a SysV queue (it was removed).
pub fn forget_sysv(id: i32) {
    for s in &SYSV {
        let _ = s.compare_exchange(id, -1, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Remember a child to kill on SIGINT.
pub fn remember_pid(pid: i32) {
    for s in &PIDS {
        if s.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
}

/// Forget a child (it was reaped).
pub fn forget_pid(pid: i32) {
    for s in &PIDS {
        let _ = s.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Remember a path to unlink (or rmdir) on SIGINT; `None` if it is too long or all slots are
/// taken (the normal cleanup still removes it).
pub fn remember_path(path: &std::path::Path) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= PATH_MAX {
        return None;
    }
    let i = claim(&PATH_USED, |u| !u.load(Ordering::SeqCst))?;
    for (k, b) in bytes.iter().chain(std::iter::once(&0)).enumerate() {
        PATHS[i][k].store(*b, Ordering::SeqCst);
    }
    PATH_USED[i].store(true, Ordering::SeqCst);
    Some(i)
}

/// Forget a remembered path (it was removed).
pub fn forget_path(slot: Option<usize>) {
    if let Some(i) = slot {
        PATH_USED[i].store(false, Ordering::SeqCst);
    }
}

/// Release everything remembered; async-signal-safe (atomics and raw system calls only).
fn release_all() {
    for s in &PIDS {
        let pid = s.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for s in &SYSV {
        let id = s.load(Ordering::SeqCst);
        if id >= 0 {
            msg_remove(id);
        }
    }
    // Files first, then directories (rmdir fails on a directory that is not yet empty).
    for pass in 0..2 {
        for i in 0..SLOTS {
            if !PATH_USED[i].load(Ordering::SeqCst) {
                continue;
            }
            let mut buf = [0u8; PATH_MAX];
            for (k, b) in buf.iter_mut().enumerate() {
                *b = PATHS[i][k].load(Ordering::SeqCst);
            }
            let p = buf.as_ptr() as *const libc::c_char;
            // SAFETY: `buf` is NUL-terminated (remember_path stores the terminator);
            // unlink and rmdir are async-signal-safe.
            unsafe {
                if pass == 0 {
                    libc::unlink(p);
                } else {
                    libc::rmdir(p);
                }
            }
        }
    }
}

extern "C" fn on_stop(_sig: libc::c_int) {
    release_all();
    let msg = b"socklab ipc: interrupted; queues, paths and children released\n";
    // SAFETY: write and _exit are async-signal-safe; the buffer is a static string.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(130);
    }
}

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_doorbell(_sig: libc::c_int) {}

/// Install the handlers of a run: SIGINT/SIGTERM release the remembered resources and exit
/// 130; SIGUSR2 and SIGCHLD interrupt blocking calls (no `SA_RESTART`) so a side notices that
/// the other failed or died; SIGUSR1 (the `shm-signal` doorbell) gets a handler that does
/// nothing, so a stray one never kills; SIGPIPE is ignored.
///
/// # Errors
/// `sigaction`'s errno.
pub fn install_handlers() -> io::Result<()> {
    use nix::sys::signal::{SaFlags, SigHandler, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        set_handler(sig, SigHandler::Handler(on_stop), SaFlags::empty())?;
    }
    for sig in [Signal::SIGUSR2, Signal::SIGCHLD] {
        set_handler(sig, SigHandler::Handler(on_interrupt), SaFlags::empty())?;
    }
    set_handler(
        Signal::SIGUSR1,
        SigHandler::Handler(on_doorbell),
        SaFlags::SA_RESTART,
    )?;
    set_handler(Signal::SIGPIPE, SigHandler::SigIgn, SaFlags::empty())?;
    Ok(())
}

fn set_handler(
    signal: nix::sys::signal::Signal,
    handler: nix::sys::signal::SigHandler,
    flags: nix::sys::signal::SaFlags,
) -> io::Result<()> {
    use nix::sys::signal::{SigAction, SigSet};
    let action = SigAction::new(handler, flags, SigSet::empty());
    // SAFETY: the handlers of this module are async-signal-safe: `on_interrupt` and
    // `on_doorbell` touch one atomic or nothing, `on_stop` makes only raw system calls
    // (kill, msgctl, unlink, rmdir, write, _exit) on data read through atomics.
    unsafe { nix::sys::signal::sigaction(signal, &action) }?;
    Ok(())
}

/// End this process at once (`_exit`): a forked child must not run the parent's destructors
/// or flush the parent's buffered output.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without touching any Rust state.
    unsafe { libc::_exit(code) }
}
