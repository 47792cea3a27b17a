#!/usr/bin/env bash
# Syscalls per 64-byte reverse request for one model, counted by the kernel's syscall
# tracepoints (perf stat), which unlike timings do not depend on what else the machine does.
# The load is `socklab bench` with CONNECTIONS connections for 2 seconds.
# usage: benches/syscalls-per-request.sh CONNECTIONS MODEL [serve options...]
# needs: perf (Debian: linux-perf); the release binary is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
c=$1; m=$2; shift 2
source benches/lib.sh
socklab=$(socklab_build)
"$socklab" serve reverse --model $m --listen 127.0.0.1:0 --workers 1 "$@" > "$tmp/addr" 2>/dev/null & pid=$!
sleep 0.3; a=$(head -1 "$tmp/addr")
perf stat -x, -o "$tmp/perf" -e 'syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_poll,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_futex,syscalls:sys_enter_select,syscalls:sys_enter_pselect6,syscalls:sys_enter_io_uring_enter' -p $pid & spid=$!
sleep 0.3
out=$("$socklab" bench "$a" -c "$c" -t 1 -d 2s --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["requests"], "requests in 2 s:", round(r["req_per_s"]), "req/s, p50", r["latency_us"]["p50"], "us")')
kill -INT $spid; wait $spid 2>/dev/null || true
kill -TERM $pid; wait $pid || true
n=$(echo "$out" | awk '{print $1}')
printf "%-8s %-16s %s\n   " "$m" "$*" "$out"
awk -F, -v n=$n '$1 ~ /^[0-9]+$/ {split($3,a,"sys_enter_"); printf " %s %.2f", a[2], $1/n} END {print ""}' "$tmp/perf"
