#!/usr/bin/env bash
# socklab serve http against its peers, side by side in one run, the same files and the
# same worker count for every server:
#  - nginx as Debian ships it, near enough (sendfile on, tcp_nopush on, access log off);
#  - nginx with its open-file cache on (open_file_cache max=10000, valid 60 s);
#  - h2o (Debian's package; access log off, file.dir);
#  - socklab with its response cache (the default) and with --cache 0 (every request opens
#    the file: socklab before the cache).
# wrk drives each at 64 and 512 connections on a 1 KiB and a 64 KiB file; every round runs
# all servers, in an order rotated from round to round; the table gives the median req/s
# over the rounds, worst p99, and socklab/peer ratios of the medians.
# Pinning: PIN=split (default on 2+ cores) runs every server on CPU 0 and wrk on CPU 1;
# PIN=none lets the scheduler place them.
# Then the 1 GiB sparse download with curl, per socklab send strategy, against nginx.
#
# usage: benches/http-vs-peers.sh [SECONDS] [ROUNDS] [MODEL] [WORKERS]   (defaults 5 3 reactors 1)
# needs: nginx, h2o, wrk, curl (nginx, wrk and curl installed with apt-get if missing;
#        h2o: apt-get install h2o), a release build of socklab.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}; rounds=${2:-3}; model=${3:-reactors}; workers=${4:-1}
source benches/lib.sh
ensure_tools nginx wrk curl
command -v h2o >/dev/null || { apt-get install -y -qq h2o >/dev/null; }
socklab=$(socklab_build)
pin=${PIN:-split}
[ "$(nproc)" -ge 2 ] || pin=none
if [ "$pin" = split ]; then srv_pin=(taskset -c 0); gen_pin=(taskset -c 1); else srv_pin=(); gen_pin=(); fi
mkdir -p "$tmp/www"
chmod 755 "$tmp/www"
head -c 1024 /dev/urandom > "$tmp/www/1k.bin"
head -c 65536 /dev/urandom > "$tmp/www/64k.bin"
truncate -s 1G "$tmp/www/1g.img"
chmod 644 "$tmp/www/"*

declare -A url
NGINX_PREFIX="${srv_pin[*]}" start_nginx "$tmp/www" "$workers"
url[nginx]="http://127.0.0.1:$nginx_port"
NGINX_PREFIX="${srv_pin[*]}" start_nginx "$tmp/www" "$workers" \
  "open_file_cache max=10000 inactive=60s; open_file_cache_valid 60s; open_file_cache_min_uses 1; open_file_cache_errors on;" nginx-ofc
url[nginx-ofc]="http://127.0.0.1:$nginx_port"

h2o_port=$(free_port)
mkdir -p "$tmp/h2o"
cat > "$tmp/h2o/h2o.conf" <<CONF
user: nobody
num-threads: $workers
listen:
  host: 127.0.0.1
  port: $h2o_port
hosts:
  default:
    paths:
      /:
        file.dir: $tmp/www
CONF
"${srv_pin[@]}" h2o -c "$tmp/h2o/h2o.conf" > "$tmp/h2o/out" 2>&1 &
pids+=($!)
url[h2o]="http://127.0.0.1:$h2o_port"

start_socklab() { # name args... -> sets url[name]
  local name=$1; shift
  "${srv_pin[@]}" "$socklab" serve http --root "$tmp/www" --model "$model" --workers "$workers" \
    --listen 127.0.0.1:0 --backlog 4096 "$@" > "$tmp/$name.addr" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 50); do [ -s "$tmp/$name.addr" ] && break; sleep 0.05; done
  url[$name]="http://$(head -1 "$tmp/$name.addr")"
}
start_socklab socklab
start_socklab socklab-nocache --cache 0
servers=(socklab socklab-nocache nginx nginx-ofc h2o)
# Every server answers before the clock starts; the files are older than a second, which
# socklab's cache asks before it keeps a file.
sleep 1.2
for s in "${servers[@]}"; do
  for f in 1k.bin 64k.bin; do
    curl -sf "${url[$s]}/$f" -o "$tmp/check" || { echo "$s does not serve /$f" >&2; cat "$tmp/h2o/"* >&2; exit 1; }
    cmp -s "$tmp/check" "$tmp/www/$f" || { echo "$s served /$f wrong" >&2; exit 1; }
  done
