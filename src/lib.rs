//! socklab: socket and IPC programming made real and measurable.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`socklab serve|client|bench|lab`), errors mapped to exit codes.
//! - [`net`]: resolving addresses (`AF_UNSPEC`, like `getaddrinfo`) and opening listeners and
//!   connections: TCP over IPv4/IPv6, Unix stream sockets, UDP.
//! - [`service`]: the protocols, written once and without I/O ("sans-IO"): echo, discard,
//!   daytime, reverse, http. A [`service::Session`] is fed bytes and queues output.
//! - [`output`]: the per-connection output queue (bytes and file regions) and the one
//!   function every model uses to flush it, with the read/mmap/sendfile strategies.
//! - [`model`]: the server designs, one file each: iterative, fork, prefork, thread, pool,
//!   select, poll, epoll, reactors, uring (a directory: the loop, its connection, the ring,
//!   the provided-buffer ring), tokio; and what they share (accept with back-off, connection
//!   limits, shutdown, the blocking connection driver).
//! - [`timer`]: the one timer structure of the event loops (deadlines kept ordered).
//! - [`signals`]: SIGINT/SIGTERM/SIGCHLD turned into flags and a self-pipe wake-up.
//! - [`sys`]: the few `unsafe` system calls, each with its `SAFETY` note.
//! - [`server`]: `socklab serve`: endpoint, signals, model dispatch, the datagram loop.
//! - [`client`]: the clients (`cln_rev` and friends).
//! - [`units`]: durations and sizes on the command line.
//! - [`lab`]: the course's socket experiments against the live kernel.
//! - [`bench`](mod@bench): the load generator and the side-by-side comparison of every design.
#![deny(missing_docs, rust_2018_idioms)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod lab;
pub mod model;
pub mod net;
pub mod output;
pub mod server;
pub mod service;
pub mod signals;
pub mod sys;
pub mod timer;
pub mod units;
