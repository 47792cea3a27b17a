#!/usr/bin/env bash
# Syscalls per request for one model, counted by the kernel's syscall tracepoints (perf
# stat), which unlike timings do not depend on what else the machine does. The load is
# `socklab bench` with CONNECTIONS connections for 2 seconds: 64-byte reverse requests, or
# with SERVICE=http keep-alive GETs of a 1 KiB file (SIZE bytes if set; STRATEGY picks --send).
# With PIPELINE=N, a python client writes N requests at once on each connection instead.
# usage: [SERVICE=http] [PIPELINE=N] benches/syscalls-per-request.sh CONNECTIONS MODEL [serve options...]
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
if [ -n "${PIPELINE:-}" ]; then
  # PIPELINE=N: CONNECTIONS connections each write N requests at once, read the N answers,
  # for 2 seconds (python, so only the server's counts mean anything).
  out=$(python3 - "$a" "$service" "$PIPELINE" "$c" <<'PY'
import socket, struct, sys, time
host, port = sys.argv[1].rsplit(":", 1); service = sys.argv[2]; n = int(sys.argv[3]); conns = int(sys.argv[4])
if service == "http":
    one = b"GET /f.bin HTTP/1.1\r\nHost: x\r\n\r\n"
else:
    one = struct.pack(">I", 64) + bytes(range(64))
socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(conns)]
done = 0; end = time.time() + 2
while time.time() < end:
    for s in socks: s.sendall(one * n)
    for s in socks:
        buf = b""; want = n
        while True:
            got = s.recv(1 << 20)
            if not got: sys.exit("server closed")
            buf += got
            if service == "http":
                # every answer is a head and a 1 KiB body: done when the last body is here
                if buf.count(b"HTTP/1.1 200") == want and buf.endswith(b"") and len(buf) >= want * (buf.index(b"\r\n\r\n") + 4 + 1024): break
            elif len(buf) >= 64 * want: break   # reverse answers carry no length prefix
    done += n * conns
print(done, "requests in 2 s, pipelined by", n)
PY
)
else
out=$("$socklab" bench "$a" "${load[@]}" -c "$c" -t 1 -d 2s --json \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["requests"], "requests in 2 s:", round(r["req_per_s"]), "req/s, p50", r["latency_us"]["p50"], "us")')
fi
kill -INT $spid; wait $spid 2>/dev/null || true
kill -TERM $pid; wait $pid || true
n=$(echo "$out" | awk '{print $1}')
printf "%-8s %-7s %-16s %s\n   " "$m" "$service" "$*" "$out"
awk -F, -v n=$n '$1 ~ /^[0-9]+$/ && $1 > 0 {split($3,a,"sys_enter_"); printf " %s %.2f", a[2], $1/n; t += $1} END {printf "  (total %.2f)\n", t/n}' "$tmp/perf"
