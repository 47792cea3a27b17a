//! The response cache: complete answers (header fields and body) for small files, so that a
//! keep-alive `GET` of a cached file costs one receive, one `statx` and one send -- no open,
//! no close, no `sendfile`, no formatting.
//!
//! Never stale. Every hit is revalidated first: one `statx` of the request's path, beneath
//! the root, compared with what the file was when its answer was built -- device, inode,
//! size, mode, modification and change times. A file written in place has a new size or
//! times, a file replaced (renamed over) or removed no longer has the same inode at that
//! path, a file whose permissions changed has a new mode and change time, a directory on the
//! way that became unreadable makes the `statx` fail: each is a miss, answered by the normal
//! path (open, check, send), exactly as without the cache.
//!
//! Times alone cannot prove that nothing changed: the kernel stamps files with a clock that
//! moves in ticks, so two writes of the same size within one tick leave the same times (the
//! problem git calls "racily clean"). A file is therefore cached only once its change time
//! ([`SETTLE`]) lies in the past: every later change then stamps a time different from the
//! one kept. (`ctime` cannot be set by a user; a clock stepped back by more than that while
//! the server runs defeats this, as it defeats `make`.)
//!
//! Why revalidate instead of inotify: a write through a shared mapping raises no inotify
//! event, a rename of any directory above a file must be watched on every ancestor, the
//! events arrive asynchronously (a loop must read the inotify descriptor before each hit to
//! be sure none is pending, a system call anyway), and watches are a limited resource
//! (`fs.inotify.max_user_watches`). One `statx` per hit is a bounded, local cost; measured
//! in `docs/http.md`.
//!
//! Bounded: at most [`MAX_FILE`] bytes per body, `capacity` bytes (`serve --cache`) and
//! [`MAX_ENTRIES`] entries in all; the oldest entry is dropped first. Only plain `GET` and
//! `HEAD` of a whole file with no conditional or range header are answered from the cache;
//! the rest take the normal path, so `ETag`, `Last-Modified`, 304, 412 and 206 are the same
//! as without it.

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

/// Largest file body kept.
pub const MAX_FILE: u64 = 16 * 1024;
/// Most entries kept.
pub const MAX_ENTRIES: usize = 4096;
/// A file is cached only once its last change is at least this old (see the module doc).
pub const SETTLE: Duration = Duration::from_secs(1);
/// Longest request target kept as a key.
const MAX_KEY: usize = 512;

