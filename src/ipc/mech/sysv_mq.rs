//! `sysv-mq`: two System V message queues (`msgget`), one per direction, with keys
//! `0x51PPPPnn` (PPPP: the low 16 bits of socklab's pid) so `ipcs -q` shows whose they are. A
//! SysV queue has no name to unlink and lives until `msgctl(IPC_RMID)`, so the run's cleanup
//! (and the Ctrl-C handler) removes it. A message above `kernel.msgmax` is refused with the limit
//! named — never cut to fit.

use crate::ipc::channel::{proc_value, Cleanup, End, LimitError, Pair, Setup};
use crate::ipc::sys::{self, MsgBuf};
use std::io;

/// The largest SysV message and queue here (`kernel.msgmax`, `kernel.msgmnb`).
pub fn limits() -> (usize, usize) {
    (
        proc_value("/proc/sys/kernel/msgmax").unwrap_or(8192),
        proc_value("/proc/sys/kernel/msgmnb").unwrap_or(16384),
    )
}

/// One end: sends on one queue, receives on the other.
#[derive(Debug)]
pub struct SysvEnd {
    tx: i32,
    rx: i32,
    buf: MsgBuf,
}

impl End for SysvEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.buf.send(self.tx, msg)
    }

    fn recv(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.buf.recv(self.rx, out)
    }
}

/// Set up both ends.
///
/// # Errors
/// A [`LimitError`] above `msgmax`/`msgmnb`, or `msgget`'s errno (`ENOSPC`).
pub fn open(setup: &Setup) -> anyhow::Result<Pair> {
    let len = setup.message_len();
    let (msgmax, msgmnb) = limits();
    if len > msgmax || len > msgmnb {
        let (limit, name) = if len > msgmax {
            (msgmax, "kernel.msgmax")
        } else {
            (msgmnb, "kernel.msgmnb")
        };
        return Err(LimitError(format!(
            "sysv-mq: a SysV message queue carries at most {limit} bytes per message ({name}), \
             so --size is at most {} with socklab's 16-byte header; raise it with \
             `sysctl {name}={len}`",
            limit.saturating_sub(crate::ipc::message::HEADER)
        ))
        .into());
    }
    let mut cleanup = Cleanup::default();
    let ab = sys::msg_create()?;
    cleanup.sysv(ab);
    let ba = sys::msg_create()?;
    cleanup.sysv(ba);
    Ok(Pair {
        a: Box::new(SysvEnd {
            tx: ab,
            rx: ba,
            buf: MsgBuf::new(len),
        }),
        b: Box::new(SysvEnd {
            tx: ba,
            rx: ab,
            buf: MsgBuf::new(len),
        }),
        cleanup,
        window: None,
        note: format!("two queues, msgmax {msgmax}, msgmnb {msgmnb}, removed at the end"),
    })
}
