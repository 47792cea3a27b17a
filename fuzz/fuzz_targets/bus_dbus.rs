//! cargo-fuzz target: see `fuzz/harness.rs` (`bus_dbus`) for the invariants checked.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::bus_dbus(data));
