//! Reverse (the course's `srv_rev`): a request is a 4-byte unsigned length in network byte
//! order followed by that many bytes; the answer is those bytes in reverse order, with no
//! header. Many requests per connection, until the client closes.
//!
//! The declared length is checked against the limit before anything is allocated for it, and
//! the body buffer then grows only as bytes really arrive: a client that declares 16 MiB and
//! sends nothing costs a few bytes, not 16 MiB.

use crate::output::Outbox;
use crate::service::ProtocolError;

/// Size of the length header.
pub const HEADER_LEN: usize = 4;

/// Bodies up to this size are copied into the outbox's shared buffer (no allocation per
/// request); larger ones are moved there as their own buffer (no copy).
const COPY_LIMIT: usize = 64 * 1024;

/// Where a reverse session stands.
#[derive(Debug)]
enum State {
    /// Reading the 4-byte header; `have` bytes of it are in `header`.
    Header {
        header: [u8; HEADER_LEN],
        have: usize,
    },
    /// Reading a body of `len` bytes into `body`.
    Body { len: usize, body: Vec<u8> },
}

/// The reverse protocol's state for one connection.
#[derive(Debug)]
pub struct Reverse {
    state: State,
    limit: usize,
}

impl Reverse {
    /// A session that accepts requests of at most `limit` bytes.
    pub fn new(limit: usize) -> Reverse {
        Reverse {
            state: State::Header {
                header: [0; HEADER_LEN],
                have: 0,
            },
            limit,
        }
    }

    /// Consume `input`, queueing the answer of every request it completes.
    ///
    /// # Errors
    /// [`ProtocolError::TooLarge`] when a header declares more than the limit.
    pub fn receive(&mut self, mut input: &[u8], out: &mut Outbox) -> Result<(), ProtocolError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header { header, have } => {
                    let take = (HEADER_LEN - *have).min(input.len());
                    header[*have..*have + take].copy_from_slice(&input[..take]);
                    *have += take;
                    input = &input[take..];
                    if *have < HEADER_LEN {
                        break;
                    }
                    let declared = u32::from_be_bytes(*header) as usize;
                    if declared > self.limit {
                        return Err(ProtocolError::TooLarge {
                            declared: declared as u64,
                            limit: self.limit,
                        });
                    }
                    if declared == 0 {
                        // An empty request has an empty answer: nothing to send.
                        *have = 0;
                        continue;
                    }
                    // Whole body already here, small enough: answer straight from the input.
                    if input.len() >= declared && declared <= COPY_LIMIT {
                        out.push_reversed(&input[..declared]);
                        input = &input[declared..];
                        *have = 0;
                        continue;
                    }
                    // Room for what is already here (at least 1 KiB); growth follows arrivals.
                    let first = declared.min(input.len().max(1024));
                    self.state = State::Body {
                        len: declared,
                        body: Vec::with_capacity(first),
                    };
                }
                State::Body { len, body } => {
                    let take = (*len - body.len()).min(input.len());
                    grow_for(body, take, *len);
                    body.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if body.len() < *len {
                        break;
                    }
                    let mut body = std::mem::take(body);
                    if body.len() <= COPY_LIMIT {
                        out.push_reversed(&body);
                    } else {
                        body.reverse();
                        out.push_vec(body);
                    }
                    self.state = State::Header {
                        header: [0; HEADER_LEN],
                        have: 0,
                    };
                }
            }
        }
        Ok(())
    }

    /// The client closed its side: fine between requests, an error in the middle of one.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`] when part of a request had arrived.
    pub fn end_of_input(&self) -> Result<(), ProtocolError> {
        match &self.state {
            State::Header { have: 0, .. } => Ok(()),
            State::Header { have, .. } => Err(ProtocolError::Truncated {
                got: *have,
                expected: HEADER_LEN,
            }),
            State::Body { len, body } => Err(ProtocolError::Truncated {
                got: HEADER_LEN + body.len(),
                expected: HEADER_LEN + len,
            }),
        }
    }

    /// Whether part of a request has arrived and is not answered yet.
    pub fn mid_request(&self) -> bool {
        !matches!(self.state, State::Header { have: 0, .. })
    }
}

/// Make room for `more` bytes in `body`, which will never hold more than `cap`: doubling as
/// `Vec` does, but never past the declared length, so memory follows the bytes that arrived.
fn grow_for(body: &mut Vec<u8>, more: usize, cap: usize) {
    let need = body.len() + more;
    if need > body.capacity() {
        let target = need.max(body.capacity() * 2).min(cap);
        body.reserve_exact(target - body.len());
    }
}

