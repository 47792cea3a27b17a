#!/usr/bin/env bash
# The cost of TLS and of ACL checks on bus throughput: socklab bus serve vs Debian's
# mosquitto with the same settings, driven by `socklab bus bench` in one run, alternating
# rounds. Cell: QoS 0, 64 B payload, one publisher fanned out to 100 subscribers (1->100).
# Settings: plain; password file + ACL (the bench logs in as a user whose rules allow
# bench/#, among 50 other users' rules and a deny rule); TLS; TLS + password file + ACL.
# Reported: delivered messages/s (median of the rounds), each setting's throughput
# relative to the same broker's plain one, and socklab/mosquitto per setting.
#
# Pinning: both brokers on CPU 0 (socklab with one loop, as mosquitto has one thread), the
# load generator on CPU 1. Certificates are made with the openssl CLI, mosquitto's password
# file with mosquitto_passwd, socklab's with `socklab bus passwd`.
#
#   benches/bus-auth-cost.sh            # 3 rounds of 5 s per cell
#   ROUNDS=1 SECS=3 benches/bus-auth-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
command -v mosquitto >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; }
command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
socklab=$(socklab_build)
bin=$socklab
rounds=${ROUNDS:-3}
secs=${SECS:-5}

# A CA and a server certificate for 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=bench CA" -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$tmp/server.key" -out "$tmp/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -CAcreateserial \
  -days 2 -extfile "$tmp/ext" -out "$tmp/server.pem" 2>/dev/null
chmod 644 "$tmp"/*.key   # mosquitto drops to its own user

# The ACL both brokers read (mosquitto's syntax), and the password files.
{
  for i in $(seq 50); do printf 'user user%d\ntopic readwrite users/%d/#\n\n' "$i" "$i"; done
  printf 'user bench\ntopic readwrite bench/#\ntopic deny bench/secret\n\n'
  printf 'pattern read status/%%u\n'
} > "$tmp/acl"
echo benchpw | "$bin" bus passwd "$tmp/socklab.passwd" bench
: > "$tmp/mosquitto.passwd"
mosquitto_passwd -b "$tmp/mosquitto.passwd" bench benchpw
chmod 644 "$tmp/mosquitto.passwd" "$tmp/acl"

# Two of each broker: plain + TLS listeners without checks, and plain + TLS with them.
ports() { echo "$(free_port) $(free_port)"; }
start_mosquitto() { # NAME PLAIN TLS AUTH
  local conf=$tmp/$1.conf
  {
    echo "per_listener_settings false"
    echo "listener $2 127.0.0.1"
    echo "listener $3 127.0.0.1"
    echo "certfile $tmp/server.pem"
    echo "keyfile $tmp/server.key"
    echo "max_connections -1"
    if [ "$4" = auth ]; then
      echo "allow_anonymous false"
      echo "password_file $tmp/mosquitto.passwd"
      echo "acl_file $tmp/acl"
    else
      echo "allow_anonymous true"
    fi
  } > "$conf"
  taskset -c 0 mosquitto -c "$conf" >"$tmp/$1.log" 2>&1 &
  pids+=($!)
}
start_socklab() { # NAME AUTH -> prints "PLAIN TLS"
  local extra=()
  [ "$2" = auth ] && extra=(--passwords "$tmp/socklab.passwd" --acl "$tmp/acl")
  taskset -c 0 "$bin" bus serve --workers 1 --listen 127.0.0.1:0 --tls-listen 127.0.0.1:0 \
    --tls-cert "$tmp/server.pem" --tls-key "$tmp/server.key" "${extra[@]}" \
    >"$tmp/$1.addr" 2>"$tmp/$1.log" &
  pids+=($!)
  for _ in $(seq 100); do [ "$(wc -l < "$tmp/$1.addr")" -ge 2 ] && break; sleep 0.05; done
}
read -r mp0 mt0 <<< "$(ports)"; read -r mp1 mt1 <<< "$(ports)"
start_mosquitto mosq-open "$mp0" "$mt0" open
start_mosquitto mosq-auth "$mp1" "$mt1" auth
start_socklab sock-open open
start_socklab sock-auth auth
sleep 0.5
s_open=($(cat "$tmp/sock-open.addr")); s_auth=($(cat "$tmp/sock-auth.addr"))

# setting -> "ADDRESS|bench flags" per broker
declare -A addr=(
  [socklab-plain]="${s_open[0]}|"
  [socklab-acl]="${s_auth[0]}|-u bench -P benchpw"
  [socklab-tls]="${s_open[1]}|--cafile $tmp/ca.pem"
  [socklab-tls+acl]="${s_auth[1]}|--cafile $tmp/ca.pem -u bench -P benchpw"
  [mosquitto-plain]="127.0.0.1:$mp0|"
  [mosquitto-acl]="127.0.0.1:$mp1|-u bench -P benchpw"
  [mosquitto-tls]="127.0.0.1:$mt0|--cafile $tmp/ca.pem"
  [mosquitto-tls+acl]="127.0.0.1:$mt1|--cafile $tmp/ca.pem -u bench -P benchpw"
)
settings=(plain acl tls tls+acl)
echo "# $(date -u +%F) rounds=$rounds secs=$secs QoS 0, 64 B, 1->100; brokers on CPU 0, bench on CPU 1" | tee "$tmp/results.txt"
for round in $(seq "$rounds"); do
  for s in "${settings[@]}"; do
    if [ $((round % 2)) -eq 1 ]; then order="socklab mosquitto"; else order="mosquitto socklab"; fi
    for who in $order; do
      entry=${addr[$who-$s]}
      # shellcheck disable=SC2086
      json=$(taskset -c 1 "$bin" bus bench "${entry%%|*}" --scenario fanout -n 100 -q 0 \
        --size 64 -d "${secs}s" --json ${entry#*|})
      echo "$s $who $json" >> "$tmp/results.txt"
    done
  done
done

python3 - "$tmp/results.txt" <<'PY'
import json, sys, statistics
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("#"): print(line.strip()); continue
    s, who, js = line.split(" ", 2)
    r = json.loads(js)
    rows.setdefault(s, {}).setdefault(who, []).append(r)
med = {s: {w: statistics.median(x["delivered_per_sec"] for x in v) for w, v in d.items()} for s, d in rows.items()}
lost = {s: {w: sum(x["lost"] for x in v) for w, v in d.items()} for s, d in rows.items()}
print(f"{'setting':<9} {'socklab msg/s':>14} {'vs plain':>9} {'mosquitto msg/s':>16} {'vs plain':>9} {'socklab/mosq':>13} {'lost s/m':>9}")
for s in med:
    sm, mm = med[s]["socklab"], med[s]["mosquitto"]
    print(f"{s:<9} {sm:>14.0f} {sm/med['plain']['socklab']:>9.2f} {mm:>16.0f} {mm/med['plain']['mosquitto']:>9.2f} {sm/mm:>13.2f} {lost[s]['socklab']:>4}/{lost[s]['mosquitto']:<4}")
PY
