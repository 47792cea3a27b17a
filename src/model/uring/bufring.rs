//! The provided-buffer ring of one io_uring loop: the project's own `unsafe`, kept here.
//!
//! A multishot receive does not name a buffer: each time data arrives the kernel takes the
//! next buffer from a ring the program shares with it, fills it, and names it (its buffer id)
//! in the completion. The program reads the data and gives the buffer back by writing its
//! address, length and id at the ring's tail and publishing the new tail. The ring is an
//! array of 16-byte entries (`struct io_uring_buf`) whose first entry's last two bytes double
//! as the tail (`struct io_uring_buf_ring`); it must be page-aligned. When the kernel finds the
//! ring empty, the receive ends with `ENOBUFS` and the data stays in the socket: the loop
//! re-arms it once buffers are back (see [`super`]).
//!
//! Who may touch what: a buffer is the kernel's from the moment its entry is published until
//! a completion names it; then it is the loop's, read-only, until [`BufRing::recycle`]
//! publishes it again. The ring's entries between the kernel's head and our tail are the
//! kernel's; we only write the entry at our tail, which is free.

use io_uring::types::BufRingEntry;
use io_uring::IoUring;
use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

/// An anonymous read-write mapping, unmapped on drop.
#[derive(Debug)]
struct Region {
    ptr: NonNull<std::ffi::c_void>,
    len: usize,
}

