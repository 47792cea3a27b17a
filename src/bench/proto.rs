//! The load generator's side of each protocol, sans-IO: build the next request, and check
//! the answer as its bytes arrive. Nothing here touches a socket, so every rule is
//! unit-tested with byte slices.
//!
//! - echo: the answer must be the request's bytes;
//! - reverse: the answer must be the payload reversed (the request carries the 4-byte
//!   length header, the answer does not);
//! - http: a `GET` of `--path` with keep-alive; the answer must have status 200 and exactly
//!   its `Content-Length` bytes of body (read whole, not compared: the file is the server's).

use std::fmt;

/// The service a benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BenchService {
    /// RFC 862 echo.
    Echo,
    /// The course's reverse protocol.
    Reverse,
    /// HTTP/1.1 GET with keep-alive.
    Http,
}

impl fmt::Display for BenchService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BenchService::Echo => "echo",
            BenchService::Reverse => "reverse",
            BenchService::Http => "http",
        })
    }
}

/// Why an answer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    /// A byte differs from what the protocol demands.
    Wrong,
    /// HTTP status other than 200, or an unparsable response head.
    BadStatus,
}

/// What [`Answer::feed`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes are needed.
    More,
    /// The answer is complete and correct. `close` when the server announced it closes the
    /// connection after it (HTTP `Connection: close`).
    Done {
        /// The server will close the connection.
        close: bool,
    },
    /// The answer is wrong; the connection cannot be trusted any more.
    Bad(Mismatch),
}

/// Builds requests for one connection. The payload changes with every request (a sequence
/// number in its first bytes), so an answer from an earlier request, or from another
/// connection, cannot pass for the right one.
#[derive(Debug)]
pub struct Requests {
    service: BenchService,
    /// The request bytes on the wire (header included for reverse).
    wire: Vec<u8>,
    /// Where the payload starts in `wire`.
    payload_at: usize,
    seq: u64,
}

impl Requests {
    /// Requests of `size` payload bytes for `service` (`path` and `host` for http), seeded
    /// by `id` so connections differ.
    pub fn new(service: BenchService, size: usize, path: &str, host: &str, id: u64) -> Requests {
        let (wire, payload_at) = match service {
            BenchService::Http => {
                let req = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: socklab-bench\r\n\r\n"
                );
                (req.into_bytes(), 0)
            }
            BenchService::Echo | BenchService::Reverse => {
                let header = if service == BenchService::Reverse {
                    4
                } else {
                    0
                };
                let mut w = Vec::with_capacity(header + size);
                if header > 0 {
                    w.extend_from_slice(&(size as u32).to_be_bytes());
                }
                let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                w.extend((0..size).map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }));
                (w, header)
            }
        };
        Requests {
            service,
            wire,
            payload_at,
            seq: id << 32,
        }
    }

    /// Prepare the next request (its bytes are then [`Requests::wire`]) and return the
    /// checker for its answer.
    pub fn next_request(&mut self) -> Answer {
        self.seq = self.seq.wrapping_add(1);
        let payload = &mut self.wire[self.payload_at..];
        if self.service != BenchService::Http {
            let stamp = self.seq.to_le_bytes();
            let n = payload.len().min(8);
            payload[..n].copy_from_slice(&stamp[..n]);
        }
        match self.service {
            BenchService::Echo => Answer::Exact {
                expect: payload.to_vec(),
                reversed: false,
                got: 0,
            },
            BenchService::Reverse => Answer::Exact {
                expect: payload.to_vec(),
                reversed: true,
                got: 0,
            },
            BenchService::Http => Answer::Http(HttpAnswer::default()),
        }
    }

    /// The current request's bytes on the wire.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

/// The check of one answer, fed as bytes arrive.
#[derive(Debug)]
pub enum Answer {
    /// The answer must equal `expect` (or its reversal), byte for byte.
    Exact {
        /// The request payload.
        expect: Vec<u8>,
        /// Compare against the payload reversed.
        reversed: bool,
        /// Bytes already checked.
        got: usize,
    },
    /// An HTTP response.
    Http(HttpAnswer),
}

