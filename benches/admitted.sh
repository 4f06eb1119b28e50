#!/usr/bin/env bash
# Admitted path: requests per second and p99 latency through vestibule, through nginx
# proxy_pass, and to the upstream direct — one worker each, measured alternately in one run.
#
#   bash benches/admitted.sh            # 3 rounds of 10 s per target
#   ROUNDS=5 DURATION=20s CONNECTIONS=128 bash benches/admitted.sh
#   BEFORE=/path/to/old/vestibule bash benches/admitted.sh   # and another build, side by side
#   BEFORE=target/release/vestibule BEFORE_SERVER="fast_lane = false" bash benches/admitted.sh
#                                       # the same build with hyper serving every request
#   TLS=1 bash benches/admitted.sh      # HTTPS on both proxies' listeners, the same certificate
#   WORKERS=2 bash benches/admitted.sh  # two workers each, nothing pinned (two cores here)
#
# Installs nginx and wrk from apt when missing. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
UPSTREAM_PORT=${UPSTREAM_PORT:-18080}
NGINX_PORT=${NGINX_PORT:-18081}
VESTIBULE_PORT=${VESTIBULE_PORT:-18082}
BEFORE_PORT=${BEFORE_PORT:-18083}
BEFORE=${BEFORE:-}
BEFORE_SERVER=${BEFORE_SERVER:-}
TLS=${TLS:-}
WORKERS=${WORKERS:-1}
scheme=http; [ -n "$TLS" ] && scheme=https

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  echo "installing nginx and wrk from apt..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi

source tests/lib.sh
if [ -n "${VESTIBULE:-}" ]; then bin=$VESTIBULE; else cargo build --release --quiet; bin=target/release/vestibule; fi
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# Pin the proxies to one core and the load generator and upstream to the other, so the two
# proxies compete with the same neighbours.
pin_proxy=(); pin_rest=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ] && [ "$WORKERS" = 1 ]; then
  pin_proxy=(taskset -c 1); pin_rest=(taskset -c 0)
fi

wait_port() {
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; exit 1
}

"${pin_rest[@]}" "$bin" shop --listen "127.0.0.1:$UPSTREAM_PORT" --workers 1 >/dev/null &
pids+=($!); shop_pid=$!

"$bin" keygen > "$work/key.pem"
tls_line=""
if [ -n "$TLS" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=IP:127.0.0.1 -keyout "$work/tls-key.pem" -out "$work/tls-cert.pem" 2>/dev/null
  tls_line="tls = { cert = \"tls-cert.pem\", key = \"tls-key.pem\" }"
fi
cat > "$work/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$VESTIBULE_PORT"
workers = $WORKERS
$tls_line
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 600
max_active = 500
# Paused: nobody gets in without a token, so every measured request is a token check.
state = "paused"
[log]
level = "warn"
TOML
"${pin_proxy[@]}" "$bin" run --config "$work/proxy.toml" &
pids+=($!); vestibule_pid=$!
token=$("$bin" token --config "$work/proxy.toml" --room checkout --ttl 3600)
targets=(direct nginx vestibule)
if [ -n "$BEFORE" ]; then
  sed "s/127.0.0.1:$VESTIBULE_PORT/127.0.0.1:$BEFORE_PORT/" "$work/proxy.toml" > "$work/before.toml"
  # BEFORE_SERVER: more [server] settings for it (as `fast_lane = false`).
  [ -z "$BEFORE_SERVER" ] || sed -i "s/^\[server\]$/[server]\n$BEFORE_SERVER/" "$work/before.toml"
  "${pin_proxy[@]}" "$BEFORE" run --config "$work/before.toml" &
  pids+=($!); before_pid=$!
  targets+=(before)
fi

write_nginx_proxy "$work/nginx.conf" "$NGINX_PORT" "127.0.0.1:$UPSTREAM_PORT" "$work"
sed -i "s/^worker_processes 1;/worker_processes $WORKERS;/" "$work/nginx.conf"
if [ -n "$TLS" ]; then
  # The same certificate, HTTP/1.1 as wrk speaks, session resumption as nginx's default.
  sed -i "s|listen 127.0.0.1:$NGINX_PORT;|listen 127.0.0.1:$NGINX_PORT ssl; ssl_certificate $work/tls-cert.pem; ssl_certificate_key $work/tls-key.pem;|" \
    "$work/nginx.conf"
fi
"${pin_proxy[@]}" nginx -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!); nginx_pid=$!

