//! Method-call round trips through a bus: a service that echoes its argument, CALLERS
//! threads (one connection each) that call it in a closed loop for SECS seconds and check
//! every reply. Prints one JSON line: calls/s and latency percentiles.
//!
//!   bus-vs-dbus socklab 127.0.0.1:1883 16 5     # through `socklab bus serve` (TCP)
//!   bus-vs-dbus socklab /tmp/bus.sock 16 5      # (its Unix socket)
//!   bus-vs-dbus dbus unix:path=/tmp/bus 16 5    # through dbus-daemon (zbus on both ends)

use hdrhistogram::Histogram;
use serde_json::json;
use socklab::bus::peer::{BusConnection, BusMessage};
use socklab::bus::client::bus_endpoint;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const NAME: &str = "org.socklab.Bench";

struct Echo;

#[zbus::interface(name = "org.socklab.Bench")]
impl Echo {
    fn echo(&self, s: String) -> String {
        s
    }
}

/// One caller's loop: returns (calls, latency histogram in ns).
fn drive(
    mut call: impl FnMut(&str) -> anyhow::Result<String>,
    start: &Barrier,
    secs: f64,
    id: usize,
) -> anyhow::Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    start.wait();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        let arg = format!("c{id}-{n}");
        let t = Instant::now();
        let got = call(&arg)?;
        let ns = t.elapsed().as_nanos() as u64;
        anyhow::ensure!(got == arg, "reply {got:?} to call {arg:?}");
        h.record(ns.max(1))?;
        n += 1;
    }
    Ok(h)
}

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(a.len() == 5, "usage: bus-vs-dbus socklab|dbus ADDRESS CALLERS SECS");
    let (kind, addr) = (a[1].clone(), a[2].clone());
    let callers: usize = a[3].parse()?;
    let secs: f64 = a[4].parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(callers + 1));
    // The service, then the callers, each on its own connection.
    let mut _zbus_service = None;
    let mut service = None;
    match kind.as_str() {
        "socklab" => {
            let ep = bus_endpoint(Some(&addr));
            let mut c = BusConnection::connect(&ep)?;
            c.request_name(NAME, 0)?;
            let w = c.writer()?;
            let stop = stop.clone();
            service = Some(std::thread::spawn(move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(BusMessage::Call(call)) =
                        c.next_message(Some(Duration::from_millis(100)))?
                    {
                        w.reply(&call, &call.args)?;
                    }
                }
                Ok(())
            }));
        }
        "dbus" => {
            _zbus_service = Some(
                zbus::blocking::connection::Builder::address(addr.as_str())?
                    .name(NAME)?
                    .serve_at("/", Echo)?
                    .build()?,
            );
        }
        other => anyhow::bail!("unknown bus kind {other:?}"),
    }
    let threads: Vec<_> = (0..callers)
        .map(|id| {
            let (kind, addr, start) = (kind.clone(), addr.clone(), start.clone());
            std::thread::spawn(move || -> anyhow::Result<Histogram<u64>> {
                if kind == "socklab" {
                    let mut c = BusConnection::connect(&bus_endpoint(Some(&addr)))?;
                    drive(
                        |s| {
                            let r = c.call(NAME, "/", Some(NAME), "Echo", &[json!(s)], Duration::from_secs(25))?;
                            Ok(r.first().and_then(|v| v.as_str()).unwrap_or("").to_string())
                        },
                        &start,
                        secs,
                        id,
                    )
                } else {
                    let c = zbus::blocking::connection::Builder::address(addr.as_str())?.build()?;
                    drive(
                        |s| {
                            let m = c.call_method(Some(NAME), "/", Some(NAME), "Echo", &(s,))?;
                            Ok(m.body().deserialize::<String>()?)
                        },
                        &start,
                        secs,
                        id,
                    )
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for t in threads {
        let h = t.join().map_err(|_| anyhow::anyhow!("a caller panicked"))??;
        all.add(&h)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    if let Some(s) = service {
        s.join().map_err(|_| anyhow::anyhow!("the service panicked"))??;
    }
    println!(
        "{}",
        json!({
            "bus": kind, "callers": callers, "calls": all.len(), "secs": elapsed,
            "rps": all.len() as f64 / elapsed,
            "p50_us": all.value_at_quantile(0.5) as f64 / 1e3,
            "p99_us": all.value_at_quantile(0.99) as f64 / 1e3,
        })
    );
    Ok(())
}
