#!/usr/bin/env bash
# What N idle connections cost each server design: every model serves reverse on loopback,
# a client opens N connections, makes one request on each (so each has a live session) and
# leaves them open; then the server's process tree is measured: processes, threads, open
# descriptors, and memory as PSS (proportional set size: shared pages divided among the
# processes sharing them, so forked children are not counted N times).
#
#   benches/idle-cost.sh [N] [MODEL...]      # default: 2000, every model
#
# Numbers for docs/security.md ("how each model degrades at its limits").
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh

n=${1:-2000}
shift || true
models=("$@")
[ "${#models[@]}" -gt 0 ] || models=(iterative fork prefork thread pool poll epoll reactors tokio)
socklab=$(socklab_build)
bin=$socklab
ulimit -n "$(ulimit -Hn)"

# processes, threads, descriptors and PSS (KiB) of a process and its descendants
measure() {
  python3 - "$1" <<'PY'
import os, sys
def kids(p):
    out = []
    try:
        for t in os.listdir(f"/proc/{p}/task"):
            with open(f"/proc/{p}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out
todo, procs, threads, fds, pss = [int(sys.argv[1])], 0, 0, 0, 0
while todo:
    p = todo.pop()
    try:
        t = len(os.listdir(f"/proc/{p}/task"))
        d = len(os.listdir(f"/proc/{p}/fd"))
        with open(f"/proc/{p}/smaps_rollup") as f:
            k = sum(int(l.split()[1]) for l in f if l.startswith("Pss:"))
    except OSError:
        continue  # gone meanwhile
    procs, threads, fds, pss = procs + 1, threads + t, fds + d, pss + k
    todo += kids(p)
print(procs, threads, fds, pss)
PY
}

printf '%-10s %7s %9s %8s %8s %10s %12s\n' model conns served procs threads fds "PSS MiB"
for m in "${models[@]}"; do
  "$bin" serve reverse --model "$m" --listen 127.0.0.1:0 --workers 2 --backlog $((n + 64)) >"$tmp/addr" 2>"$tmp/err" &
  pid=$!
  pids+=("$pid")
  while [ ! -s "$tmp/addr" ]; do sleep 0.05; done
  addr=$(head -1 "$tmp/addr")
  # Iterative and prefork serve one client per worker: the rest wait in the backlog, which
  # is what they cost (nothing), so they are measured with N connections all the same (the
  # backlog is made big enough to hold them: past it, connect would block).
  python3 - "$addr" "$n" >"$tmp/client.out" <<'PY' &
import socket, sys, time, struct
host, port = sys.argv[1].rsplit(":", 1); n = int(sys.argv[2])
conns, served = [], 0
for i in range(n):
    s = socket.create_connection((host, int(port)))
    s.settimeout(0.02)
    s.sendall(struct.pack(">I", 2) + b"ab")
    try:
        if s.recv(2) == b"ba": served += 1
    except socket.timeout:
        pass
    conns.append(s)
print(served, flush=True)
time.sleep(30)
PY
  client=$!
  while [ ! -s "$tmp/client.out" ]; do sleep 0.1; done
  sleep 1
  read -r procs threads fds pss < <(measure "$pid")
  printf '%-10s %7s %9s %8s %8s %10s %12s\n' "$m" "$n" "$(cat "$tmp/client.out")" "$procs" "$threads" "$fds" "$((pss / 1024))"
  kill "$client" 2>/dev/null || true
  wait "$client" 2>/dev/null || true
  kill -TERM "$pid"
  wait "$pid" || true
  : >"$tmp/addr"
  : >"$tmp/client.out"
done
