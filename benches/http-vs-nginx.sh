#!/usr/bin/env bash
# socklab serve http against nginx, side by side in one run: the same 1 KiB file and the
# same sparse 1 GiB file, the same worker count (nginx: sendfile on, access log off),
# alternating which server goes first.
#  - 1 KiB with wrk at 64 and 512 connections: req/s and p99, ratio socklab/nginx;
#  - the 1 GiB download with curl, per socklab send strategy: MB/s, ratio socklab/nginx.
#
# usage: benches/http-vs-nginx.sh [SECONDS] [ROUNDS] [MODEL]   (defaults 5 3 reactors)
# needs: nginx, wrk, curl (installed with apt-get if missing), a release build of socklab.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; rounds=${2:-3}; model=${3:-reactors}
workers=$(nproc)
source benches/lib.sh
ensure_tools nginx wrk curl
socklab=$(socklab_build)
mkdir -p "$tmp/www"
chmod 755 "$tmp/www"
head -c 1024 /dev/urandom > "$tmp/www/1k.bin"
truncate -s 1G "$tmp/www/1g.img"
chmod 644 "$tmp/www/"*
start_nginx "$tmp/www" "$workers"
nport=$nginx_port
start_socklab() { # strategy -> address
  "$socklab" serve http --root "$tmp/www" --model "$model" --workers "$workers" --send "$1" \
    --listen 127.0.0.1:0 --backlog 4096 > "$tmp/socklab-$1.addr" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do [ -s "$tmp/socklab-$1.addr" ] && break; sleep 0.05; done
  head -1 "$tmp/socklab-$1.addr"
}
sendfile_addr=$(start_socklab sendfile)
sleep 0.3
curl -sf "http://127.0.0.1:$nport/1k.bin" -o /dev/null
curl -sf "http://$sendfile_addr/1k.bin" -o /dev/null

wrk_run() { # url conns -> "req/s p99_ms"
  wrk -t "$workers" -c "$2" -d "${secs}s" --latency "$1" | awk '
    /Requests\/sec/ {rps=$2}
    $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p=v}
    END {print rps, p}'
}
echo "socklab serve http --model $model --workers $workers vs nginx $(nginx -v 2>&1 | sed 's/.*\///') ($workers workers); ${secs}s x $rounds rounds, alternating"
echo
echo "1 KiB file, wrk -t $workers (mean req/s, worst p99)"
printf "%6s %12s %10s %12s %10s %8s\n" conns "nginx req/s" "p99 ms" "socklab" "p99 ms" ratio
for conns in 64 512; do
  sn=0; ss=0; pn=0; ps=0
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then
      read -r a b < <(wrk_run "http://127.0.0.1:$nport/1k.bin" "$conns"); read -r c d < <(wrk_run "http://$sendfile_addr/1k.bin" "$conns")
    else
      read -r c d < <(wrk_run "http://$sendfile_addr/1k.bin" "$conns"); read -r a b < <(wrk_run "http://127.0.0.1:$nport/1k.bin" "$conns")
    fi
    sn=$(python3 -c "print($sn+$a)"); ss=$(python3 -c "print($ss+$c)")
    pn=$(python3 -c "print(max($pn,$b))"); ps=$(python3 -c "print(max($ps,$d))")
  done
  printf "%6s %12.0f %10.2f %12.0f %10.2f %8.3f\n" "$conns" "$(python3 -c "print($sn/$rounds)")" "$pn" \
    "$(python3 -c "print($ss/$rounds)")" "$ps" "$(python3 -c "print($ss/$sn)")"
done
echo
echo "1 GiB sparse file, curl to /dev/null (mean MB/s over $rounds downloads each)"
printf "%-9s %12s %12s %8s\n" strategy "nginx MB/s" "socklab MB/s" ratio
speed() { curl -s -o /dev/null -w '%{speed_download}' "$1" | python3 -c 'import sys; print(float(sys.stdin.read())/1e6)'; }
for strategy in sendfile mmap read; do
  if [ "$strategy" = sendfile ]; then addr=$sendfile_addr; else addr=$(start_socklab "$strategy"); sleep 0.3; fi
  sn=0; ss=0
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then a=$(speed "http://127.0.0.1:$nport/1g.img"); c=$(speed "http://$addr/1g.img")
    else c=$(speed "http://$addr/1g.img"); a=$(speed "http://127.0.0.1:$nport/1g.img"); fi
    sn=$(python3 -c "print($sn+$a)"); ss=$(python3 -c "print($ss+$c)")
  done
  printf "%-9s %12.0f %12.0f %8.3f\n" "$strategy" "$(python3 -c "print($sn/$rounds)")" "$(python3 -c "print($ss/$rounds)")" "$(python3 -c "print($ss/$sn)")"
done