/// What identifies a file's state: if any of it differs, the cached answer is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of a `stat` result.
    pub fn of(st: &libc::stat) -> Stamp {
        Stamp {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mode: st.st_mode,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }

    /// The stamp of an open file's metadata.
    pub fn of_meta(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mode: m.mode(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// Whether the last change lies at least [`SETTLE`] before `now` (see the module doc).
    fn settled(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let latest = self.ctime.max(self.mtime);
        let Ok(secs) = u64::try_from(latest.0) else {
            return true; // before 1970: long settled
        };
        let changed = Duration::new(secs, latest.1.clamp(0, 999_999_999) as u32);
        changed + SETTLE <= now
    }
}

/// `stat` of `path` beneath `dir`, following symlinks (as the open the answer came from).
pub fn stat_at(dir: BorrowedFd<'_>, path: &std::ffi::CStr) -> Option<libc::stat> {
    nix::sys::stat::fstatat(dir, path, nix::fcntl::AtFlags::empty()).ok()
}

/// The entry a session last validated since its last input arrived (see [`Cache::serve`]).
#[derive(Debug, Default)]
pub struct Checked {
    valid: bool,
    stamp: Stamp,
    key: Vec<u8>,
}

impl Checked {
    /// New input arrived: the next hit is validated again.
    pub fn forget(&mut self) {
        self.valid = false;
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    /// The path beneath the root, for revalidation.
    path: CString,
    stamp: Stamp,
    /// The header fields after `Date` (from `Server:` to `Content-Length:` included, each
    /// with its CRLF), then the body: `bytes[..head]` and `bytes[head..]`.
    bytes: Box<[u8]>,
    head: usize,
}

impl Entry {
    /// The header fields after `Date`, each ending in CRLF (not the blank line).
    pub fn fields(&self) -> &[u8] {
        &self.bytes[..self.head]
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.head..]
    }
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Box<[u8]>, Entry>,
    /// Keys in insertion order: the oldest is dropped first.
    order: VecDeque<Box<[u8]>>,
    bytes: usize,
}

/// A bounded map from request target to answer, shared by the threads of a server.
#[derive(Debug)]
pub struct Cache {
    inner: RwLock<Inner>,
    capacity: usize,
}

impl Cache {
    /// A cache holding at most `capacity` bytes (0: nothing is cached).
    pub fn new(capacity: usize) -> Cache {
        Cache {
            inner: RwLock::new(Inner::default()),
            capacity,
        }
    }

    /// Whether anything may be cached.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// If `target` has an answer whose file is unchanged at its path beneath `root`, hand it
    /// to `serve` and return `true`. A changed or vanished file's entry is dropped.
    ///
    /// `checked` is the caller's memory of the last entry it validated since it last
    /// received input (cleared by the caller on each receive): requests that arrived in one
    /// read were all sent before that read returned, so one `statx` made after it sees
    /// every change made before any of them -- pipelined requests for one file cost one.
    pub fn serve(
        &self,
        target: &[u8],
        root: &impl AsFd,
        checked: &mut Checked,
        serve: impl FnOnce(&Entry),
    ) -> bool {
        if !self.enabled() {
            return false;
        }
        let Ok(inner) = self.inner.read() else {
            return false;
        };
        let Some(entry) = inner.map.get(target) else {
            return false;
        };
        let known = checked.valid && checked.stamp == entry.stamp && checked.key == target;
        let fresh = known
            || stat_at(root.as_fd(), &entry.path).is_some_and(|st| Stamp::of(&st) == entry.stamp);
        if fresh {
            if !known {
                checked.valid = true;
                checked.stamp = entry.stamp;
                checked.key.clear();
                checked.key.extend_from_slice(target);
            }
            serve(entry);
            return true;
        }
        checked.valid = false;
        drop(inner);
        self.forget(target);
        false
    }

    /// Drop the entry of `target`, if any.
    pub fn forget(&self, target: &[u8]) {
        if let Ok(mut inner) = self.inner.write() {
            if let Some(e) = inner.map.remove(target) {
                inner.bytes -= e.bytes.len() + target.len();
                inner.order.retain(|k| &k[..] != target);
            }
        }
    }

    /// Whether a file of `size` bytes with stamp `stamp` may be cached now.
    pub fn wants(&self, target: &[u8], size: u64, stamp: &Stamp) -> bool {
        self.enabled()
            && size <= MAX_FILE
            && target.len() <= MAX_KEY
            && (size as usize) < self.capacity
            && stamp.settled(SystemTime::now())
    }

    /// Keep the answer for `target`: the header `fields` (see [`Entry::fields`]) and `body`
    /// of the file at `path` (beneath the root) whose state was `stamp` when it was read.
    pub fn insert(&self, target: &[u8], path: &[u8], stamp: Stamp, fields: &[u8], body: &[u8]) {
        let Ok(path) = CString::new(path) else {
            return;
        };
        let mut bytes = Vec::with_capacity(fields.len() + body.len());
        bytes.extend_from_slice(fields);
        bytes.extend_from_slice(body);
        let size = bytes.len() + target.len();
        if size > self.capacity {
            return;
        }
        let Ok(mut inner) = self.inner.write() else {
            return;
        };
        if let Some(old) = inner.map.remove(target) {
            inner.bytes -= old.bytes.len() + target.len();
            inner.order.retain(|k| &k[..] != target);
        }
        while inner.bytes + size > self.capacity || inner.map.len() >= MAX_ENTRIES {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(e) = inner.map.remove(&oldest) {
                inner.bytes -= e.bytes.len() + oldest.len();
            }
        }
        let key: Box<[u8]> = target.into();
        inner.order.push_back(key.clone());
        inner.bytes += size;
        inner.map.insert(
            key,
            Entry {
                path,
                stamp,
                bytes: bytes.into_boxed_slice(),
                head: fields.len(),
            },
        );
    }

    /// Entries and bytes held (for tests).
    pub fn usage(&self) -> (usize, usize) {
        self.inner.read().map_or((0, 0), |i| (i.map.len(), i.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn stamp_of(dir: &std::fs::File, name: &str) -> Stamp {
        let c = CString::new(name).unwrap();
        Stamp::of(&stat_at(dir.as_fd(), &c).unwrap())
    }

    fn setup() -> (tempfile::TempDir, std::fs::File) {
        let d = tempfile::tempdir().unwrap();
        let f = std::fs::File::open(d.path()).unwrap();
        (d, f)
    }

    fn age(path: &std::path::Path) {
        let old = SystemTime::now() - Duration::from_secs(3600);
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(old).unwrap();
    }

    fn hit(c: &Cache, dir: &std::fs::File, key: &[u8]) -> Option<Vec<u8>> {
        let mut got = None;
        c.serve(key, dir, &mut Checked::default(), |e| {
            got = Some(e.body().to_vec())
        });
        got
    }

    #[test]
    fn a_fresh_change_is_not_cached_and_every_change_is_seen() {
        let (d, dir) = setup();
        let p = d.path().join("a.txt");
        std::fs::write(&p, b"one").unwrap();
        age(&p);
        let s = stamp_of(&dir, "a.txt");
        let c = Cache::new(1 << 20);
        // The change time is now (setting the modification time changed it): too recent.
        assert!(!c.wants(b"/a.txt", 3, &s));
        let mut old = s;
        old.ctime.0 -= 10;
        assert!(c.wants(b"/a.txt", 3, &old));
        c.insert(b"/a.txt", b"a.txt", s, b"F: 1\r\n", b"one");
        assert_eq!(hit(&c, &dir, b"/a.txt").as_deref(), Some(&b"one"[..]));
        // Written in place, same size: the times differ.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"two").unwrap();
        assert_eq!(hit(&c, &dir, b"/a.txt"), None);
        assert_eq!(c.usage().0, 0, "a stale entry is dropped");
        // Permission change.
        let s = stamp_of(&dir, "a.txt");
        c.insert(b"/a.txt", b"a.txt", s, b"", b"two");
        assert!(hit(&c, &dir, b"/a.txt").is_some());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(hit(&c, &dir, b"/a.txt"), None);
        // Replaced by rename.
        let s = stamp_of(&dir, "a.txt");
        c.insert(b"/a.txt", b"a.txt", s, b"", b"two");
        std::fs::write(d.path().join("b.txt"), b"two").unwrap();
        std::fs::rename(d.path().join("b.txt"), &p).unwrap();
        assert_eq!(hit(&c, &dir, b"/a.txt"), None);
        // Removed.
        let s = stamp_of(&dir, "a.txt");
        c.insert(b"/a.txt", b"a.txt", s, b"", b"two");
        std::fs::remove_file(&p).unwrap();
        assert_eq!(hit(&c, &dir, b"/a.txt"), None);
    }

    #[test]
    fn one_check_per_input_for_one_file() {
        let (d, dir) = setup();
        let p = d.path().join("a");
        std::fs::write(&p, b"one").unwrap();
        let c = Cache::new(1 << 20);
        c.insert(b"/a", b"a", stamp_of(&dir, "a"), b"", b"one");
        let mut checked = Checked::default();
        assert!(c.serve(b"/a", &dir, &mut checked, |_| {}));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&p, b"two").unwrap();
        // The same input (requests that arrived before the change): not checked again.
        assert!(c.serve(b"/a", &dir, &mut checked, |_| {}));
        // New input: checked, and the change is seen.
        checked.forget();
        assert!(!c.serve(b"/a", &dir, &mut checked, |_| {}));
    }

    #[test]
    fn bounded_by_bytes_and_oldest_goes_first() {
        let (d, dir) = setup();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        let s = stamp_of(&dir, "f");
        let c = Cache::new(1000);
        for i in 0..10 {
            let key = format!("/f?{i}");
            c.insert(key.as_bytes(), b"f", s, b"", &[b'x'; 300]);
            assert!(c.usage().1 <= 1000, "{:?}", c.usage());
        }
        assert_eq!(c.usage().0, 3);
        assert!(hit(&c, &dir, b"/f?0").is_none() && hit(&c, &dir, b"/f?9").is_some());
        let off = Cache::new(0);
        off.insert(b"/f", b"f", s, b"", b"x");
        assert!(!off.enabled() && hit(&off, &dir, b"/f").is_none());
    }
}
