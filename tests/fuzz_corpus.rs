//! Replays every committed fuzz corpus entry (`fuzz/corpus/TARGET/*`) through the same
//! invariant checks the cargo-fuzz targets run (`fuzz/harness.rs`), in the normal `cargo
//! test`: no nightly compiler or cargo-fuzz needed, and a past finding, once added to the
//! corpus, stays fixed. `benches/fuzz.sh` grows the corpora; see docs/security.md.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::Path;

/// Run `check` on every file of the target's corpus; there must be some.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "{target}: empty corpus");
    for path in &entries {
        let data = std::fs::read(path).expect("read corpus entry");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{target}: corpus entry {} fails",
            path.display()
        );
    }
}

#[test]
fn reverse_framing() {
    replay("reverse_framing", harness::reverse_framing);
}

#[test]
fn http_session() {
    replay("http_session", harness::http_session);
}

#[test]
fn path_resolution() {
    replay("path_resolution", harness::path_resolution);
}

#[test]
fn range_headers() {
    replay("range_headers", harness::range_headers);
}

#[test]
fn bench_checkers() {
    replay("bench_checkers", harness::bench_checkers);
}

#[test]
fn bus_dbus() {
    replay("bus_dbus", harness::bus_dbus);
}
