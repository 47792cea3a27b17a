#!/usr/bin/env bash
# Method-call round trips per second and p99 through `socklab bus serve` vs through Debian's
# dbus-daemon (a private bus started here with --address=unix:path=...), one run, alternating
# rounds. The same load program drives both (benches/bus-vs-dbus/: an echo service and
# CALLERS closed-loop callers, one connection each, a small string argument, every reply
# checked): socklab's Rust API (socklab::bus::peer) on one side, the zbus crate on the other.
# Cells: 1 caller and 16 callers. Medians of the rounds and the ratio socklab/dbus-daemon.
#
# Pinning: the bus (socklab bus serve --workers 1, or dbus-daemon, single-threaded) on CPU 0;
# the load program (service and callers) on CPU 1. dbus-daemon listens on a Unix socket;
# socklab's bus on a Unix socket too (the like-for-like cell) and on TCP loopback (how MQTT
# clients usually reach it).
#
#   benches/bus-vs-dbus.sh                 # 5 rounds of 3 s per cell
#   ROUNDS=3 SECS=2 benches/bus-vs-dbus.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
command -v dbus-daemon >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dbus-daemon >/dev/null; }
socklab=$(socklab_build)
# The load program, where cargo says it put it (as socklab_build does for socklab).
load=$(cargo build --release --manifest-path benches/bus-vs-dbus/Cargo.toml \
  --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "bus-vs-dbus" and m.get("executable"):
        print(m["executable"])')
[ -x "$load" ] || { echo "cargo named no bus-vs-dbus executable" >&2; exit 1; }
rounds=${ROUNDS:-5}
secs=${SECS:-3}

taskset -c 0 "$socklab" bus serve --listen 127.0.0.1:0 --unix "$tmp/socklab.sock" --workers 1 >"$tmp/socklab.addr" 2>"$tmp/socklab.log" &
pids+=($!)
taskset -c 0 dbus-daemon --session --nofork --nopidfile --address="unix:path=$tmp/dbus.sock" \
  --print-address=1 >"$tmp/dbus.addr" 2>"$tmp/dbus.log" &
pids+=($!)
for _ in $(seq 100); do [ -s "$tmp/socklab.addr" ] && [ -s "$tmp/dbus.addr" ] && break; sleep 0.05; done
saddr=$(head -1 "$tmp/socklab.addr")
uaddr=$tmp/socklab.sock
daddr=$(head -1 "$tmp/dbus.addr")

echo "# $(date -u +%F) rounds=$rounds secs=$secs; bus on CPU 0, load on CPU 1; $(dbus-daemon --version | head -1)" | tee "$tmp/results.txt"
for round in $(seq "$rounds"); do
  for callers in 1 16; do
    if [ $((round % 2)) -eq 1 ]; then order="socklab-unix dbus socklab-tcp"; else order="socklab-tcp dbus socklab-unix"; fi
    for who in $order; do
      case $who in
        socklab-unix) kind=socklab; addr=$uaddr ;;
        socklab-tcp) kind=socklab; addr=$saddr ;;
        dbus) kind=dbus; addr=$daddr ;;
      esac
      echo "$callers $who $(taskset -c 1 "$load" "$kind" "$addr" "$callers" "$secs")" >> "$tmp/results.txt"
    done
  done
done

python3 - "$tmp/results.txt" <<'PY'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("#"): continue
    callers, who, js = line.split(" ", 2)
    rows.setdefault(int(callers), {}).setdefault(who, []).append(json.loads(js))
print("| callers | socklab (Unix) calls/s | socklab (TCP) calls/s | dbus-daemon calls/s | ratio Unix | ratio TCP | p99 µs socklab Unix / TCP / dbus-daemon |")
print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
med = lambda d, who, k: statistics.median(x[k] for x in d[who])
for callers, d in sorted(rows.items()):
    u, t, m = (med(d, w, "rps") for w in ("socklab-unix", "socklab-tcp", "dbus"))
    pu, pt, pm = (med(d, w, "p99_us") for w in ("socklab-unix", "socklab-tcp", "dbus"))
    print(f"| {callers} | {u:,.0f} | {t:,.0f} | {m:,.0f} | {u/m:.2f} | {t/m:.2f} | {pu:,.0f} / {pt:,.0f} / {pm:,.0f} |")
PY