impl Region {
    fn new(len: usize) -> io::Result<Region> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let size = NonZeroUsize::new(len).ok_or_else(|| io::Error::other("empty mapping"))?;
        // SAFETY: a fresh private anonymous mapping, aliasing no Rust object; the kernel
        // zero-fills and page-aligns it. It is only reached through the pointers of the
        // `BufRing` that owns it, under the rules in the module doc.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(Region { ptr, len })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped by `new` with this address and length; the owning `BufRing` is only
        // dropped after the ring it was registered with stopped using it (see `BufRing`).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// A ring of `count` provided buffers of `size` bytes each, registered with one io_uring as
/// buffer group `group`.
///
/// Drop it only after the io_uring it was registered with is dropped or has no receive in
/// flight (the loop waits for every operation to complete, and leaks the ring if they do
/// not): the kernel writes into buffers it holds.
#[derive(Debug)]
pub struct BufRing {
    entries: Region,
    bufs: Region,
    count: u16,
    size: usize,
    /// Our copy of the tail: where the next buffer given back goes.
    tail: u16,
    group: u16,
}

// SAFETY (for the whole file): the pointer arithmetic below stays inside the two regions:
// entry indexes are masked with `count - 1` (`count` a power of two, `entries` holds `count`
// entries), buffer ids are checked against `count`, and lengths against `size`.
impl BufRing {
    /// Map `count` buffers of `size` bytes and a ring for them, register the ring with `ring`
    /// as buffer group `group`, and hand every buffer to the kernel.
    ///
    /// # Errors
    /// `count` not a power of two in 1..=32768, a size of 0, `mmap` failing, or the kernel
    /// refusing the registration (before Linux 5.19: `EINVAL`).
    pub fn new(ring: &IoUring, count: u16, size: usize, group: u16) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 1 << 15 || size == 0 || size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a buffer ring needs a power of two up to 32768 buffers of 1 byte to 4 GiB, not {count} of {size}"),
            ));
        }
        let entries = Region::new(count as usize * std::mem::size_of::<BufRingEntry>())?;
        let bufs = Region::new(count as usize * size)?;
        // SAFETY: `entries` is page-aligned memory for `count` entries, and it stays mapped
        // as long as the `BufRing` lives, which (see the type's doc) outlives the ring's use
        // of it. It is zeroed, so the tail the kernel reads starts at 0: no buffer yet.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.ptr.as_ptr() as u64,
                count,
                group,
                0,
            )?;
        }
        let mut me = BufRing {
            entries,
            bufs,
            count,
            size,
            tail: 0,
            group,
        };
        for bid in 0..count {
            me.push(bid);
        }
        me.publish();
        Ok(me)
    }

    /// The buffer group id to name in a receive.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Write buffer `bid` at our tail (not yet visible to the kernel: see `publish`).
    fn push(&mut self, bid: u16) {
        let index = (self.tail & (self.count - 1)) as usize;
        let base = self.entries.ptr.as_ptr() as *mut BufRingEntry;
        // SAFETY: `index < count`, so the entry lies inside `entries`. The entry at our tail
        // is not the kernel's (it owns those from its head up to the published tail, and our
        // tail is past them), so writing it races with nothing. `addr`, `len` and `bid` are
        // separate fields; writing them does not touch the tail that shares entry 0.
        let entry = unsafe { &mut *base.add(index) };
        entry.set_addr(self.buf_ptr(bid) as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make every buffer pushed so far visible to the kernel.
    fn publish(&self) {
        let base = self.entries.ptr.as_ptr() as *const BufRingEntry;
        // SAFETY: `base` is the ring's first entry, initialised; the tail is a `u16` in it at
        // an offset the kernel defines (and `BufRingEntry::tail` computes), aligned for a
        // `u16`, so it may be viewed as an `AtomicU16`. The release store orders the entry
        // writes of `push` before the kernel can see the new tail.
        unsafe {
            let tail = BufRingEntry::tail(base) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.count);
        // SAFETY: `bid < count` (every caller checks or generates it so), so the offset is
        // inside `bufs`, which holds `count * size` bytes.
        unsafe { (self.bufs.ptr.as_ptr() as *mut u8).add(bid as usize * self.size) }
    }

    /// The `len` bytes a completion delivered in buffer `bid`, or `None` if the id or the
    /// length is out of range (a kernel that broke the contract: the caller closes the
    /// connection rather than read outside the buffers).
    ///
    /// The buffer is the caller's until [`BufRing::recycle`]; the slice borrows the ring, so
    /// it cannot outlive that.
    pub fn get(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= self.count || len > self.size {
            return None;
        }
        // SAFETY: in range (checked above). A completion named `bid`, so the kernel is done
        // with it and will not touch it until `recycle` publishes it again, which needs
        // `&mut self` and so cannot happen while this shared borrow lives.
        Some(unsafe { std::slice::from_raw_parts(self.buf_ptr(bid), len) })
    }

    /// Give buffer `bid` back to the kernel (an id out of range is ignored).
    pub fn recycle(&mut self, bid: u16) {
        if bid < self.count {
            self.push(bid);
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{cqueue, opcode, types};
    use std::io::Write;
    use std::os::fd::AsRawFd;

    fn ring() -> Option<IoUring> {
        // Where io_uring is refused (a sandbox), there is nothing to test here; the model's
        // refusal is tested in tests/models_new.rs.
        IoUring::new(8).ok()
    }

    #[test]
    fn bad_shapes_are_refused() {
        let Some(r) = ring() else { return };
        assert!(BufRing::new(&r, 3, 16, 0).is_err());
        assert!(BufRing::new(&r, 4, 0, 0).is_err());
    }

    /// Receives through the ring: data lands in the buffers the completions name, an empty
    /// ring ends the receive with ENOBUFS without losing the data, and recycled buffers are
    /// used again.
    #[test]
    fn receives_fill_named_buffers_and_enobufs_loses_nothing() {
        let Some(mut r) = ring() else { return };
        let mut bufs = BufRing::new(&r, 2, 4, 7).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.write_all(b"abcdefghijkl").unwrap();
        let mut got = Vec::new();
        let mut saw_enobufs = false;
        let mut armed = false;
        for _ in 0..20 {
            if !armed {
                let e = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), 7)
                    .build()
                    .user_data(1);
                // SAFETY: the receive names no memory of ours but the registered buffer
                // ring, which stays mapped until the ring is dropped (below, before it).
                unsafe { r.submission().push(&e).unwrap() };
                armed = true;
            }
            r.submit_and_wait(1).unwrap();
            let cqes: Vec<_> = r.completion().map(|c| (c.result(), c.flags())).collect();
            for (res, flags) in cqes {
                armed &= cqueue::more(flags);
                if res == -libc::ENOBUFS {
                    saw_enobufs = true;
                    continue;
                }
                assert!(res > 0, "{res}");
                let bid = cqueue::buffer_select(flags).unwrap();
                got.extend_from_slice(bufs.get(bid, res as usize).unwrap());
                bufs.recycle(bid);
            }
            if got.len() == 12 {
                break;
            }
        }
        assert_eq!(got, b"abcdefghijkl");
        assert!(
            saw_enobufs,
            "two 4-byte buffers cannot take 12 bytes at once"
        );
        assert!(bufs.get(2, 1).is_none() && bufs.get(0, 5).is_none());
        drop(r);
        drop(bufs);
    }
}
