//! Who may join the bus and what they may do there.
//!
//! | file | part |
//! | --- | --- |
//! | [`acl`] | ACL files (mosquitto's syntax, plus D-Bus-style name rules) and their matcher |

pub mod acl;
pub mod passwd;
pub mod ratelimit;
pub mod tls;
