#!/usr/bin/env bash
# System calls per admitted request, vestibule against nginx proxy_pass, under the same load:
# each proxy (one worker) is traced with `strace -c` while wrk sends requests with a valid
# token through 64 keep-alive connections; calls are divided by the requests wrk completed.
#
#   bash benches/syscalls.sh                 # 4 s of load each
#   DURATION=10s bash benches/syscalls.sh
#
# strace slows both proxies down a lot: only the counts mean something here, not the rates.
# Installs nginx, wrk and strace from apt when missing. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-64}
missing=()
for tool in nginx wrk strace; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from apt..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk strace >/dev/null
fi
source tests/lib.sh
release_setup
start_shop 1
"$bin" keygen > "$dir/key.pem"
cat > "$dir/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:0"
workers = 1
[upstream]
url = "http://$shop"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 600
max_active = 500
state = "paused"
[log]
format = "json"
level = "warn,vestibule=info"
TOML
start_vestibule "$dir/proxy.toml" "$dir/vestibule.log"
vestibule_addr=$addr vestibule_pid=${pids[-1]}
token=$("$bin" token --config "$dir/proxy.toml" --room checkout --ttl 3600)

nginx_port=$(free_port)
write_nginx_proxy "$dir/nginx.conf" "$nginx_port" "$shop" "$dir"
nginx -c "$dir/nginx.conf" -g 'daemon off;' &
pids+=($!); nginx_pid=$!
for _ in $(seq 100); do nginx_worker=$(pgrep -P "$nginx_pid" | head -1 || true); [ -n "$nginx_worker" ] && break; sleep 0.1; done
until (exec 3<>"/dev/tcp/127.0.0.1/$nginx_port") 2>/dev/null; do sleep 0.1; done

# Trace process $1 while wrk loads $2; leaves "<syscall> <calls per request>" lines in $3.
trace() {
  local pid=$1 url=$2 out=$3
  strace -c -f -p "$pid" -o "$dir/strace.txt" 2>/dev/null &
  local tracer=$!
  sleep 1
  local requests
  requests=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -H "Vestibule-Token: $token" "$url" | awk '/ requests in /{ print $1 }')
  kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
  awk -v n="$requests" '$1 ~ /^[0-9.]+$/ && NF >= 5 { printf "%s %.3f\n", $NF, $4 / n }' "$dir/strace.txt" > "$out"
  echo "$requests" > "$out.requests"
}
trace "$vestibule_pid" "http://$vestibule_addr/checkout/ping" "$dir/vestibule.calls"
trace "$nginx_worker" "http://127.0.0.1:$nginx_port/checkout/ping" "$dir/nginx.calls"

echo "system calls per request ($DURATION of load each, $CONNECTIONS connections; strace -c):"
printf '| %-14s | %9s | %9s |\n' "system call" vestibule nginx
printf '|%s|%s|%s|\n' ---------------- ----------- -----------
for name in $(cut -d' ' -f1 "$dir/vestibule.calls" "$dir/nginx.calls" | grep -v '^total$' | sort -u); do
  v=$(awk -v s="$name" '$1 == s { print $2 }' "$dir/vestibule.calls"); n=$(awk -v s="$name" '$1 == s { print $2 }' "$dir/nginx.calls")
  # Calls made less than once per 100 requests (accepts, connects, timers) are left out.
  awk -v v="${v:-0}" -v n="${n:-0}" 'BEGIN { exit !(v >= 0.01 || n >= 0.01) }' || continue
  printf '| %-14s | %9.2f | %9.2f |\n' "$name" "${v:-0}" "${n:-0}"
done
v=$(awk '$1 == "total" { print $2 }' "$dir/vestibule.calls"); n=$(awk '$1 == "total" { print $2 }' "$dir/nginx.calls")
printf '| %-14s | %9.2f | %9.2f |\n' "all" "$v" "$n"
echo "vestibule / nginx: $(awk -v v="$v" -v n="$n" 'BEGIN { printf "%.2f", v / n }')x system calls per request" \
  "($(cat "$dir/vestibule.calls.requests") and $(cat "$dir/nginx.calls.requests") requests traced)"
