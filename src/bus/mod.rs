//! `socklab bus`: the course's software bus as an MQTT 3.1.1 / 5.0 broker, its clients and
//! its load generator.
//!
//! | file | part |
//! | --- | --- |
//! | [`codec`] | framing, the `mqtt-proto` crate's decoders, 3.1.1 ↔ 5.0 mapping, PUBLISH encoding |
//! | [`topic`] | the subscription trie (`+`, `#`, `$` topics, `$share/GROUP/FILTER`) |
//! | [`session`] | one connection's protocol state, sans-IO: bytes in, packets out |
//! | [`broker`] | the routing core, sans-IO: sessions, retained messages, wills, `$SYS` |
//! | [`store`] | persistence behind the core (redb), group-committed |
//!
//! See `docs/bus.md` for the protocol notes and the design.

pub mod broker;
pub mod codec;
pub mod session;
pub mod store;
pub mod topic;