/// Encode one request: the length header followed by `data` (what `cln_rev` sends with
/// `writev`).
///
/// # Panics
/// If `data` is longer than `u32::MAX` bytes, which the protocol cannot express.
pub fn encode_request(data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("reverse request longer than u32::MAX");
    let mut v = Vec::with_capacity(HEADER_LEN + data.len());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{assert_split_invariant, ServiceConfig, ServiceKind};
    use proptest::prelude::*;

    fn cfg(limit: usize) -> ServiceConfig {
        let mut c = ServiceConfig::new(ServiceKind::Reverse);
        c.max_request = limit;
        c
    }

    #[test]
    fn reverses_several_requests_at_every_split() {
        let mut input = encode_request(b"hola");
        input.extend(encode_request(b""));
        input.extend(encode_request(b"abcdefg"));
        input.extend(encode_request(b"x"));
        let out = assert_split_invariant(&cfg(1024), &input);
        assert_eq!(out, b"alohgfedcbax");
    }

    #[test]
    fn large_body_is_moved_not_copied_and_still_reversed() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Outbox::new();
        let mut s = Reverse::new(1 << 20);
        let req = encode_request(&data);
        for chunk in req.chunks(7919) {
            s.receive(chunk, &mut out).unwrap();
        }
        let mut want = data.clone();
        want.reverse();
        assert_eq!(out.take_bytes(), want);
        assert!(!s.mid_request());
    }

    #[test]
    fn oversize_length_is_refused_before_any_allocation() {
        let mut out = Outbox::new();
        let mut s = Reverse::new(16);
        let err = s.receive(&17u32.to_be_bytes(), &mut out).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::TooLarge {
                declared: 17,
                limit: 16
            }
        );
        let mut s = Reverse::new(16);
        assert!(s.receive(&encode_request(&[7; 16]), &mut out).is_ok());
        let mut s = Reverse::new(DEFAULT);
        assert!(s.receive(&u32::MAX.to_be_bytes(), &mut out).is_err());
    }
    const DEFAULT: usize = crate::service::DEFAULT_MAX_REQUEST;

    #[test]
    fn declared_but_unsent_body_costs_nothing() {
        let mut out = Outbox::new();
        let mut s = Reverse::new(DEFAULT);
        s.receive(&(DEFAULT as u32).to_be_bytes(), &mut out)
            .unwrap();
        s.receive(b"ab", &mut out).unwrap();
        match &s.state {
            State::Body { body, .. } => assert!(body.capacity() < 4096, "{}", body.capacity()),
            other => panic!("unexpected state {other:?}"),
        }
    }

    #[test]
    fn growth_never_exceeds_the_declared_length() {
        let mut s = Reverse::new(DEFAULT);
        let mut out = Outbox::new();
        let len = 9 << 20;
        s.receive(&(len as u32).to_be_bytes(), &mut out).unwrap();
        let chunk = vec![1u8; 65536];
        for _ in 0..(len / chunk.len() - 1) {
            s.receive(&chunk, &mut out).unwrap();
        }
        match &s.state {
            State::Body { body, .. } => assert!(body.capacity() <= len),
            other => panic!("unexpected state {other:?}"),
        }
    }

    #[test]
    fn end_of_input_reports_truncation() {
        let mut out = Outbox::new();
        let mut s = Reverse::new(100);
        assert_eq!(s.end_of_input(), Ok(()));
        s.receive(&[0, 0], &mut out).unwrap();
        assert_eq!(
            s.end_of_input(),
            Err(ProtocolError::Truncated {
                got: 2,
                expected: 4
            })
        );
        s.receive(&[0, 5, b'a'], &mut out).unwrap();
        assert!(s.mid_request());
        assert_eq!(
            s.end_of_input(),
            Err(ProtocolError::Truncated {
                got: 5,
                expected: 9
            })
        );
    }

    #[test]
    fn datagram_is_reversed_without_header() {
        let mut reply = Vec::new();
        assert!(cfg(10).datagram(b"abc", &mut reply));
        assert_eq!(reply, b"cba");
    }

    proptest! {
        #[test]
        fn any_requests_any_chunking(
            reqs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            chunk in 1usize..97,
        ) {
            let mut input = Vec::new();
            let mut want: Vec<u8> = Vec::new();
            for r in &reqs {
                input.extend(encode_request(r));
                want.extend(r.iter().rev());
            }
            let mut out = Outbox::new();
            let mut s = Reverse::new(1024);
            for c in input.chunks(chunk) {
                s.receive(c, &mut out).unwrap();
            }
            prop_assert_eq!(out.take_bytes(), want);
            prop_assert!(!s.mid_request());
        }
    }
}