/// Where an HTTP response stands.
#[derive(Debug, Default)]
pub struct HttpAnswer {
    head: Vec<u8>,
    body_left: Option<u64>,
    close: bool,
}

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

impl Answer {
    /// Feed received bytes; returns how many belong to this answer (the rest, if any, is
    /// the start of something the client did not ask for yet) and the verdict so far.
    pub fn feed(&mut self, data: &[u8]) -> (usize, Progress) {
        match self {
            Answer::Exact {
                expect,
                reversed,
                got,
            } => {
                let take = (expect.len() - *got).min(data.len());
                let ok = if *reversed {
                    let n = expect.len();
                    data[..take]
                        .iter()
                        .enumerate()
                        .all(|(i, &b)| b == expect[n - 1 - (*got + i)])
                } else {
                    data[..take] == expect[*got..*got + take]
                };
                if !ok {
                    return (take, Progress::Bad(Mismatch::Wrong));
                }
                *got += take;
                if *got == expect.len() {
                    (take, Progress::Done { close: false })
                } else {
                    (take, Progress::More)
                }
            }
            Answer::Http(h) => h.feed(data),
        }
    }

    /// Whether the answer is complete with no bytes at all (a zero-length echo/reverse).
    pub fn is_empty(&self) -> bool {
        matches!(self, Answer::Exact { expect, .. } if expect.is_empty())
    }

    /// Bytes of answer expected (known up front for echo/reverse).
    pub fn expected_len(&self) -> Option<usize> {
        match self {
            Answer::Exact { expect, .. } => Some(expect.len()),
            Answer::Http(_) => None,
        }
    }
}

