//! CPU cost of the reverse session alone (no sockets): parse + reverse + queue, per request.
//!
//! Run: `cargo run --release --example session_cost -- [SIZE] [REQUESTS]`
//! (defaults 16384 bytes, 20000 requests).

use socklab::output::Outbox;
use socklab::service::{reverse::encode_request, ServiceConfig, ServiceKind};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).map_or(16384, |s| s.parse().expect("SIZE"));
    let n: usize = args.get(2).map_or(20000, |s| s.parse().expect("REQUESTS"));
    let req = encode_request(&(0..size).map(|i| i as u8).collect::<Vec<u8>>());
    let cfg = ServiceConfig::new(ServiceKind::Reverse);
    let mut out = Outbox::new();
    let mut session = cfg.open(&mut out);
    let mut sink = 0u64;
    let t = Instant::now();
    for _ in 0..n {
        // Fed in 64 KiB reads, as a model would.
        for chunk in req.chunks(65536) {
            session.receive(chunk, &mut out).unwrap();
        }
        let bytes = out.take_bytes();
        sink = sink.wrapping_add(bytes[0] as u64);
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{size}-byte requests: {:.0} ns/request, {:.2} GB/s (checksum {sink})",
        secs * 1e9 / n as f64,
        (n * size) as f64 / secs / 1e9
    );
}
