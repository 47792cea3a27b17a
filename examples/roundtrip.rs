//! Rough reverse round-trip figures: C blocking client threads, one connection each, sending
//! 64-byte reverse requests back to back for a fixed time.
//!
//! Run: `cargo run --release --example roundtrip -- ADDR CONNECTIONS SECONDS [SIZE]`
//! (start a server first, e.g. `socklab serve reverse --model epoll --listen 127.0.0.1:0`).
//! `socklab bench` is the real load generator; this is the quick check of issue 2.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: roundtrip ADDR CONNECTIONS SECONDS [SIZE]");
        std::process::exit(2);
    }
    let addr = args[1].clone();
    let conns: usize = args[2].parse().expect("CONNECTIONS");
    let secs: f64 = args[3].parse().expect("SECONDS");
    let size: usize = args.get(4).map_or(64, |s| s.parse().expect("SIZE"));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.set_nodelay(true).unwrap();
                let data: Vec<u8> = (0..size).map(|k| (k * 7 + i) as u8).collect();
                let want: Vec<u8> = data.iter().rev().copied().collect();
                let mut msg = (size as u32).to_be_bytes().to_vec();
                msg.extend_from_slice(&data);
                let mut got = vec![0u8; size];
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    s.write_all(&msg).unwrap();
                    s.read_exact(&mut got).unwrap();
                    lat.push(t.elapsed());
                    assert_eq!(got, want, "wrong answer");
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    let n = all.len();
    let pct = |p: f64| all[((n as f64 * p) as usize).min(n - 1)];
    println!(
        "{n} requests in {secs} s: {:.0} req/s, p50 {:?}, p99 {:?}",
        n as f64 / secs,
        pct(0.50),
        pct(0.99)
    );
}