impl HttpAnswer {
    fn feed(&mut self, data: &[u8]) -> (usize, Progress) {
        let mut used = 0;
        if self.body_left.is_none() {
            // Accumulate the head until the blank line.
            let before = self.head.len();
            self.head.extend_from_slice(data);
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.head) {
                Ok(httparse::Status::Partial) => {
                    if self.head.len() > MAX_HEAD {
                        return (data.len(), Progress::Bad(Mismatch::BadStatus));
                    }
                    return (data.len(), Progress::More);
                }
                Err(_) => return (data.len(), Progress::Bad(Mismatch::BadStatus)),
                Ok(httparse::Status::Complete(head_len)) => {
                    if resp.code != Some(200) {
                        return (head_len - before, Progress::Bad(Mismatch::BadStatus));
                    }
                    let mut len = None;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            len = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse::<u64>().ok());
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            self.close = h.value.eq_ignore_ascii_case(b"close");
                        }
                    }
                    if resp.version == Some(0) && !self.close {
                        // HTTP/1.0 closes unless it says keep-alive; treat as close.
                        self.close = true;
                    }
                    let Some(len) = len else {
                        // Without Content-Length a keep-alive benchmark cannot find the end.
                        return (head_len - before, Progress::Bad(Mismatch::BadStatus));
                    };
                    used = head_len - before;
                    self.head.clear();
                    self.body_left = Some(len);
                }
            }
        }
        let left = self.body_left.as_mut().expect("set above");
        let take = (*left).min((data.len() - used) as u64) as usize;
        *left -= take as u64;
        used += take;
        if *left == 0 {
            (used, Progress::Done { close: self.close })
        } else {
            (used, Progress::More)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_bytes(service: BenchService, wire: &[u8]) -> Vec<u8> {
        match service {
            BenchService::Echo => wire.to_vec(),
            BenchService::Reverse => wire[4..].iter().rev().copied().collect(),
            BenchService::Http => unreachable!(),
        }
    }

    #[test]
    fn correct_answers_pass_at_every_split() {
        for service in [BenchService::Echo, BenchService::Reverse] {
            let mut reqs = Requests::new(service, 100, "/", "h", 3);
            for _ in 0..3 {
                let answer = reqs.next_request();
                let good = answer_bytes(service, reqs.wire());
                assert_eq!(good.len(), 100);
                assert_eq!(answer.expected_len(), Some(100));
                for cut in 0..=good.len() {
                    let mut a = Answer::Exact {
                        expect: match &answer {
                            Answer::Exact { expect, .. } => expect.clone(),
                            Answer::Http(_) => unreachable!(),
                        },
                        reversed: service == BenchService::Reverse,
                        got: 0,
                    };
                    let (_, p) = a.feed(&good[..cut]);
                    if cut == good.len() {
                        assert_eq!(p, Progress::Done { close: false });
                    } else {
                        assert_eq!(p, Progress::More);
                        assert_eq!(
                            a.feed(&good[cut..]),
                            (good.len() - cut, Progress::Done { close: false })
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn one_wrong_byte_is_caught_and_stale_answers_do_not_pass() {
        let mut reqs = Requests::new(BenchService::Reverse, 64, "/", "h", 1);
        let _ = reqs.next_request();
        let first = answer_bytes(BenchService::Reverse, reqs.wire());
        let mut a2 = reqs.next_request();
        // The first request's answer is not the second's (the sequence number differs).
        assert_eq!(a2.feed(&first).1, Progress::Bad(Mismatch::Wrong));
        let mut a3 = reqs.next_request();
        let mut bad = answer_bytes(BenchService::Reverse, reqs.wire());
        bad[40] ^= 1;
        assert_eq!(a3.feed(&bad[..40]).1, Progress::More);
        assert_eq!(a3.feed(&bad[40..]).1, Progress::Bad(Mismatch::Wrong));
    }

    #[test]
    fn surplus_bytes_are_left_for_the_next_answer() {
        let mut reqs = Requests::new(BenchService::Echo, 4, "/", "h", 1);
        let mut a = reqs.next_request();
        let mut data = reqs.wire().to_vec();
        data.extend_from_slice(b"next");
        assert_eq!(a.feed(&data), (4, Progress::Done { close: false }));
    }

    #[test]
    fn http_status_length_and_close() {
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhelloHTTP/1.1 200";
        for cut in 0..=resp.len() {
            let mut a = Answer::Http(HttpAnswer::default());
            let (u1, p1) = a.feed(&resp[..cut]);
            let total = if p1 == Progress::More {
                let (u2, p2) = a.feed(&resp[cut..]);
                assert_eq!(p2, Progress::Done { close: false }, "cut {cut}");
                u1 + u2
            } else {
                assert_eq!(p1, Progress::Done { close: false }, "cut {cut}");
                u1
            };
            assert_eq!(total, resp.len() - "HTTP/1.1 200".len(), "cut {cut}");
        }
        let mut a = Answer::Http(HttpAnswer::default());
        let (_, p) = a.feed(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(p, Progress::Bad(Mismatch::BadStatus));
        let mut a = Answer::Http(HttpAnswer::default());
        let (_, p) = a.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        assert_eq!(p, Progress::Done { close: true });
        let mut a = Answer::Http(HttpAnswer::default());
        assert_eq!(
            a.feed(b"garbage\r\n\r\n").1,
            Progress::Bad(Mismatch::BadStatus)
        );
    }

    #[test]
    fn http_request_is_a_keepalive_get() {
        let mut reqs = Requests::new(BenchService::Http, 0, "/x.html", "127.0.0.1:80", 0);
        let a = reqs.next_request();
        let w = reqs.wire();
        assert!(w.starts_with(b"GET /x.html HTTP/1.1\r\nHost: 127.0.0.1:80\r\n"));
        assert!(w.ends_with(b"\r\n\r\n"));
        assert_eq!(a.expected_len(), None);
    }
}
