#!/usr/bin/env bash
# socklab's own event loops against the tokio reference model, side by side in one run:
# epoll and reactors vs tokio, on echo and reverse, 64-byte and 16 KiB payloads, 64 and
# 1024 connections. Each server gets the same worker count; each cell alternates the models
# over ROUNDS rounds and reports mean req/s, p99, and the ratio model/tokio.
#
# usage: benches/models-vs-tokio.sh [SECONDS] [ROUNDS]   (defaults 3 2)
# needs: a release build of socklab (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-3}; rounds=${2:-2}
workers=$(nproc)
source benches/lib.sh
socklab=$(socklab_build)

start() { # service model -> address
  "$socklab" serve "$1" --model "$2" --workers "$workers" --listen 127.0.0.1:0 --backlog 4096 \
    > "$tmp/$1-$2.addr" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do [ -s "$tmp/$1-$2.addr" ] && break; sleep 0.05; done
  head -1 "$tmp/$1-$2.addr"
}
measure() { # addr service size conns -> "req/s p99_us"
  "$socklab" bench "$1" --service "$2" -s "$3" -c "$4" -d "${secs}s" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["errors_total"]==0, r["errors"]; print(r["req_per_s"], r["latency_us"]["p99"])'
}

echo "workers $workers per server, ${secs}s per run, $rounds rounds, generator threads $(nproc) (generator and servers share $(nproc) cores)"
printf "%-8s %6s %6s  %-9s %11s %9s %7s\n" service size conns model "req/s" "p99 us" "ratio"
for service in echo reverse; do
  declare -A addr
  for m in epoll reactors tokio; do addr[$m]=$(start "$service" "$m"); done
  for size in 64 16384; do
    for conns in 64 1024; do
      declare -A sum=() p99=()
      for r in $(seq 1 "$rounds"); do
        order="epoll reactors tokio"; [ $((r % 2)) -eq 0 ] && order="tokio reactors epoll"
        for m in $order; do
          read -r rps p < <(measure "${addr[$m]}" "$service" "$size" "$conns")
          sum[$m]=$(python3 -c "print(${sum[$m]:-0}+$rps)")
          p99[$m]=$(python3 -c "print(max(${p99[$m]:-0},$p))")
        done
      done
      for m in epoll reactors tokio; do
        printf "%-8s %6s %6s  %-9s %11.0f %9.0f %7.3f\n" "$service" "$size" "$conns" "$m" \
          "$(python3 -c "print(${sum[$m]}/$rounds)")" "${p99[$m]}" "$(python3 -c "print(${sum[$m]}/${sum[tokio]})")"
      done
    done
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pids=()
  sleep 0.5
done
