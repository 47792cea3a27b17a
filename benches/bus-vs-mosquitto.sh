#!/usr/bin/env bash
# socklab bus serve vs Debian's mosquitto, same machine, driven by `socklab bus bench` in one
# run, alternating rounds. Cells: QoS 0 and 1, 64 B payload; 1->1, 1->100 fan-out, 100->1
# fan-in, 1,000 publisher/subscriber pairs; delivered messages/s and p99 latency (medians of
# the rounds, and the ratio socklab/mosquitto). Then memory per idle connection at 10,000
# idle connections.
#
# Pinning: both brokers on CPU 0 (socklab with one loop, as mosquitto has one thread), the
# load generator (one epoll loop) on CPU 1. Closed loop: each publisher keeps INFLIGHT
# messages (default 64) unacknowledged and undelivered; the fan-in cells keep 8, so that 100
# publishers stay below the 1,000 messages both brokers queue for their one subscriber.
# With a small window (INFLIGHT=16) the 1->1 cells measure one round trip, not throughput.
#
#   benches/bus-vs-mosquitto.sh            # 3 rounds of 5 s per cell
#   ROUNDS=1 SECS=3 benches/bus-vs-mosquitto.sh
#   INFLIGHT=16 benches/bus-vs-mosquitto.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }
socklab=$(socklab_build)
bin=$socklab
rounds=${ROUNDS:-3}
secs=${SECS:-5}
inflight=${INFLIGHT:-64}
ulimit -n "$(ulimit -Hn)"   # 10,000 idle connections need the descriptors

mport=$(free_port)
cat > "$tmp/mosquitto.conf" <<CONF
listener $mport 127.0.0.1
allow_anonymous true
max_connections -1
max_queued_messages 1000
CONF
taskset -c 0 mosquitto -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
mpid=$!; pids+=($mpid)
taskset -c 0 "$bin" bus serve --listen 127.0.0.1:0 --workers 1 >"$tmp/socklab.addr" 2>"$tmp/socklab.log" &
spid=$!; pids+=($spid)
for _ in $(seq 100); do [ -s "$tmp/socklab.addr" ] && break; sleep 0.05; done
saddr=$(head -1 "$tmp/socklab.addr")
maddr=127.0.0.1:$mport
sleep 0.5

# Memory per idle connection: 10,000 connections that sent CONNECT and stay idle.
idle() {
  python3 - "$1" "$2" <<'PY'
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(10000):
    s = socket.create_connection((host, port))
    cid = b"idle%d" % i
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    socks.append(s)
for s in socks:
    assert s.recv(4) == b"\x20\x02\x00\x00"
print("ready", flush=True)
time.sleep(3)
PY
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
# Measured first, on fresh brokers.
for who in socklab mosquitto; do
  pid=$spid; addr=$saddr; [ "$who" = mosquitto ] && { pid=$mpid; addr=$maddr; }
  before=$(rss "$pid")
  idle "${addr%:*}" "${addr##*:}" > "$tmp/idle.out" &
  ipid=$!
  for _ in $(seq 600); do grep -q ready "$tmp/idle.out" 2>/dev/null && break; sleep 0.1; done
  after=$(rss "$pid")
  wait "$ipid"
  echo "$who: RSS $before KiB -> $after KiB at 10,000 idle connections: $(( (after - before) * 1024 / 10000 )) bytes per connection"
done

cells=(
  "q0-1to1|--scenario pairs -n 1 -q 0 --inflight $inflight"
  "q1-1to1|--scenario pairs -n 1 -q 1 --inflight $inflight"
  "q0-fanout100|--scenario fanout -n 100 -q 0 --inflight $inflight"
  "q1-fanout100|--scenario fanout -n 100 -q 1 --inflight $inflight"
  "q0-fanin100|--scenario fanin -n 100 -q 0 --inflight 8"
  "q1-fanin100|--scenario fanin -n 100 -q 1 --inflight 8"
  "q0-pairs1000|--scenario pairs -n 1000 -q 0 --inflight $inflight"
  "q1-pairs1000|--scenario pairs -n 1000 -q 1 --inflight $inflight"
)
echo "# $(date -u +%F) rounds=$rounds secs=$secs inflight=$inflight brokers on CPU 0, bench on CPU 1" > "$tmp/results.txt"
for round in $(seq "$rounds"); do
  for cell in "${cells[@]}"; do
    name=${cell%%|*}; args=${cell#*|}
    # Alternate which broker goes first.
    if [ $((round % 2)) -eq 1 ]; then order="socklab mosquitto"; else order="mosquitto socklab"; fi
    for who in $order; do
      addr=$saddr; [ "$who" = mosquitto ] && addr=$maddr
      # shellcheck disable=SC2086
      json=$(taskset -c 1 "$bin" bus bench "$addr" $args --size 64 -d "${secs}s" --threads 1 --json)
      echo "$name $who $json" >> "$tmp/results.txt"
    done
  done
done

python3 - "$tmp/results.txt" <<'PY'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("#"): print(line.strip()); continue
    cell, who, js = line.split(" ", 2)
    r = json.loads(js)
    rows.setdefault(cell, {}).setdefault(who, []).append(r)
print(f"{'cell':<14} {'socklab msg/s':>14} {'mosquitto msg/s':>16} {'ratio':>6} {'socklab p99us':>14} {'mosq p99us':>11} {'lost s/m':>9}")
for cell, d in rows.items():
    s, m = d["socklab"], d["mosquitto"]
    sm = statistics.median(x["delivered_per_sec"] for x in s)
    mm = statistics.median(x["delivered_per_sec"] for x in m)
    sp = statistics.median(x["latency_us"][2] for x in s)
    mp = statistics.median(x["latency_us"][2] for x in m)
    sl = sum(x["lost"] for x in s); ml = sum(x["lost"] for x in m)
    print(f"{cell:<14} {sm:>14.0f} {mm:>16.0f} {sm/mm:>6.2f} {sp:>14} {mp:>11} {sl:>4}/{ml:<4}")
PY

