//! cargo-fuzz target: see `fuzz/harness.rs` for the invariants checked.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::reverse_framing(data));
