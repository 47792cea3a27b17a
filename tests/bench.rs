//! `socklab bench`: the generator counts exactly, catches wrong answers, survives resets
//! and refusals, holds an open-loop rate, and `--compare` produces a table and a valid SVG.

mod util;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use util::*;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bench --json prints one JSON object")
}

fn n(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut x = v;
    for p in path {
        x = &x[*p];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v}"))
}

#[test]
fn exact_request_counts() {
    for model in ["epoll", "thread"] {
        let srv = Server::tcp("reverse", model, &[]);
        for (reqs, conns) in [("1", "1"), ("1000", "8"), ("2500", "64")] {
            let v = bench_json(&[&srv.addr, "-n", reqs, "-c", conns, "-s", "100"]);
            assert_eq!(
                n(&v, &["requests"]),
                reqs.parse::<f64>().unwrap(),
                "{model} {reqs}/{conns}: {v}"
            );
            assert_eq!(n(&v, &["errors_total"]), 0.0, "{v}");
        }
        let v = bench_json(&[
            &srv.addr,
            "-n",
            "300",
            "-c",
            "4",
            "--service",
            "reverse",
            "--connect-per-request",
        ]);
        assert_eq!(n(&v, &["requests"]), 300.0);
        assert_eq!(n(&v, &["reconnects"]), 300.0 - 4.0, "{v}");
        assert!(srv.stop().0.success());
    }
    let srv = Server::tcp("echo", "reactors", &[]);
    let v = bench_json(&[
        &srv.addr,
        "--service",
        "echo",
        "-n",
        "777",
        "-c",
        "7",
        "-s",
        "16k",
    ]);
    assert_eq!(n(&v, &["requests"]), 777.0);
    assert!(srv.stop().0.success());
}

/// A reverse server that corrupts one answer in 1,000 (a flipped byte).
fn corrupting_server() -> (String, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let answers = Arc::new(AtomicU64::new(0));
    let counter = answers.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut h = [0u8; 4];
                while s.read_exact(&mut h).is_ok() {
                    let mut d = vec![0u8; u32::from_be_bytes(h) as usize];
                    if s.read_exact(&mut d).is_err() {
                        return;
                    }
                    d.reverse();
                    if (counter.fetch_add(1, Ordering::SeqCst) + 1).is_multiple_of(1000) {
                        let mid = d.len() / 2;
                        d[mid] ^= 0x40;
                    }
                    if s.write_all(&d).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, answers)
}

#[test]
fn one_corrupt_answer_in_a_thousand_is_caught() {
    let (addr, _) = corrupting_server();
    let v = bench_json(&[&addr, "-n", "5000", "-c", "4", "-s", "64"]);
    let wrong = n(&v, &["errors", "wrong"]);
    let ok = n(&v, &["requests"]);
    assert!(wrong >= 1.0, "corruption not detected: {v}");
    assert_eq!(
        ok + n(&v, &["errors_total"]),
        5000.0,
        "every request is either verified or failed: {v}"
    );
    assert!(
        ok < 5000.0,
        "a corrupted answer was counted as a success: {v}"
    );
}

#[test]
fn refusals_and_resets_are_counted_not_fatal() {
    // Nothing listens on a port we bound and released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let v = bench_json(&[&format!("127.0.0.1:{port}"), "-d", "500ms", "-c", "4"]);
    assert!(n(&v, &["errors", "refused"]) > 0.0, "{v}");
    assert_eq!(n(&v, &["requests"]), 0.0);

    // A server that accepts and resets every connection (SO_LINGER 0 then close).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let s = socket2::Socket::from(s);
            let mut b = [0u8; 16];
            let _ = (&s).read(&mut b);
            let _ = s.set_linger(Some(Duration::ZERO));
        }
    });
    let v = bench_json(&[&addr, "-d", "500ms", "-c", "4"]);
    let failed = n(&v, &["errors", "reset"]) + n(&v, &["errors", "short"]);
    assert!(failed > 0.0, "{v}");
    assert!(n(&v, &["reconnects"]) > 0.0, "{v}");
}

