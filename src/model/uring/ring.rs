//! The io_uring of one loop: setting it up (and finding out whether this system allows it),
//! the operations the loop submits, tagged so their completions find their connection, and
//! the one wait per turn. The `unsafe` of submitting operations that name our memory is here,
//! each entry point with its contract.

use io_uring::{opcode, squeue, types, IoUring};
use socket2::Socket;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

/// What an operation was for; the low byte of its `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The multishot accept on the listener.
    Accept,
    /// The one-shot poll on the signal pipe.
    Signal,
    /// A connection's multishot receive.
    Recv,
    /// A connection's one output operation (send, file read, or splice).
    Send,
    /// A cancellation (its completion only says whether it found its target).
    Cancel,
}

impl Op {
    fn code(self) -> u64 {
        match self {
            Op::Accept => 1,
            Op::Signal => 2,
            Op::Recv => 3,
            Op::Send => 4,
            Op::Cancel => 5,
        }
    }
}

/// A completion, decoded.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// What the operation was.
    pub op: Option<Op>,
    /// The connection's token (for `Recv`/`Send`).
    pub token: usize,
    /// The connection's generation: a completion for an earlier connection that had the
    /// same token is recognised and ignored.
    pub gen: u32,
    /// The result: a count, or a negated errno.
    pub res: i32,
    /// The completion flags (more to come, buffer id).
    pub flags: u32,
}

/// `user_data` = generation (24 bits) | token (32 bits) | op (8 bits).
pub fn tag(op: Op, token: usize, gen: u32) -> u64 {
    (u64::from(gen & 0xff_ffff) << 40) | ((token as u64 & 0xffff_ffff) << 8) | op.code()
}

fn untag(data: u64, res: i32, flags: u32) -> Done {
    let op = match data & 0xff {
        1 => Some(Op::Accept),
        2 => Some(Op::Signal),
        3 => Some(Op::Recv),
        4 => Some(Op::Send),
        5 => Some(Op::Cancel),
        _ => None,
    };
    Done {
        op,
        token: ((data >> 8) & 0xffff_ffff) as usize,
        gen: (data >> 40) as u32,
        res,
        flags,
    }
}

/// Why `--model uring` cannot run here, worded for the one-line error.
pub fn unavailable(err: &io::Error) -> String {
    let why = match err.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (or a seccomp filter hides it)",
        Some(libc::EPERM) | Some(libc::EACCES) => {
            "refused by the kernel.io_uring_disabled sysctl or a seccomp filter"
        }
        _ => "its setup failed",
    };
    format!("io_uring is not available on this system: {why} ({err}); use --model reactors")
}

