#!/usr/bin/env bash
# The load generator against wrk: both drive the same nginx serving a 1 KiB file, with the
# same connections and threads, alternating, in one run. Reports each side's req/s and the
# ratio socklab/wrk (the generator must not be the bottleneck: ratio >= 0.95).
#
# usage: benches/generator-vs-wrk.sh [CONNECTIONS] [SECONDS] [ROUNDS]   (defaults 64 5 6)
# needs: nginx, wrk (installed with apt-get if missing), a release build of socklab.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-64}; secs=${2:-5}; rounds=${3:-6}
threads=$(nproc)
source benches/lib.sh
ensure_tools nginx wrk curl
socklab=$(socklab_build)
mkdir -p "$tmp/www"
chmod 755 "$tmp/www"
head -c 1024 /dev/urandom | base64 -w 0 | head -c 1024 > "$tmp/www/1k.txt"
chmod 644 "$tmp/www/1k.txt"
start_nginx "$tmp/www" "$threads"
port=$nginx_port
curl -sf "http://127.0.0.1:$port/1k.txt" -o /dev/null

echo "nginx $(nginx -v 2>&1 | sed 's/.*\///'), 1 KiB file, $conns connections, $threads threads, ${secs}s x $rounds rounds"
printf "%-6s %12s %12s %8s\n" round "wrk req/s" "socklab req/s" ratio
sum_w=0; sum_s=0
run_wrk() { wrk -t "$threads" -c "$conns" -d "${secs}s" "http://127.0.0.1:$port/1k.txt" | awk '/Requests\/sec/ {print $2}'; }
run_socklab() {
  "$socklab" bench "127.0.0.1:$port" --service http --path /1k.txt -c "$conns" -t "$threads" -d "${secs}s" --json \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["errors_total"]==0, r["errors"]; print(r["req_per_s"])'
}
for r in $(seq 1 "$rounds"); do
  # Alternate who goes first, so neither always meets a warmer (or more tired) server.
  if [ $((r % 2)) -eq 1 ]; then w=$(run_wrk); s=$(run_socklab); else s=$(run_socklab); w=$(run_wrk); fi
  printf "%-6s %12.0f %12.0f %8.3f\n" "$r" "$w" "$s" "$(python3 -c "print($s/$w)")"
  sum_w=$(python3 -c "print($sum_w+$w)"); sum_s=$(python3 -c "print($sum_s+$s)")
done
printf "%-6s %12.0f %12.0f %8.3f\n" mean "$(python3 -c "print($sum_w/$rounds)")" "$(python3 -c "print($sum_s/$rounds)")" "$(python3 -c "print($sum_s/$sum_w)")"
