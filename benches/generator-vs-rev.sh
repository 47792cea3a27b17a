#!/usr/bin/env bash
# The load generator against itself at another git revision: both drive the same socklab
# server (reverse, epoll, 1 worker), alternating which goes first, in one run. Reports each
# side's req/s per round, the medians, and the ratio (this tree / REV). For a change to the
# generator's loop: it must not make the generator the bottleneck.
#
# usage: benches/generator-vs-rev.sh REV [CONNECTIONS] [SECONDS] [ROUNDS]   (defaults 64 3 6)
# needs: git, a Rust toolchain (REV is built in a temporary directory). No CPU pinning: the
# generator and the server share the machine's cores, as in docs/bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$1; conns=${2:-64}; secs=${3:-3}; rounds=${4:-6}
source benches/lib.sh
socklab=$(socklab_build)
mkdir -p "$tmp/old"
git archive "$rev" | tar -x -C "$tmp/old"
(cd "$tmp/old" && CARGO_TARGET_DIR="$tmp/old-build" cargo build --release -q)
old="$tmp/old-build/release/socklab"
"$socklab" serve reverse --model epoll --workers 1 --listen 127.0.0.1:0 --backlog 4096 > "$tmp/addr" 2>/dev/null &
pids+=($!)
for _ in $(seq 50); do [ -s "$tmp/addr" ] && break; sleep 0.05; done
addr=$(head -1 "$tmp/addr")
run() { "$1" bench "$addr" -c "$conns" -d "${secs}s" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["req_per_s"])'; }
echo "reverse 64 B against socklab serve --model epoll --workers 1; $conns connections, ${secs}s x $rounds rounds, alternating; $(nproc) cores, no pinning"
printf "%-6s %14s %14s\n" round "$rev req/s" "this req/s"
news=(); olds=()
for r in $(seq 1 "$rounds"); do
  if [ $((r % 2)) -eq 1 ]; then o=$(run "$old"); n=$(run "$socklab"); else n=$(run "$socklab"); o=$(run "$old"); fi
  printf "%-6s %14.0f %14.0f\n" "$r" "$o" "$n"
  olds+=("$o"); news+=("$n")
done
python3 - "${olds[*]}" "${news[*]}" <<'PY'
import statistics, sys
o = [float(x) for x in sys.argv[1].split()]; n = [float(x) for x in sys.argv[2].split()]
mo, mn = statistics.median(o), statistics.median(n)
print(f"median {mo:14.0f} {mn:14.0f}   ratio this/rev = {mn/mo:.3f}")
PY
