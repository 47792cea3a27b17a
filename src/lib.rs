//! socklab: socket and IPC programming made real and measurable.
//!
//! # Layout
//!
//! - [`cli`]: the command line (`socklab serve|client|bench|lab|ipc|bus|completions|man`), errors as one
//!   line and mapped to exit codes; shell completions and the man page from the same
//!   definitions (`clap_complete`, `clap_mangen`).
//! - [`net`]: resolving addresses (`AF_UNSPEC`, like `getaddrinfo`) and opening listeners and
//!   connections: TCP over IPv4/IPv6, Unix stream sockets, UDP.
//! - [`service`]: the protocols, written once and without I/O ("sans-IO"): echo, discard,
//!   daytime, reverse, http (with its response cache for small files, `service::http::cache`).
//!   A [`service::Session`] is fed bytes and queues output.
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
//! - [`bus`]: the software bus, an MQTT 3.1.1/5.0 broker: sans-IO codec glue, topic trie,
//!   session and routing core, redb store, the epoll reactor driver, clients and load; and
//!   its D-Bus half (well-known names, method calls routed to a name's owner, signals by
//!   match rules, a monitor) with its Rust API and command-line tools.
//! - [`ipc`]: every IPC mechanism of the course (pipes, FIFOs, socketpairs, Unix/TCP/UDP
//!   sockets, POSIX and SysV queues, a shared-memory ring with five wake-ups) measured side by
//!   side with every message verified, and the producer/consumer problem the course's ways.
#![deny(missing_docs, rust_2018_idioms)]

pub mod bench;
pub mod bus;
pub mod cli;
pub mod client;
pub mod ipc;
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