/// One loop's ring.
pub struct Ring {
    /// The ring itself (public for the buffer ring's registration).
    pub uring: IoUring,
    /// Operations submitted whose final completion has not been seen.
    pub in_flight: usize,
    done: Vec<Done>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Ring {
    /// A ring for `entries` submissions (and 16 times as many completions), with
    /// `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel has them (6.1+): completions are
    /// processed only when this thread waits for them, with no interrupt of the thread
    /// meanwhile. It must be used by the thread that created it.
    ///
    /// # Errors
    /// `io_uring_setup`'s errno: `ENOSYS` (no io_uring, or hidden by seccomp), `EPERM`
    /// (`kernel.io_uring_disabled`, seccomp), `ENOMEM`.
    pub fn new(entries: u32) -> io::Result<Ring> {
        let fast = IoUring::builder()
            .setup_cqsize(entries * 16)
            .setup_submit_all()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries);
        let uring = match fast {
            Ok(r) => r,
            // An older kernel does not know the flags: the same ring without them.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
                .setup_cqsize(entries * 16)
                .build(entries)?,
            Err(e) => return Err(e),
        };
        if !uring.params().is_feature_nodrop() || !uring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring lacks NODROP or EXT_ARG (Linux 5.11+)",
            ));
        }
        Ok(Ring {
            uring,
            in_flight: 0,
            done: Vec::new(),
        })
    }

    /// Queue `entry`, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer `entry` names must stay valid, and not be moved, freed or (for a buffer
    /// the kernel writes) read or written by us, until its final completion is seen.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller's contract.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // Completions are backed up: take them (they are handed out by the next
                    // `wait`), then the kernel has room to accept submissions again.
                    self.collect();
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Queue an operation that names no memory of ours.
    fn push_plain(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: the entry refers to descriptors only (or to the registered buffer ring,
        // which outlives the ring's use of it): no buffer of ours to keep alive.
        unsafe { self.push(entry) }
    }

    /// A multishot accept on `listener`: close-on-exec, non-blocking sockets. (The ring's
    /// sends and receives wait for readiness themselves whatever the flag; it matters for
    /// `splice` into the socket, which runs on a kernel worker thread: non-blocking, it
    /// returns `EAGAIN` instead of holding that thread while a peer does not read.)
    pub fn accept(&mut self, listener: RawFd) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(tag(Op::Accept, 0, 0));
        self.push_plain(e)
    }

    /// A one-shot poll for input on `fd` (the signal pipe).
    pub fn poll_in(&mut self, fd: RawFd) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(tag(Op::Signal, 0, 0));
        self.push_plain(e)
    }

    /// A one-shot poll for room to send on `fd`, as a connection's output operation.
    pub fn poll_out(&mut self, fd: RawFd, token: usize, gen: u32) -> io::Result<()> {
        let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(tag(Op::Send, token, gen));
        self.push_plain(e)
    }

    /// A multishot receive on `fd` into buffers of `group`.
    pub fn recv(&mut self, fd: RawFd, group: u16, token: usize, gen: u32) -> io::Result<()> {
        let e = opcode::RecvMulti::new(types::Fd(fd), group)
            .build()
            .user_data(tag(Op::Recv, token, gen));
        self.push_plain(e)
    }

    /// Send `len` bytes at `buf` on `fd`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid and unchanged until the send's completion is seen.
    pub unsafe fn send(
        &mut self,
        fd: RawFd,
        buf: *const u8,
        len: usize,
        more: bool,
        token: usize,
        gen: u32,
    ) -> io::Result<()> {
        let mut flags = libc::MSG_NOSIGNAL;
        if more {
            flags |= libc::MSG_MORE;
        }
        let e = opcode::Send::new(types::Fd(fd), buf, len.min(u32::MAX as usize) as u32)
            .flags(flags)
            .build()
            .user_data(tag(Op::Send, token, gen));
        // SAFETY: the caller's contract.
        unsafe { self.push(e) }
    }

    /// Read `len` bytes of file `fd` at `offset` into `buf`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid, and be neither read nor written by us, until the
    /// read's completion is seen.
    pub unsafe fn read(
        &mut self,
        fd: RawFd,
        buf: *mut u8,
        len: usize,
        offset: u64,
        token: usize,
        gen: u32,
    ) -> io::Result<()> {
        let e = opcode::Read::new(types::Fd(fd), buf, len.min(u32::MAX as usize) as u32)
            .offset(offset)
            .build()
            .user_data(tag(Op::Send, token, gen));
        // SAFETY: the caller's contract.
        unsafe { self.push(e) }
    }

    /// `splice(2)` `len` bytes from `from` (at `offset`, or its own position for a pipe:
    /// `None`) to `to`.
    #[allow(clippy::too_many_arguments)]
    pub fn splice(
        &mut self,
        from: RawFd,
        offset: Option<u64>,
        to: RawFd,
        len: usize,
        token: usize,
        gen: u32,
    ) -> io::Result<()> {
        let off_in = offset.map_or(-1, |o| o as i64);
        let e = opcode::Splice::new(
            types::Fd(from),
            off_in,
            types::Fd(to),
            -1,
            len.min(u32::MAX as usize) as u32,
        )
        .flags(libc::SPLICE_F_MOVE)
        .build()
        .user_data(tag(Op::Send, token, gen));
        self.push_plain(e)
    }

    /// Cancel every operation on `fd`.
    pub fn cancel_fd(&mut self, fd: RawFd) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(tag(Op::Cancel, 0, 0));
        self.push_plain(e)
    }

    /// Cancel the operation tagged `data`.
    pub fn cancel(&mut self, data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(data)
            .build()
            .user_data(tag(Op::Cancel, 0, 0));
        self.push_plain(e)
    }

    /// Cancel every operation of this ring.
    pub fn cancel_all(&mut self) -> io::Result<()> {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(tag(Op::Cancel, 0, 0));
        self.push_plain(e)
    }

    /// Move the completions out of the queue into our list.
    fn collect(&mut self) {
        for c in self.uring.completion() {
            let d = untag(c.user_data(), c.result(), c.flags());
            let last =
                !(io_uring::cqueue::more(d.flags) && matches!(d.op, Some(Op::Accept | Op::Recv)));
            if last {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            self.done.push(d);
        }
    }

    /// The turn's one system call: submit everything queued and wait until at least one
    /// completion is there or `timeout` passes (`None`: no limit). The completions are put in
    /// `out` (emptied first).
    ///
    /// # Errors
    /// `io_uring_enter`'s errno other than `EINTR` (a signal: the signal pipe's poll will
    /// say which), `ETIME` (the timeout) and `EBUSY` (completions backed up: they are taken
    /// now, and the next turn submits).
    pub fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Done>) -> io::Result<()> {
        let r = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
            None => self.uring.submit_and_wait(1),
        };
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::ETIME | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        self.collect();
        out.clear();
        out.append(&mut self.done);
        Ok(())
    }
}

