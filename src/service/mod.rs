//! The services, written once and without I/O ("sans-IO").
//!
//! A [`Session`] is the state of one connection's protocol. A model feeds it whatever bytes
//! arrived ([`Session::receive`]), tells it when the peer closed its side
//! ([`Session::end_of_input`]) and flushes the [`Outbox`] it fills. A session never blocks and
//! never calls the kernel, so the same code runs under a blocking thread, a forked process or
//! an edge-triggered epoll loop, and is unit-tested with plain byte slices.
//!
//! Adding a service is adding a file here, one [`ServiceKind`] variant and one arm in
//! [`Session`]'s `match`es.

pub mod daytime;
pub mod discard;
pub mod echo;
pub mod http;
pub mod reverse;

use crate::output::{Outbox, SendStrategy};
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

/// Default limit on a reverse request's declared length (16 MiB).
pub const DEFAULT_MAX_REQUEST: usize = 16 << 20;

/// Which protocol a server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum ServiceKind {
    /// RFC 862: every byte received is sent back.
    Echo,
    /// RFC 863: every byte received is dropped.
    Discard,
    /// RFC 867: the local date and time as text, then close.
    Daytime,
    /// The course's `srv_rev`: 4-byte big-endian length + bytes, answered reversed.
    Reverse,
    /// HTTP/1.1 static files from `--root` (GET, HEAD, ranges, conditional requests).
    Http,
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceKind::Echo => "echo",
            ServiceKind::Discard => "discard",
            ServiceKind::Daytime => "daytime",
            ServiceKind::Reverse => "reverse",
            ServiceKind::Http => "http",
        })
    }
}

/// A protocol error: the connection that caused it is closed, the server goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A reverse request declared more bytes than the server accepts.
    #[error("declared request length {declared} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The length the client declared.
        declared: u64,
        /// The server's `--max-request`.
        limit: usize,
    },
    /// The peer closed its side in the middle of a request.
    #[error("peer closed the connection in the middle of a request ({got} of {expected} bytes)")]
    Truncated {
        /// Bytes of the request (header included) that had arrived.
        got: usize,
        /// Bytes the request needed (header included), when known.
        expected: usize,
    },
    /// The peer closed before a request head (HTTP) was complete.
    #[error("peer closed the connection in the middle of a request head ({got} bytes of it had arrived)")]
    IncompleteHead {
        /// Bytes of the head that had arrived.
        got: usize,
    },
}

/// How a service is configured: everything a session needs that is not bytes from the peer.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The protocol.
    pub kind: ServiceKind,
    /// Largest reverse request accepted; a larger declared length closes the connection.
    pub max_request: usize,
    /// Produces the daytime text; a parameter so tests can pin the clock.
    pub clock: fn() -> String,
    /// The HTTP service's root and limits (required for [`ServiceKind::Http`]).
    pub http: Option<Arc<http::HttpConfig>>,
    /// How file bodies are sent.
    pub strategy: SendStrategy,
}

impl ServiceConfig {
    /// A configuration with the defaults (16 MiB limit, the local clock).
    pub fn new(kind: ServiceKind) -> Self {
        ServiceConfig {
            kind,
            max_request: DEFAULT_MAX_REQUEST,
            clock: daytime::local_now,
            http: None,
            strategy: SendStrategy::default(),
        }
    }

    /// An empty output queue for a new connection, sending files with the configured
    /// strategy.
    pub fn outbox(&self) -> Outbox {
        Outbox::with_strategy(self.strategy)
    }

    /// A fresh session for a new connection, with its opening output (daytime's text)
    /// already queued in `out`.
    pub fn open(&self, out: &mut Outbox) -> Session {
        match self.kind {
            ServiceKind::Echo => Session::Echo(echo::Echo),
            ServiceKind::Discard => Session::Discard(discard::Discard),
            ServiceKind::Daytime => Session::Daytime(daytime::Daytime::open((self.clock)(), out)),
            ServiceKind::Reverse => Session::Reverse(reverse::Reverse::new(self.max_request)),
            ServiceKind::Http => Session::Http(http::Http::new(
                self.http
                    .clone()
                    .expect("the http service is configured with a root"),
            )),
        }
    }

    /// Answer one datagram: `Some(reply)` or `None` when the service sends nothing back.
    /// Over UDP a datagram is a whole request.
    pub fn datagram(&self, request: &[u8], reply: &mut Vec<u8>) -> bool {
        reply.clear();
        match self.kind {
            ServiceKind::Echo => reply.extend_from_slice(request),
            ServiceKind::Discard | ServiceKind::Http => return false,
            ServiceKind::Daytime => reply.extend_from_slice((self.clock)().as_bytes()),
            ServiceKind::Reverse => reply.extend(request.iter().rev()),
        }
        true
    }
}

