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
    bench_json_exit(args, 0)
}

/// Run `bench ARGS --json`, expecting exit status `code`; the JSON it printed.
fn bench_json_exit(args: &[&str], code: i32) -> serde_json::Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "bench {args:?}: {}",
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
    // Some requests failed: exit 3.
    let v = bench_json_exit(&[&addr, "-n", "5000", "-c", "4", "-s", "64"], 3);
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
    // Nothing verified: exit 4, at once rather than after the duration.
    let v = bench_json_exit(&[&format!("127.0.0.1:{port}"), "-d", "30s", "-c", "4"], 4);
    assert!(n(&v, &["errors", "refused"]) > 0.0, "{v}");
    assert_eq!(n(&v, &["requests"]), 0.0);
    assert!(n(&v, &["duration_s"]) < 5.0, "{v}");
    assert_eq!(v["ended"], "gave_up");

    // A server that resets every other connection (SO_LINGER 0 then close) and serves
    // reverse on the rest: the resets are counted, the slots reconnect, and the run, some of
    // whose requests failed, exits 3.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for (k, s) in l.incoming().flatten().enumerate() {
            std::thread::spawn(move || {
                let mut s = socket2::Socket::from(s);
                let mut h = [0u8; 4];
                if k % 2 == 0 {
                    let _ = (&s).read(&mut h);
                    let _ = s.set_linger(Some(Duration::ZERO));
                    return;
                }
                while std::io::Read::read_exact(&mut s, &mut h).is_ok() {
                    let mut d = vec![0u8; u32::from_be_bytes(h) as usize];
                    if std::io::Read::read_exact(&mut s, &mut d).is_err() {
                        return;
                    }
                    d.reverse();
                    if std::io::Write::write_all(&mut s, &d).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let v = bench_json_exit(&[&addr, "-d", "500ms", "-c", "4"], 3);
    let failed = n(&v, &["errors", "reset"]) + n(&v, &["errors", "short"]);
    assert!(failed > 0.0, "{v}");
    assert!(n(&v, &["requests"]) > 0.0, "{v}");
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

/// Item 1 of issue 12: a zero-size request is legal for reverse (the header alone, an empty
/// answer) and no longer overflows the stack; echo, which has no framing, refuses it with a
/// reason; `--compare -s 0` runs and leaves no server behind.
#[test]
fn zero_size_requests() {
    let srv = Server::tcp("reverse", "epoll", &[]);
    let v = bench_json(&[&srv.addr, "-s", "0", "-n", "3000", "-c", "4"]);
    assert_eq!(n(&v, &["requests"]), 3000.0, "{v}");
    let v = bench_json(&[&srv.addr, "-s", "0", "-d", "500ms", "-c", "2"]);
    assert!(n(&v, &["requests"]) > 0.0, "{v}");
    let out = Command::new(BIN)
        .args([
            "bench",
            &srv.addr,
            "--service",
            "echo",
            "-s",
            "0",
            "-d",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("echo") && err.contains("-s 1"), "{err}");
    assert!(srv.stop().0.success());

    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("c.svg");
    let run = Watched::start(&[
        "bench",
        "--compare",
        "--quick",
        "--models",
        "epoll",
        "--levels",
        "1",
        "-s",
        "0",
        "--json",
        "--chart",
        chart.to_str().unwrap(),
    ]);
    let (status, out, err, seen) = run.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["points"][0]["req_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(!seen.is_empty(), "the server was seen");
    assert_all_gone(&seen, Duration::from_secs(5), "--compare -s 0");
}

/// Item 3: a run where nothing could pass stops early with exit 4 and says why; some
/// failures give exit 3 (see `one_corrupt_answer...`, `refusals_and_resets...`); the codes
/// are in --help.
#[test]
fn nothing_verified_exits_4_and_the_codes_are_documented() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("index.html"), b"<p>hi</p>").unwrap();
    let srv = Server::tcp("http", "epoll", &["--root", root.path().to_str().unwrap()]);
    let started = std::time::Instant::now();
    let out = Command::new(BIN)
        .args([
            "bench",
            &srv.addr,
            "--service",
            "http",
            "--path",
            "/missing",
            "-d",
            "30s",
            "-c",
            "8",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "stopped early");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no answer was verified") && err.contains("bad status"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // The same server with a path that exists: every request verified, exit 0.
    let v = bench_json(&[
        &srv.addr,
        "--service",
        "http",
        "--path",
        "/index.html",
        "-n",
        "200",
    ]);
    assert_eq!(n(&v, &["requests"]), 200.0);
    assert!(srv.stop().0.success());

    let help = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for code in ["Exit status", "  3 ", "  4 ", "130"] {
        assert!(help.contains(code), "--help lacks {code:?}:\n{help}");
    }
}

/// Item 4: SIGINT prints the partial summary and exits 130 (SIGTERM: 143).
#[test]
fn a_signal_ends_bench_with_the_partial_summary() {
    let srv = Server::tcp("reverse", "epoll", &[]);
    for (sig, code, json) in [(libc::SIGINT, 130, false), (libc::SIGTERM, 143, true)] {
        let mut args = vec!["bench", srv.addr.as_str(), "-d", "60s", "-c", "4"];
        if json {
            args.push("--json");
        }
        let mut run = Watched::start(&args);
        std::thread::sleep(Duration::from_millis(800));
        signal(run.child.id(), sig);
        run.look();
        let (status, out, err, _) = run.finish(Duration::from_secs(10));
        assert_eq!(status.code(), Some(code), "{err}");
        assert!(err.contains("interrupted"), "{err}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["ended"], "interrupted");
            assert!(
                n(&v, &["requests"]) > 0.0 && n(&v, &["duration_s"]) < 10.0,
                "{v}"
            );
        } else {
            assert!(
                out.contains("requests") && out.contains("stopped     by a signal"),
                "{out}"
            );
        }
    }
    assert!(srv.stop().0.success());
}

/// Item 4: the servers of --compare die with it, whatever ends it.
#[test]
fn compare_servers_never_outlive_it() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("c.svg");
    for (sig, code) in [
        (libc::SIGINT, Some(130)),
        (libc::SIGTERM, Some(143)),
        (libc::SIGKILL, None),
    ] {
        // fork: a process per connection, so the server has children of its own.
        let mut run = Watched::start(&[
            "bench",
            "--compare",
            "--models",
            "fork",
            "--levels",
            "4",
            "-d",
            "60s",
            "--chart",
            chart.to_str().unwrap(),
        ]);
        assert!(
            run.wait_for(Duration::from_secs(20), |seen| seen.len() >= 3),
            "the fork server and its children never appeared: {:?}",
            run.seen
        );
        signal(run.child.id(), sig);
        let (status, out, err, seen) = run.finish(Duration::from_secs(15));
        assert_eq!(status.code(), code, "signal {sig}: {err}");
        if sig != libc::SIGKILL {
            assert!(
                out.contains("model") && out.contains("Key to the --compare table"),
                "{out}"
            );
            assert!(err.contains("interrupted"), "{err}");
        }
        assert_all_gone(&seen, Duration::from_secs(5), &format!("signal {sig}"));
    }
}

/// Item 4: c10k says up front when the descriptor limit cannot hold it, and starts nothing.
#[test]
fn c10k_checks_the_descriptor_limit_first() {
    let out = Command::new("bash")
        .args([
            "-c",
            "ulimit -n 1024 && ulimit -Hn 1024 && exec \"$0\" bench --compare --scenario c10k --chart /dev/null",
            BIN,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("descriptors") && err.contains("1024"), "{err}");
    assert!(out.stdout.is_empty(), "nothing ran");
}

/// Item 5: a chart path that cannot be written is refused before anything runs; the default
/// name follows the scenario.
#[test]
fn chart_path_is_checked_first_and_named_after_the_scenario() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["/nonexistent-dir/c.svg", dir.path().to_str().unwrap()] {
        let run = Watched::start(&["bench", "--compare", "--quick", "--chart", bad]);
        let (status, out, err, seen) = run.finish(Duration::from_secs(30));
        assert_eq!(status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(bad) && err.lines().count() == 1, "{err}");
        assert!(
            out.is_empty() && seen.is_empty(),
            "nothing ran for {bad}: {seen:?}"
        );
    }
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args([
            "bench",
            "--compare",
            "--quick",
            "--models",
            "epoll",
            "--levels",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("chart: socklab-bench-levels.svg"), "{text}");
    assert!(dir.path().join("socklab-bench-levels.svg").exists());
    // Item 8: the key under the table names every column.
    let key = text
        .split("Key to the --compare table")
        .nth(1)
        .expect("a key");
    for col in [
        "conns", "idle", "req/s", "errors", "starved", "cpu s", "ms/kreq", "rss MiB",
    ] {
        assert!(key.contains(col), "the key lacks {col}: {text}");
    }
    let help = Command::new(BIN)
        .args(["bench", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("ms/kreq  server CPU milliseconds"));
}

/// Item 11: `-d 0s` and `-n 0` are refused; one connection is "1 connection".
#[test]
fn empty_runs_are_refused_and_counts_agree() {
    for args in [["-d", "0s"], ["-n", "0"]] {
        let out = Command::new(BIN)
            .args(["bench", "127.0.0.1:9"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
    let srv = Server::tcp("reverse", "epoll", &[]);
    let out = Command::new(BIN)
        .args(["bench", &srv.addr, "-c", "1", "-t", "1", "-n", "10"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 connection,") && text.contains("1 thread,"),
        "{text}"
    );
    assert!(!text.contains("1 connections"), "{text}");
    assert!(srv.stop().0.success());
}

/// Per-interval reports, as lines and in JSON, adding up to the summary.
#[test]
fn interval_reports() {
    let srv = Server::tcp("reverse", "epoll", &[]);
    let v = bench_json(&[&srv.addr, "-d", "2s", "-i", "500ms", "-c", "4"]);
    let iv = v["intervals"].as_array().unwrap();
    assert_eq!(iv.len(), 4, "{v}");
    let total: f64 = iv.iter().map(|i| i["requests"].as_f64().unwrap()).sum();
    assert_eq!(total, n(&v, &["requests"]), "{v}");
    for (k, i) in iv.iter().enumerate() {
        assert_eq!(i["start_s"].as_f64().unwrap(), k as f64 * 0.5);
        assert!(i["req_per_s"].as_f64().unwrap() > 0.0 && i["p99_us"].as_f64().unwrap() > 0.0);
    }
    let out = Command::new(BIN)
        .args(["bench", &srv.addr, "-d", "1s", "-i", "250ms", "-c", "2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("interval"), "{text}");
    for (k, from) in ["0.00-0.25 s", "0.25-0.50 s", "0.50-0.75 s", "0.75-1.00 s"]
        .iter()
        .enumerate()
    {
        assert!(lines[k + 1].starts_with(from), "{text}");
    }
    assert!(
        lines[5].starts_with("target"),
        "summary after the intervals: {text}"
    );
    assert!(srv.stop().0.success());
}