for port in $UPSTREAM_PORT $VESTIBULE_PORT $NGINX_PORT ${BEFORE:+$BEFORE_PORT}; do wait_port "$port"; done
curl -kfsS -H "Vestibule-Token: $token" "$scheme://127.0.0.1:$VESTIBULE_PORT/checkout/ping" >/dev/null \
  || { echo "vestibule did not admit the benchmark token" >&2; exit 1; }
if curl -kfsS -H "Accept: application/json" "$scheme://127.0.0.1:$VESTIBULE_PORT/checkout/ping" >/dev/null 2>&1; then
  echo "vestibule let a request without a token through" >&2; exit 1
fi

# CPU time (user + system, clock ticks) the processes named (comma-separated pids) have used.
cpu_ticks() { for pid in ${1//,/ }; do cat "/proc/$pid/stat"; done | awk '{ t += $14 + $15 } END { print t }'; }
ticks_per_second=$(getconf CLK_TCK)

# One wrk run against a port, whose serving processes are $2, by scheme $3: prints "<requests per second>
# <p99 in ms> <CPU microseconds per request>". CPU per request is steadier than requests per
# second on a busy machine: it does not depend on how much of a core the proxy got.
measure() {
  local before after output
  before=$(cpu_ticks "$2")
  output=$("${pin_rest[@]}" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Vestibule-Token: $token" \
    "$3://127.0.0.1:$1/checkout/ping")
  after=$(cpu_ticks "$2")
  echo "$output" | awk -v before="$before" -v after="$after" -v hz="$ticks_per_second" '
      / requests in / { requests = $1 }
      /Requests\/sec:/ { rps = $2 }
      /^ +99%/ { v = $2; unit = v; sub(/[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v);
                 ms = (unit == "us") ? v / 1000 : (unit == "s") ? v * 1000 : v }
      /Non-2xx/ { bad = $NF }
      END { if (bad > 0) { print "errors", bad > "/dev/stderr"; exit 1 }
            printf "%s %.3f %.1f\n", rps, ms, (after - before) / hz * 1e6 / requests }'
}

# nginx serves from its worker processes, the master's children.
nginx_worker=$(pgrep -P "$nginx_pid" | paste -sd, -)
declare -A rps p99 cpu
for target in "${targets[@]}"; do rps[$target]=""; p99[$target]=""; cpu[$target]=""; done
for round in $(seq "$ROUNDS"); do
  for target in "${targets[@]}"; do
    case $target in
      direct) port=$UPSTREAM_PORT pid=$shop_pid ;;
      nginx) port=$NGINX_PORT pid=$nginx_worker ;;
      vestibule) port=$VESTIBULE_PORT pid=$vestibule_pid ;;
      before) port=$BEFORE_PORT pid=$before_pid ;;
    esac
    over=$scheme; [ "$target" = direct ] && over=http
    read -r r p c < <(measure "$port" "$pid" "$over")
    echo "round $round  $target: $r req/s, p99 $p ms, $c µs CPU per request"
    rps[$target]+="$r "; p99[$target]+="$p "; cpu[$target]+="$c "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
echo
echo "median of $ROUNDS rounds, $DURATION each, $CONNECTIONS connections, $WORKERS worker(s) per proxy${TLS:+, HTTPS to both proxies (the upstream direct over HTTP)}:"
printf '| %-10s | %12s | %9s | %14s | %14s | %12s | %12s |\n' target "req/s" "p99 ms" "req/s vs nginx" \
  "p99 vs nginx" "CPU µs/req" "CPU vs nginx"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ------------ -------------- ----------- ---------------- ---------------- \
  -------------- --------------
nginx_rps=$(echo "${rps[nginx]}" | median); nginx_p99=$(echo "${p99[nginx]}" | median)
nginx_cpu=$(echo "${cpu[nginx]}" | median)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
for target in "${targets[@]}"; do
  r=$(echo "${rps[$target]}" | median); p=$(echo "${p99[$target]}" | median); c=$(echo "${cpu[$target]}" | median)
  printf '| %-10s | %12.0f | %9.3f | %14s | %14s | %12.1f | %12s |\n' "$target" "$r" "$p" \
    "$(ratio "$r" "$nginx_rps")" "$(ratio "$p" "$nginx_p99")" "$c" "$(ratio "$c" "$nginx_cpu")"
done
