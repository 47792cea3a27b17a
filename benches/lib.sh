# What the benchmark scripts share; `source` it from bash. It makes $tmp (removed at exit),
# kills every pid appended to $pids at exit, and offers:
#   socklab_build            build the release binary; print its path (cargo's own report of
#                            where it is: honours CARGO_TARGET_DIR and build.target-dir)
#   ensure_tools TOOL...     install nginx/wrk/curl with apt-get if any TOOL is missing
#   free_port                print a free loopback TCP port
#   start_nginx ROOT WORKERS [DIRECTIVES] [NAME]
#                            start nginx serving ROOT on loopback, with extra http-level
#                            DIRECTIVES, in $tmp/NAME (default nginx); sets $nginx_port
# shellcheck shell=bash
tmp=$(mktemp -d)
chmod 755 "$tmp"   # nginx workers do not run as root
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

socklab_build() {
  local exe
  exe=$(cargo build --release --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "socklab" and m.get("executable"):
        print(m["executable"])')
  [ -x "$exe" ] || { echo "socklab_build: cargo named no socklab executable" >&2; return 1; }
  echo "$exe"
}

ensure_tools() {
  for t in "$@"; do
    if ! command -v "$t" >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk curl >/dev/null
      return
    fi
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_nginx() {
  local root=$1 workers=$2 extra=${3:-} name=${4:-nginx}
  local d="$tmp/$name"
  nginx_port=$(free_port)
  mkdir -p "$d/logs"
  cat > "$d/nginx.conf" <<CONF
daemon off;
worker_processes $workers;
pid $d/nginx.pid;
error_log $d/logs/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    $extra
    client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fcgi;
    uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
    server { listen 127.0.0.1:$nginx_port; root $root; }
}
CONF
  ${NGINX_PREFIX:-} nginx -c "$d/nginx.conf" -p "$d" &
  pids+=($!)
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$nginx_port/" -r 0-0 2>/dev/null && break; sleep 0.05; done
}
