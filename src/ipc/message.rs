//! The messages and their verifier, sans-IO.
//!
//! Every message starts with a 16-byte header: the sequence number (u64), the payload length
//! (u32) and a CRC-32 (u32) over sequence, length and payload, all little-endian. Stream
//! mechanisms use the length as their frame prefix (as the course's pipe example sends a
//! length before the text); message mechanisms must deliver exactly header + payload in one
//! receive, and the verifier checks that the boundary held.
//!
//! [`Verifier::data`] accepts message `n` only if it is whole, unchanged and the one expected
//! next: one wrong byte, a lost, repeated or overtaking message fails the run, naming it.

use thiserror::Error;

/// Bytes of header in front of every payload.
pub const HEADER: usize = 16;
/// The sequence number of the message that ends a run (answered by an [`END`] or an ack).
pub const END: u64 = u64::MAX;
/// The sequence number of a synchronisation message (answered once everything before it was
/// received): how stream mode starts its clock after the warm-up.
pub const SYNC: u64 = u64::MAX - 1;
/// The sequence number of a credit message (flow control for mechanisms that drop).
pub const CREDIT: u64 = u64::MAX - 2;

/// What is wrong with a received message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// Fewer bytes than a header.
    #[error("a message of {got} bytes is shorter than the {HEADER}-byte header")]
    Short {
        /// Bytes received.
        got: usize,
    },
    /// The receive returned a different number of bytes than the header announces.
    #[error(
        "message boundary not kept: one receive returned {got} bytes, the header announces {want}"
    )]
    Boundary {
        /// Bytes received in one message.
        got: usize,
        /// Header + payload length the header announces.
        want: usize,
    },
    /// The checksum does not match the bytes.
    #[error("checksum mismatch (CRC-32 {want:#010x} sent, {got:#010x} computed): bytes changed on the way")]
    Corrupt {
        /// The checksum the sender wrote.
        want: u32,
        /// The checksum of what arrived.
        got: u32,
    },
    /// A later message arrived in place of the expected one.
    #[error("expected message #{expected}, got #{got}: #{expected} was lost or overtaken")]
    Missing {
        /// The sequence number expected.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// An earlier message arrived again.
    #[error("expected message #{expected}, got #{got} again: duplicated or delivered late")]
    Repeated {
        /// The sequence number expected.
        expected: u64,
        /// The one that arrived.
        got: u64,
    },
    /// The payload has the wrong length.
    #[error("message #{seq} carries {got} bytes of payload, {want} expected")]
    Size {
        /// Its sequence number.
        seq: u64,
        /// Payload bytes received.
        got: usize,
        /// Payload bytes expected.
        want: usize,
    },
    /// A control message where data was expected, or the reverse.
    #[error("unexpected message #{got} ({what})")]
    Unexpected {
        /// Its sequence number.
        got: u64,
        /// What was expected instead.
        what: &'static str,
    },
}

/// The CRC-32 of a message with this sequence number, length and payload.
pub fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// The bytes of the payload pattern (the same for every message; the header changes).
fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i.wrapping_mul(131) + 7) as u8).collect()
}

/// A message being sent: the header is rewritten for each sequence number; the payload and
/// its partial checksum are computed once.
#[derive(Debug, Clone)]
pub struct Outgoing {
    buf: Vec<u8>,
    /// The CRC state after the payload, combined with each header's (crc32fast's `combine`).
    payload_crc: crc32fast::Hasher,
}

impl Outgoing {
    /// A message with `size` payload bytes.
    pub fn new(size: usize) -> Outgoing {
        let mut buf = vec![0u8; HEADER];
        buf.extend_from_slice(&pattern(size));
        let mut payload_crc = crc32fast::Hasher::new();
        payload_crc.update(&buf[HEADER..]);
        Outgoing { buf, payload_crc }
    }

    /// The message numbered `seq`, header and checksum written.
    pub fn stamp(&mut self, seq: u64) -> &mut [u8] {
        let len = (self.buf.len() - HEADER) as u32;
        let crc = if len < 4096 {
            // Hashing a small payload again is cheaper than combining two CRCs.
            checksum(seq, &self.buf[HEADER..])
        } else {
            let mut h = crc32fast::Hasher::new();
            h.update(&seq.to_le_bytes());
            h.update(&len.to_le_bytes());
            h.combine(&self.payload_crc);
            h.finalize()
        };
        self.buf[0..8].copy_from_slice(&seq.to_le_bytes());
        self.buf[8..12].copy_from_slice(&len.to_le_bytes());
        self.buf[12..16].copy_from_slice(&crc.to_le_bytes());
        &mut self.buf
    }

    /// The whole message length (header + payload).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether the message is empty (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// A header-only message (END, SYNC, CREDIT, or an ack carrying a count).
pub fn control(seq: u64) -> [u8; HEADER] {
    let mut m = [0u8; HEADER];
    m[0..8].copy_from_slice(&seq.to_le_bytes());
    m[12..16].copy_from_slice(&checksum(seq, &[]).to_le_bytes());
    m
}

/// The payload length a header announces (the stream framing's length prefix).
pub fn declared_len(header: &[u8; HEADER]) -> usize {
    u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize
}

/// Check a received message's boundary and checksum; its sequence number and payload length.
///
/// # Errors
/// [`VerifyError::Short`], [`VerifyError::Boundary`] or [`VerifyError::Corrupt`].
pub fn decode(msg: &[u8]) -> Result<(u64, usize), VerifyError> {
    if msg.len() < HEADER {
        return Err(VerifyError::Short { got: msg.len() });
    }
    let header: &[u8; HEADER] = msg[..HEADER].try_into().expect("16 bytes");
    let len = declared_len(header);
    if msg.len() != HEADER + len {
        return Err(VerifyError::Boundary {
            got: msg.len(),
            want: HEADER + len,
        });
    }
    let seq = u64::from_le_bytes(msg[0..8].try_into().expect("8 bytes"));
    let want = u32::from_le_bytes(msg[12..16].try_into().expect("4 bytes"));
    let got = checksum(seq, &msg[HEADER..]);
    if got != want {
        return Err(VerifyError::Corrupt { want, got });
    }
    Ok((seq, len))
}

/// Checks the data messages of one direction, in order.
#[derive(Debug, Clone)]
pub struct Verifier {
    next: u64,
    size: usize,
}

/// What a verified message was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// Data message with this sequence number (the one expected).
    Data(u64),
    /// The run's end.
    End,
    /// A synchronisation request.
    Sync,
    /// A credit grant.
    Credit,
}

