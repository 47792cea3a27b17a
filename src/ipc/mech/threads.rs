//! `mpsc` and `crossbeam`: the channels a Rust program uses between threads, as the
//! reference for the kernel mechanisms. Each message is copied into a fresh `Vec` (the
//! channel moves it, the receiver copies it out), bounded so stream mode has backpressure.

use crate::ipc::channel::{Cleanup, End, Pair, Setup};
use std::io;

/// Messages in flight per direction: up to 1,024, at most 4 MiB.
fn bound(setup: &Setup) -> usize {
    (4 << 20) / setup.message_len().max(1)
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the other end closed")
}

fn copy_out(m: Vec<u8>, buf: &mut [u8]) -> io::Result<usize> {
    if m.len() > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message larger than expected",
        ));
    }
    buf[..m.len()].copy_from_slice(&m);
    Ok(m.len())
}

struct MpscEnd {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl End for MpscEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.tx.send(msg.to_vec()).map_err(|_| gone())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        copy_out(self.rx.recv().map_err(|_| gone())?, buf)
    }
}

/// `std::sync::mpsc::sync_channel`, one per direction.
///
/// # Errors
/// None in practice (the signature is every mechanism's).
pub fn open_mpsc(setup: &Setup) -> anyhow::Result<Pair> {
    let n = bound(setup).clamp(1, 1024);
    let (ab_tx, ab_rx) = std::sync::mpsc::sync_channel(n);
    let (ba_tx, ba_rx) = std::sync::mpsc::sync_channel(n);
    Ok(Pair {
        a: Box::new(MpscEnd {
            tx: ab_tx,
            rx: ba_rx,
        }),
        b: Box::new(MpscEnd {
            tx: ba_tx,
            rx: ab_rx,
        }),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("std::sync::mpsc::sync_channel({n}) per direction"),
    })
}

struct CrossbeamEnd {
    tx: crossbeam_channel::Sender<Vec<u8>>,
    rx: crossbeam_channel::Receiver<Vec<u8>>,
}

impl End for CrossbeamEnd {
    fn send(&mut self, msg: &[u8]) -> io::Result<()> {
        self.tx.send(msg.to_vec()).map_err(|_| gone())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        copy_out(self.rx.recv().map_err(|_| gone())?, buf)
    }
}

/// `crossbeam_channel::bounded`, one per direction.
///
/// # Errors
/// None in practice (the signature is every mechanism's).
pub fn open_crossbeam(setup: &Setup) -> anyhow::Result<Pair> {
    let n = bound(setup).clamp(1, 1024);
    let (ab_tx, ab_rx) = crossbeam_channel::bounded(n);
    let (ba_tx, ba_rx) = crossbeam_channel::bounded(n);
    Ok(Pair {
        a: Box::new(CrossbeamEnd {
            tx: ab_tx,
            rx: ba_rx,
        }),
        b: Box::new(CrossbeamEnd {
            tx: ba_tx,
            rx: ab_rx,
        }),
        cleanup: Cleanup::default(),
        window: None,
        note: format!("crossbeam_channel::bounded({n}) per direction"),
    })
}
