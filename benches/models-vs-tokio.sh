#!/usr/bin/env bash
# socklab's own event loops against the tokio reference model, side by side in one run:
# select, epoll, reactors and uring vs tokio, on echo and reverse, 64-byte and 16 KiB
# payloads, 64 and 1024 connections. Each server gets the same worker count; each cell runs
# ROUNDS rounds, the order of the models rotating every round, and reports per model the
# median req/s and median p99 of its rounds, the ratio of medians model/tokio, and for
# uring also uring/reactors. A cell with errors (select at 1024 connections: descriptors
# past FD_SETSIZE are refused) is marked and left out of the ratios.
#
# usage: benches/models-vs-tokio.sh [SECONDS] [ROUNDS]   (defaults 3 3)
#   MODELS="uring reactors tokio"  only these models (tokio is always added)
#   PIN=split   pin each server to CPU 0 with 1 worker and the generator to CPU 1 with 1
#               thread (taskset); default: no pinning, servers with $(nproc) workers and the
#               generator with $(nproc) threads share every core.
# needs: a release build of socklab (built here); taskset (util-linux) for PIN=split.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}; rounds=${2:-3}
models=${MODELS:-"select epoll reactors uring tokio"}
[[ " $models " == *" tokio "* ]] || models="$models tokio"
source benches/lib.sh
socklab=$(socklab_build)

if [ "${PIN:-}" = split ]; then
  workers=1; threads=1; serve_pin=(taskset -c 0); gen_pin=(taskset -c 1)
  pinning="servers pinned to CPU 0 (1 worker), generator to CPU 1 (1 thread)"
else
  workers=$(nproc); threads=$(nproc); serve_pin=(); gen_pin=()
  pinning="no pinning: servers ($workers workers) and generator ($threads threads) share $(nproc) cores"
fi

start() { # service model -> address
  "${serve_pin[@]}" "$socklab" serve "$1" --model "$2" --workers "$workers" \
    --listen 127.0.0.1:0 --backlog 4096 > "$tmp/$1-$2.addr" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do [ -s "$tmp/$1-$2.addr" ] && break; sleep 0.05; done
  head -1 "$tmp/$1-$2.addr"
}
measure() { # addr service size conns -> "req/s p99_us errors"
  "${gen_pin[@]}" "$socklab" bench "$1" --service "$2" -s "$3" -c "$4" -d "${secs}s" \
    --threads "$threads" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["req_per_s"], r["latency_us"]["p99"], r["errors_total"])'
}

echo "${secs}s per run, $rounds rounds, model order rotating per round; $pinning"
results=$tmp/results.tsv
for service in echo reverse; do
  declare -A addr=()
  for m in $models; do addr[$m]=$(start "$service" "$m"); done
  for size in 64 16384; do
    for conns in 64 1024; do
      read -r -a order <<< "$models"
      for r in $(seq 1 "$rounds"); do
        for m in "${order[@]}"; do
          read -r rps p errs < <(measure "${addr[$m]}" "$service" "$size" "$conns")
          printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$service" "$size" "$conns" "$m" "$r" "$rps" "$p" "$errs" >> "$results"
        done
        order=("${order[@]:1}" "${order[0]}")   # rotate: each model takes each slot in turn
      done
    done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pids=()
  sleep 0.5
done

python3 - "$results" "$models" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    service, size, conns, model, _r, rps, p99, errs = line.split("\t")
    rows[(service, int(size), int(conns), model)].append((float(rps), float(p99), int(errs)))
models = sys.argv[2].split()
print(f"{'service':8} {'size':>6} {'conns':>6}  {'model':9} {'req/s':>10} {'p99 us':>9} {'/tokio':>7} {'/reactors':>9}  rounds req/s")
for key in sorted({k[:3] for k in rows}):
    med = {}
    for m in models:
        runs = rows[key + (m,)]
        rps = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        errs = sum(r[2] for r in runs)
        med[m] = (rps, p99, errs)
    for m in models:
        rps, p99, errs = med[m]
        def ratio(base):
            if base not in med or errs or med[base][2]:
                return "-"
            return f"{rps / med[base][0]:.3f}"
        mark = f"  ({errs} errors)" if errs else ""
        per_round = " ".join(f"{r[0]:.0f}" for r in rows[key + (m,)])
        vs_reactors = ratio("reactors") if m == "uring" else ""
        print(f"{key[0]:8} {key[1]:>6} {key[2]:>6}  {m:9} {rps:>10.0f} {p99:>9.0f} {ratio('tokio'):>7} {vs_reactors:>9}  {per_round}{mark}")
PY