/// Take ownership of a descriptor a completion returned (an accepted connection).
pub fn adopt(fd: RawFd) -> Socket {
    // SAFETY: `fd` is a new descriptor the kernel just created for us (a successful accept's
    // result); nothing else in the process knows or owns it.
    unsafe { Socket::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (op, token, gen) in [
            (Op::Recv, 0usize, 0u32),
            (Op::Send, 123_456, 0xff_ffff),
            (Op::Accept, 0, 0),
            (Op::Cancel, 7, 1),
        ] {
            let d = untag(tag(op, token, gen), -4, 2);
            assert_eq!(
                (d.op, d.token, d.gen, d.res, d.flags),
                (Some(op), token, gen, -4, 2)
            );
        }
        assert_eq!(untag(0, 0, 0).op, None);
    }

    /// More completions than the completion queue holds: none is lost (the kernel keeps the
    /// overflow, `NODROP`) and each wait brings the next ones.
    #[test]
    fn completions_past_a_full_queue_all_arrive() {
        let Ok(uring) = IoUring::builder().setup_cqsize(8).build(4) else {
            return; // io_uring refused here: tests/models_new.rs checks the refusal
        };
        let mut ring = Ring {
            uring,
            in_flight: 0,
            done: Vec::new(),
        };
        for i in 0..64 {
            ring.push_plain(opcode::Nop::new().build().user_data(tag(Op::Send, i, 0)))
                .unwrap();
        }
        // The queue did overflow: the kernel holds completions (or refused a submission
        // with EBUSY until we took some).
        assert!(ring.uring.submission().cq_overflow() || !ring.done.is_empty());
        let mut seen = [false; 64];
        let mut done = Vec::new();
        for _ in 0..100 {
            if ring.in_flight == 0 {
                break;
            }
            ring.wait(Some(Duration::from_millis(100)), &mut done)
                .unwrap();
            for d in &done {
                seen[d.token] = true;
            }
        }
        assert_eq!(ring.in_flight, 0);
        assert!(seen.iter().all(|&s| s), "a completion was lost");
    }

    #[test]
    fn refusals_name_the_cause_and_the_alternative() {
        let m = unavailable(&io::Error::from_raw_os_error(libc::EPERM));
        assert!(
            m.contains("io_uring_disabled") && m.contains("--model reactors"),
            "{m}"
        );
        let m = unavailable(&io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(m.contains("no io_uring") && !m.contains('\n'), "{m}");
    }
}