impl Verifier {
    /// A verifier of `size`-byte payloads, expecting message 0 first.
    pub fn new(size: usize) -> Verifier {
        Verifier { next: 0, size }
    }

    /// How many data messages were accepted.
    pub fn count(&self) -> u64 {
        self.next
    }

    /// Verify the next received message.
    ///
    /// # Errors
    /// Any [`VerifyError`]: a broken boundary, a changed byte, a lost, repeated or overtaking
    /// message, a wrong payload length.
    pub fn check(&mut self, msg: &[u8]) -> Result<Received, VerifyError> {
        let (seq, len) = decode(msg)?;
        match seq {
            END if len == 0 => return Ok(Received::End),
            SYNC if len == 0 => return Ok(Received::Sync),
            CREDIT if len == 0 => return Ok(Received::Credit),
            _ => {}
        }
        if seq > self.next {
            return Err(VerifyError::Missing {
                expected: self.next,
                got: seq,
            });
        }
        if seq < self.next {
            return Err(VerifyError::Repeated {
                expected: self.next,
                got: seq,
            });
        }
        if len != self.size {
            return Err(VerifyError::Size {
                seq,
                got: len,
                want: self.size,
            });
        }
        self.next += 1;
        Ok(Received::Data(seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(size: usize, seqs: &[u64]) -> Vec<Vec<u8>> {
        let mut out = Outgoing::new(size);
        seqs.iter().map(|&s| out.stamp(s).to_vec()).collect()
    }

    fn run(size: usize, list: &[Vec<u8>]) -> Result<u64, VerifyError> {
        let mut v = Verifier::new(size);
        for m in list {
            v.check(m)?;
        }
        Ok(v.count())
    }

    #[test]
    fn accepts_messages_in_order_of_every_size() {
        for size in [0, 1, 15, 16, 64, 4096, 65536] {
            assert_eq!(run(size, &msgs(size, &[0, 1, 2, 3])), Ok(4), "size {size}");
        }
    }

    #[test]
    fn stamped_checksum_equals_the_plain_one() {
        let mut out = Outgoing::new(100);
        let m = out.stamp(42).to_vec();
        assert_eq!(
            u32::from_le_bytes(m[12..16].try_into().unwrap()),
            checksum(42, &m[HEADER..])
        );
        assert_eq!(declared_len(m[..16].try_into().unwrap()), 100);
    }

    #[test]
    fn catches_one_changed_byte_anywhere() {
        let good = msgs(64, &[0]).remove(0);
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                let r = Verifier::new(64).check(&bad);
                assert!(r.is_err(), "byte {i} bit {bit:#x} not caught");
            }
        }
        let mut bad = good.clone();
        bad[40] ^= 1;
        assert!(matches!(
            Verifier::new(64).check(&bad),
            Err(VerifyError::Corrupt { .. })
        ));
    }

    #[test]
    fn catches_a_dropped_message() {
        let r = run(8, &msgs(8, &[0, 1, 3]));
        assert_eq!(
            r,
            Err(VerifyError::Missing {
                expected: 2,
                got: 3
            })
        );
    }

    #[test]
    fn catches_a_duplicated_message() {
        let r = run(8, &msgs(8, &[0, 1, 1, 2]));
        assert_eq!(
            r,
            Err(VerifyError::Repeated {
                expected: 2,
                got: 1
            })
        );
    }

    #[test]
    fn catches_reordered_messages() {
        let r = run(8, &msgs(8, &[0, 2, 1, 3]));
        assert_eq!(
            r,
            Err(VerifyError::Missing {
                expected: 1,
                got: 2
            })
        );
    }

    #[test]
    fn catches_merged_and_split_messages() {
        let m = msgs(8, &[0, 1]);
        let merged = [m[0].clone(), m[1].clone()].concat();
        assert!(matches!(
            Verifier::new(8).check(&merged),
            Err(VerifyError::Boundary { got: 48, want: 24 })
        ));
        assert!(matches!(
            Verifier::new(8).check(&m[0][..20]),
            Err(VerifyError::Boundary { .. })
        ));
        assert_eq!(
            Verifier::new(8).check(&m[0][..5]),
            Err(VerifyError::Short { got: 5 })
        );
    }

    #[test]
    fn catches_a_wrong_size() {
        let r = run(8, &msgs(9, &[0]));
        assert!(matches!(
            r,
            Err(VerifyError::Size {
                got: 9,
                want: 8,
                ..
            })
        ));
    }

    #[test]
    fn control_messages_are_recognised() {
        let mut v = Verifier::new(8);
        assert_eq!(v.check(&control(END)), Ok(Received::End));
        assert_eq!(v.check(&control(SYNC)), Ok(Received::Sync));
        assert_eq!(v.check(&control(CREDIT)), Ok(Received::Credit));
        assert_eq!(decode(&control(7)), Ok((7, 0)));
    }
}