/// The protocol state of one connection. An enum rather than a trait object: no allocation
/// per connection and no indirect call per read.
#[derive(Debug)]
pub enum Session {
    /// See [`echo::Echo`].
    Echo(echo::Echo),
    /// See [`discard::Discard`].
    Discard(discard::Discard),
    /// See [`daytime::Daytime`].
    Daytime(daytime::Daytime),
    /// See [`reverse::Reverse`].
    Reverse(reverse::Reverse),
    /// See [`http::Http`].
    Http(http::Http),
}

impl Session {
    /// Feed bytes that arrived. All of `input` is consumed (the session buffers what does not
    /// yet form a complete request); answers are queued in `out`.
    ///
    /// # Errors
    /// A [`ProtocolError`] means the connection must be closed (after logging it).
    pub fn receive(&mut self, input: &[u8], out: &mut Outbox) -> Result<(), ProtocolError> {
        match self {
            Session::Echo(s) => s.receive(input, out),
            Session::Discard(_) => Ok(()),
            Session::Daytime(_) => Ok(()),
            Session::Reverse(s) => s.receive(input, out),
            Session::Http(s) => {
                s.receive(input, out);
                Ok(())
            }
        }
    }

    /// The peer will send nothing more (it closed or half-closed). The connection is closed
    /// once the output is flushed.
    ///
    /// # Errors
    /// [`ProtocolError::Truncated`] when the peer stopped in the middle of a request.
    pub fn end_of_input(&mut self) -> Result<(), ProtocolError> {
        match self {
            Session::Reverse(s) => s.end_of_input(),
            Session::Http(s) if s.mid_request() => {
                Err(ProtocolError::IncompleteHead { got: s.buffered() })
            }
            _ => Ok(()),
        }
    }

    /// Whether the session wants the connection closed once its output is flushed, even
    /// though the peer has not closed (daytime after its one line).
    pub fn done(&self) -> bool {
        match self {
            Session::Daytime(_) => true,
            Session::Http(s) => s.done(),
            _ => false,
        }
    }

    /// When the session needs attention even if nothing arrives (HTTP's request-head
    /// deadline); the models wake it then with [`Session::on_deadline`].
    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Session::Http(s) => s.deadline(),
            _ => None,
        }
    }

    /// The deadline passed: queue what the protocol says (HTTP: 408); the connection is
    /// closed once that is flushed.
    pub fn on_deadline(&mut self, out: &mut Outbox) {
        if let Session::Http(s) = self {
            s.on_deadline(out);
        }
    }

    /// Whether received requests wait for the output queue to drain (HTTP pipelining past
    /// the bound of [`http::QUEUE_BYTES`] and its kin): the model must read nothing more
    /// from the connection, flush the output, then call [`Session::resume`]. This is what
    /// bounds a connection's queued output whatever the client sends.
    pub fn has_backlog(&self) -> bool {
        match self {
            Session::Http(s) => s.has_backlog(),
            _ => false,
        }
    }

    /// The output queue drained: answer the requests that waited.
    pub fn resume(&mut self, out: &mut Outbox) {
        if let Session::Http(s) = self {
            s.resume(out);
        }
    }

    /// Whether part of a request has arrived and is not answered yet: a connection with a
    /// request in flight is let finish on shutdown, an idle one is closed.
    pub fn mid_request(&self) -> bool {
        match self {
            Session::Reverse(s) => s.mid_request(),
            Session::Http(s) => s.mid_request(),
            _ => false,
        }
    }
}

/// Feed `input` to a fresh session split at every position (and byte by byte), and check
/// every split produces the same output as the whole: the test every service must pass.
#[cfg(test)]
pub(crate) fn assert_split_invariant(config: &ServiceConfig, input: &[u8]) -> Vec<u8> {
    let whole = {
        let mut out = Outbox::new();
        let mut s = config.open(&mut out);
        s.receive(input, &mut out).unwrap();
        out.take_bytes()
    };
    for cut in 0..=input.len() {
        let mut out = Outbox::new();
        let mut s = config.open(&mut out);
        s.receive(&input[..cut], &mut out).unwrap();
        s.receive(&input[cut..], &mut out).unwrap();
        assert_eq!(out.take_bytes(), whole, "split at {cut}");
    }
    let mut out = Outbox::new();
    let mut s = config.open(&mut out);
    for b in input {
        s.receive(std::slice::from_ref(b), &mut out).unwrap();
    }
    assert_eq!(out.take_bytes(), whole, "byte by byte");
    whole
}
