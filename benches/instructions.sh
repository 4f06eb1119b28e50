#!/usr/bin/env bash
# Instructions per request, counted by callgrind: steady on a busy machine, where time is not.
# For the admitted path (a request with a valid token, forwarded to the demo shop) and for
# joins (a first visit that takes a ticket), each through one worker, for this build and, to
# compare, another one:
#
#   bash benches/instructions.sh                          # this build
#   BEFORE=/path/to/old/vestibule bash benches/instructions.sh   # and another, side by side
#   BEFORE=target/release/vestibule BEFORE_SERVER="fast_lane = false" bash benches/instructions.sh
#                                                         # this build, hyper serving every request
#   REQUESTS=4000 bash benches/instructions.sh            # default 2000 (and half as many)
#
# Each figure is (instructions after 2N requests - after N) / N, so start-up and idle work
# cancel out. Needs valgrind and python3; only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-2000}
command -v valgrind >/dev/null || { echo "valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
source tests/lib.sh
release_setup
start_shop 1
"$bin" keygen > "$dir/key.pem"

# A room whose one place is taken by nobody: paused rooms forward only admitted requests.
write_config() {
  local port=$1 extra=$2
  cat > "$dir/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
workers = 1
$extra
[upstream]
url = "http://$shop"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 4000000000
max_active = 4000000000
joins_per_address_per_minute = 4000000000
TOML
}

# Instructions the process at `binary` spends on `count` requests of `kind`.
measure() {
  local binary=$1 kind=$2 count=$3 extra=$4
  local port; port=$(free_port)
  write_config "$port" "$extra"
  # An older build may not know the join limit (it had none).
  if ! "$binary" check --config "$dir/proxy.toml" >/dev/null 2>&1; then
    sed -i '/joins_per_address_per_minute/d' "$dir/proxy.toml"
  fi
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" "$binary" run --config "$dir/proxy.toml" \
    > "$dir/vestibule.log" 2>&1 &
  local pid=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do sleep 0.2; done
  local token; token=$("$binary" token --config "$dir/proxy.toml" --room checkout)
  python3 - "$port" "$kind" "$count" "$token" <<'PY'
import http.client, sys
port, kind, count, token = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Accept": "application/json"}
if kind == "admitted":
    headers["Vestibule-Token"] = token
for _ in range(count):
    conn.request("GET", "/checkout/ping", headers=headers)
    conn.getresponse().read()
PY
  kill -INT "$pid"; wait "$pid" 2>/dev/null || true
  sed -n 's/^summary: //p' "$dir/callgrind.out" | awk '{print $1}'
}

per_request() {
  local binary=$1 kind=$2 extra=${3:-}
  local once twice
  once=$(measure "$binary" "$kind" "$((REQUESTS / 2))" "$extra")
  twice=$(measure "$binary" "$kind" "$REQUESTS" "$extra")
  echo $(( (twice - once) / (REQUESTS - REQUESTS / 2) ))
}

printf "%-10s %-10s %14s\n" build kind instr/request
for kind in admitted join; do
  this=$(per_request "$bin" "$kind")
  printf "%-10s %-10s %14s\n" this "$kind" "$this"
  if [ -n "${BEFORE:-}" ]; then
    before=$(per_request "$BEFORE" "$kind" "${BEFORE_SERVER:-}")
    printf "%-10s %-10s %14s   (this / before = %s)\n" before "$kind" "$before" \
      "$(python3 -c "print(f'{$this / $before:.3f}')")"
  fi
done
