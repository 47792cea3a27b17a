#!/usr/bin/env bash
# Syscalls per request for one model, counted by the kernel's syscall tracepoints (perf
# stat), which unlike timings do not depend on what else the machine does. The load is
# `socklab bench` with CONNECTIONS connections for 2 seconds: 64-byte reverse requests, or
# with SERVICE=http keep-alive GETs of a 1 KiB file (SIZE bytes if set; STRATEGY picks --send).
# usage: [SERVICE=http] benches/syscalls-per-request.sh CONNECTIONS MODEL [serve options...]
# needs: perf (Debian: linux-perf); the release binary is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
c=$1; m=$2; shift 2
service=${SERVICE:-reverse}
source benches/lib.sh
socklab=$(socklab_build)
if [ "$service" = http ]; then
  mkdir -p "$tmp/www"; head -c "${SIZE:-1024}" /dev/urandom > "$tmp/www/f.bin"
  sleep 1.1   # as a served site's files are: settled (the response cache takes them then)
  serve=(http --root "$tmp/www" --send "${STRATEGY:-sendfile}")
  load=(--service http --path /f.bin)
else
  serve=(reverse); load=()
fi
"$socklab" serve "${serve[@]}" --model "$m" --listen 127.0.0.1:0 --workers 1 "$@" > "$tmp/addr" 2>/dev/null & pid=$!
sleep 0.3; a=$(head -1 "$tmp/addr")
events=recvfrom,writev,sendmsg,sendto,sendfile64,openat2,statx,newfstatat,close,pread64,epoll_wait,poll,epoll_ctl,futex,select,pselect6,io_uring_enter
perf stat -x, -o "$tmp/perf" -e "$(echo "$events" | sed 's/\([a-z_0-9]*\)/syscalls:sys_enter_\1/g')" -p $pid & spid=$!
sleep 0.3
out=$("$socklab" bench "$a" "${load[@]}" -c "$c" -t 1 -d 2s --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["requests"], "requests in 2 s:", round(r["req_per_s"]), "req/s, p50", r["latency_us"]["p50"], "us")')
kill -INT $spid; wait $spid 2>/dev/null || true
kill -TERM $pid; wait $pid || true
n=$(echo "$out" | awk '{print $1}')
printf "%-8s %-7s %-16s %s\n   " "$m" "$service" "$*" "$out"
awk -F, -v n=$n '$1 ~ /^[0-9]+$/ && $1 > 0 {split($3,a,"sys_enter_"); printf " %s %.2f", a[2], $1/n; t += $1} END {printf "  (total %.2f)\n", t/n}' "$tmp/perf"