done

wrk_run() { # url conns -> "req/s p99_ms" ("bad" for a run with non-2xx answers); socket errors to stderr
  "${gen_pin[@]}" wrk -t 1 -c "$2" -d "${secs}s" --latency "$1" | awk -v u="$1" '
    /Socket errors/ {print u ": " $0 > "/dev/stderr"}
    /Non-2xx/ {print u ": " $0 > "/dev/stderr"; bad=1}
    /Requests\/sec/ {rps=$2}
    $1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p=v}
    END {if (bad) print "bad", p; else print rps, p}'
}
median() { python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo "socklab serve http --model $model --workers $workers; nginx $(nginx -v 2>&1 | sed 's/.*\///') and h2o $(h2o --version | head -1 | awk '{print $3}') with $workers worker(s)"
echo "wrk -t 1, ${secs}s per run, $rounds rounds, server order rotated each round; pinning: $pin$([ "$pin" = split ] && echo ' (servers on CPU 0, wrk on CPU 1)')"
for f in 1k.bin 64k.bin; do
  for conns in 64 512; do
    declare -A runs=() p99=()
    for r in $(seq 0 $((rounds - 1))); do
      n=${#servers[@]}
      for i in $(seq 0 $((n - 1))); do
        s=${servers[$(((i + r) % n))]}
        read -r rps p < <(wrk_run "${url[$s]}/$f" "$conns")
        [ "$rps" != bad ] || { echo "$s answered $f with errors" >&2; exit 1; }
        runs[$s]="${runs[$s]:-} $rps"
        p99[$s]=$(python3 -c "print(max(${p99[$s]:-0}, $p))")
      done
    done
    echo
    echo "$f, $conns connections: median req/s (worst p99 ms)"
    declare -A med=()
    for s in "${servers[@]}"; do
      # shellcheck disable=SC2086
      med[$s]=$(median ${runs[$s]})
      printf "  %-16s %10.0f  (%6.2f)   runs:%s\n" "$s" "${med[$s]}" "${p99[$s]}" "${runs[$s]}"
    done
    printf "  socklab / nginx %.3f   / nginx-ofc %.3f   / h2o %.3f   / socklab --cache 0 %.3f\n" \
      "$(python3 -c "print(${med[socklab]}/${med[nginx]})")" \
      "$(python3 -c "print(${med[socklab]}/${med[nginx-ofc]})")" \
      "$(python3 -c "print(${med[socklab]}/${med[h2o]})")" \
      "$(python3 -c "print(${med[socklab]}/${med[socklab-nocache]})")"
  done
done

[ "${BIG:-1}" = 0 ] && exit 0
echo
echo "1 GiB sparse file, curl to /dev/null (mean MB/s over $rounds downloads each, alternating)"
printf "%-9s %12s %12s %8s\n" strategy "nginx MB/s" "socklab MB/s" ratio
speed() { "${gen_pin[@]}" curl -s -o /dev/null -w '%{speed_download}' "$1" | python3 -c 'import sys; print(float(sys.stdin.read())/1e6)'; }
for strategy in sendfile mmap read; do
  start_socklab "big-$strategy" --send "$strategy"
  addr=${url[big-$strategy]}
  sleep 0.3
  sn=0; ss=0
  for r in $(seq 1 "$rounds"); do
    if [ $((r % 2)) -eq 1 ]; then a=$(speed "${url[nginx]}/1g.img"); c=$(speed "$addr/1g.img")
    else c=$(speed "$addr/1g.img"); a=$(speed "${url[nginx]}/1g.img"); fi
    sn=$(python3 -c "print($sn+$a)"); ss=$(python3 -c "print($ss+$c)")
  done
  printf "%-9s %12.0f %12.0f %8.3f\n" "$strategy" "$(python3 -c "print($sn/$rounds)")" "$(python3 -c "print($ss/$rounds)")" "$(python3 -c "print($ss/$sn)")"
done
