#!/usr/bin/env bash
# socklab ipc against the anchors, side by side in one run, alternating the tools each round,
# the same pinning for both, medians over the rounds and their ratio (socklab / peer):
#
#   pipe round trip   perf bench sched pipe        vs socklab ipc pipe --size 4
#                     one CPU: taskset -c 0 perf   vs --pin same
#                     two CPUs: taskset -c 0,1 perf (perf cannot pin its two sides apart)
#                               vs --pin none (same freedom), and --pin cross alone
#   TCP, UDP rtt      sockperf ping-pong -m 80 --full-rtt, server on CPU 1, client on CPU 0
#                     vs socklab ipc tcp|udp --size 64 --pin cross (64 B + 16 B header = 80 B)
#                     and both on CPU 0 vs --pin same
#   pipe throughput   stress-ng --pipe 1 --pipe-data-size 4096 (MB/s written)
#                     vs socklab ipc pipe --mode stream --size 4080 (4096-byte messages)
#
# Round trips compare the mean (perf and sockperf's summary) and, for sockperf, the median.
# Debian's sockperf 3.7 has no Unix-socket mode, so `unix` has no anchor here (see docs/ipc.md).
#
# usage: benches/ipc-vs-peers.sh [SECONDS] [ROUNDS]   (defaults 3 5)
# needs: perf (linux-perf), sockperf, stress-ng, taskset, python3 — installed with apt-get here
# if missing; a release build of socklab (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}; rounds=${2:-5}
source benches/lib.sh
need=()
command -v perf >/dev/null || need+=(linux-perf)
command -v sockperf >/dev/null || need+=(sockperf)
command -v stress-ng >/dev/null || need+=(stress-ng)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
socklab=$(socklab_build)
[ "$(nproc)" -ge 2 ] || { echo "needs two CPUs"; exit 2; }

# Each measure prints one line: "mean_us p50_us" (round trips) or "MB/s" (throughput).
perf_pipe() { # CPUS -> mean
  local loops
  loops=$(python3 -c "print(max(20000, int($secs * 200000)))")
  taskset -c "$1" perf bench sched pipe -l "$loops" 2>/dev/null \
    | python3 -c 'import sys,re; t=sys.stdin.read(); print(re.search(r"([\d.]+) usecs/op", t).group(1), "nan")'
}
socklab_rtt() { # ARGS... -> mean p50
  "$socklab" ipc "$@" -d "${secs}s" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["rtt_us"]; print(r["mean"], r["p50"])'
}
sockperf_rtt() { # udp|tcp SERVER_CPU CLIENT_CPU -> mean p50
  local proto=() port
  [ "$1" = tcp ] && proto=(--tcp)
  port=$(free_port)
  taskset -c "$2" sockperf sr -i 127.0.0.1 -p "$port" "${proto[@]}" >/dev/null 2>&1 &
  local srv=$!
  pids+=("$srv")
  sleep 0.5
  taskset -c "$3" sockperf pp -i 127.0.0.1 -p "$port" "${proto[@]}" -m 80 -t "$secs" --full-rtt 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' \
    | python3 -c 'import sys,re; t=sys.stdin.read(); print(re.search(r"avg-rtt=([\d.]+)", t).group(1), re.search(r"percentile 50.000 =\s*([\d.]+)", t).group(1))'
  kill "$srv" 2>/dev/null || true
  wait "$srv" 2>/dev/null || true
}
stress_pipe() { # -> MB/s
  taskset -c 0,1 stress-ng --pipe 1 --pipe-data-size 4096 -t "$secs" --metrics-brief 2>&1 \
    | python3 -c 'import sys,re; t=sys.stdin.read(); print(re.search(r"([\d.]+) MB per sec pipe write rate", t).group(1))'
}
socklab_stream() { # -> MB/s of 4096-byte messages (header included, as stress-ng counts its writes)
  "$socklab" ipc pipe --mode stream --size 4080 --pin none -d "${secs}s" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["throughput"]; print(r["msgs_per_s"] * 4096 / 1e6)'
}

# One comparison: NAME, a peer command and a socklab command (as strings), alternating.
results=()
compare() { # name peer_cmd socklab_cmd
  local name=$1 peer=$2 ours=$3 r out
  local -a peer_vals=() our_vals=()
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then
      peer_vals+=("$(eval "$peer")"); our_vals+=("$(eval "$ours")")
    else
      our_vals+=("$(eval "$ours")"); peer_vals+=("$(eval "$peer")")
    fi
  done
  out=$(python3 - "$name" "${#peer_vals[@]}" "${peer_vals[@]}" "${our_vals[@]}" <<'PY'
import sys, statistics, math
name, n = sys.argv[1], int(sys.argv[2])
vals = sys.argv[3:]
peer = [list(map(float, v.split())) for v in vals[:n]]
ours = [list(map(float, v.split())) for v in vals[n:]]
def med(rows, i):
    xs = [r[i] for r in rows if len(r) > i and not math.isnan(r[i])]
    return statistics.median(xs) if xs else float("nan")
cols = len(peer[0])
parts = []
for i, label in enumerate(["mean", "p50"][:cols] if cols > 1 else ["MB/s"]):
    p, o = med(peer, i), med(ours, i)
    if math.isnan(p):
        continue
    parts.append(f"{label}: peer {p:.2f}  socklab {o:.2f}  ratio {o / p:.3f}")
spread = [round(r[0], 2) for r in peer], [round(r[0], 2) for r in ours]
print(f"{name:<44} " + " | ".join(parts) + f"   (rounds peer {spread[0]}, socklab {spread[1]})")
PY
)
  echo "$out"
  results+=("$out")
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs, Linux $(uname -r)"
echo "$secs s per run, $rounds rounds alternating, medians; ratio = socklab / peer (round trips: below 1 is faster)"
echo
compare "pipe rtt, one CPU (perf bench sched pipe)" "perf_pipe 0" "socklab_rtt pipe --size 4 --pin same"
compare "pipe rtt, two CPUs unpinned (perf)" "perf_pipe 0,1" "socklab_rtt pipe --size 4 --pin none"
read -r cross_mean cross_p50 < <(socklab_rtt pipe --size 4 --pin cross)
printf "%-44s socklab mean %.2f µs, p50 %.2f µs (perf cannot pin its sides apart)\n" \
  "pipe rtt, CPUs 0/1 pinned apart" "$cross_mean" "$cross_p50"
compare "tcp rtt, CPUs 0/1 (sockperf --tcp -m 80)" "sockperf_rtt tcp 1 0" "socklab_rtt tcp --size 64 --pin cross"
compare "tcp rtt, one CPU (sockperf --tcp -m 80)" "sockperf_rtt tcp 0 0" "socklab_rtt tcp --size 64 --pin same"
compare "udp rtt, CPUs 0/1 (sockperf -m 80)" "sockperf_rtt udp 1 0" "socklab_rtt udp --size 64 --pin cross"
compare "udp rtt, one CPU (sockperf -m 80)" "sockperf_rtt udp 0 0" "socklab_rtt udp --size 64 --pin same"
compare "pipe stream 4096 B, CPUs 0-1 (stress-ng --pipe)" "stress_pipe" "socklab_stream"