#[test]
fn open_loop_holds_the_rate() {
    let srv = Server::tcp("reverse", "epoll", &[]);
    let v = bench_json(&[&srv.addr, "--rate", "3000", "-d", "3s", "-c", "16"]);
    let rate = n(&v, &["req_per_s"]);
    assert!(
        (rate - 3000.0).abs() <= 150.0,
        "asked 3000 req/s, got {rate}: {v}"
    );
    assert_eq!(v["mode"], "open");
    assert!(srv.stop().0.success());
}

#[test]
fn json_carries_every_documented_field() {
    let srv = Server::tcp("reverse", "epoll", &[]);
    let v = bench_json(&[&srv.addr, "-n", "100", "-c", "2", "--idle", "10"]);
    for key in [
        "target",
        "service",
        "connections",
        "idle",
        "idle_established",
        "threads",
        "size",
        "mode",
        "rate",
        "connect_per_request",
        "duration_s",
        "requests",
        "req_per_s",
        "mb_per_s",
        "latency_us",
        "errors",
        "errors_total",
        "reconnects",
        "starved",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for key in ["p50", "p90", "p99", "p999", "max", "mean"] {
        assert!(
            v["latency_us"].get(key).is_some(),
            "missing latency_us.{key}"
        );
    }
    for key in [
        "refused",
        "reset",
        "timeout",
        "short",
        "wrong",
        "bad_status",
        "other",
    ] {
        assert!(v["errors"].get(key).is_some(), "missing errors.{key}");
    }
    assert_eq!(n(&v, &["idle_established"]), 10.0);
    assert!(n(&v, &["latency_us", "p50"]) <= n(&v, &["latency_us", "p99"]));
    assert!(srv.stop().0.success());
}

#[test]
fn over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let p = path.to_str().unwrap();
    let srv = Server::start(&["echo", "--model", "epoll", "--unix", p]);
    let v = bench_json(&["--unix", p, "--service", "echo", "-n", "500", "-c", "5"]);
    assert_eq!(n(&v, &["requests"]), 500.0);
    assert!(srv.stop().0.success());
}

#[test]
fn user_mistakes_exit_2() {
    let out = Command::new(BIN).args(["bench"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .args(["bench", "127.0.0.1:1", "--rate", "-5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn compare_quick_over_two_models_writes_a_valid_svg() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("chart.svg");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--compare",
            "--quick",
            "--models",
            "epoll,thread",
            "--levels",
            "1,4",
            "--json",
            "--chart",
        ])
        .arg(&chart)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 4);
    for p in points {
        assert!(p["req_per_s"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["cpu_s"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["rss_mib"].as_f64().unwrap() > 0.0, "{p}");
    }
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
    // Well-formed XML with an <svg> root, as any viewer will parse it.
    let check = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); assert r.tag.endswith('svg'), r.tag",
        ])
        .arg(&chart)
        .status()
        .unwrap();
    assert!(check.success(), "the chart is not well-formed SVG");
    assert!(svg.contains("epoll") && svg.contains("thread"));
}

#[test]
fn http_mode_reads_status_and_length() {
    // A minimal keep-alive HTTP responder, enough to check the generator's HTTP side.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s: TcpStream = s;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let body = b"<p>hello</p>";
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        if s.write_all(head.as_bytes())
                            .and_then(|_| s.write_all(body))
                            .is_err()
                        {
                            return;
                        }
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
            });
        }
    });
    let v = bench_json(&[
        &addr,
        "--service",
        "http",
        "--path",
        "/index.html",
        "-n",
        "400",
        "-c",
        "4",
    ]);
    assert_eq!(n(&v, &["requests"]), 400.0, "{v}");
    assert_eq!(n(&v, &["errors_total"]), 0.0);
}
