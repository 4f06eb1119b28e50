#!/usr/bin/env bash
# The benchmark suite, in one go on this machine, each figure a ratio against a reference
# measured in the same run:
#   1. admitted path: vestibule vs nginx proxy_pass vs the upstream direct (benches/admitted.sh),
#      one worker each, then with TLS on both listeners, then two workers each; and system
#      calls per request of both (benches/syscalls.sh)
#   2. joins per second and proxy CPU per join, memory store vs Redis store; Redis calls per
#      join (cargo bench --bench line)
#   3. waiting sockets per instance, memory per socket, fan-out delay (cargo bench --bench feed)
#   4. what idle rooms cost Redis: 10 instances x 100 rooms, nobody waiting (benches/idle-rooms.sh)
#   5. crowds through `vestibule loadtest`, three instances on one Redis: admission rate vs
#      configured, FIFO inversions, capacity overshoot (HTML reports with plots)
#   6. admission that listens: a checkout slowed tenfold under a crowd, the rate following it
#      down and back, against the same run without [rooms.adaptive] (cargo bench --bench adaptive)
# and ends with each figure against the goal of the speed issue.
#
#   bash benches/run.sh                      # about 20 minutes
#   CROWD_SECONDS=300 bash benches/run.sh    # longer crowds (rate accuracy over more minutes)
#
# Installs nginx and wrk from apt when missing; starts its own redis-server on a free port.
# Results (text, JSON, HTML) go to target/bench-results/. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
CROWD_SECONDS=${CROWD_SECONDS:-120}
LINE_SECONDS=${LINE_SECONDS:-60}
SOCKETS=${SOCKETS:-10000}
out=target/bench-results
mkdir -p "$out"
command -v redis-server >/dev/null || { echo "redis-server is not on the PATH (apt-get install redis-server)" >&2; exit 1; }

echo "== 1/7 admitted path"
bash benches/admitted.sh | tee "$out/admitted.txt"
TLS=1 bash benches/admitted.sh | tee "$out/admitted-tls.txt"
WORKERS=2 bash benches/admitted.sh | tee "$out/admitted-2.txt"
bash benches/syscalls.sh | tee "$out/syscalls.txt"

echo; echo "== 2/7 the line on Redis (joins, calls per join, admissions over ${LINE_SECONDS} s)"
DURATION=$LINE_SECONDS cargo bench --quiet --bench line | tee "$out/line.txt"

echo; echo "== 3/7 waiting sockets (${SOCKETS})"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo bench --quiet --bench feed -- "$SOCKETS" | tee "$out/feed.txt"

echo; echo "== 4/7 idle rooms"
bash benches/idle-rooms.sh | tee "$out/idle-rooms.txt"

echo; echo "== 5/7 crowds, three instances on one Redis"
source tests/lib.sh
release_setup

start_redis
port=$redis_port
start_shop 1
"$bin" keygen > "$dir/key.pem"
# Two rooms: `checkout`, paced by its rate (room for everyone); `capacity`, where visitors
# stay 2 s and 50 places bind before the rate does.
cat > "$dir/proxy.toml" <<TOML
[server]
listen = "127.0.0.1:0"
workers = 1
[upstream]
url = "http://$shop"
[store]
kind = "redis"
url = "redis://127.0.0.1:$port/"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 1200
max_active = 100000
[[rooms]]
id = "capacity"
paths = ["/product"]
admit_per_minute = 6000
max_active = 50
[log]
format = "json"
level = "warn,vestibule=info"
TOML
targets=()
for n in 1 2 3; do
  start_vestibule "$dir/proxy.toml" "$dir/vestibule-$n.log"
  targets+=(--target "$addr")
done

crowd() {
  local name=$1; shift
  echo "-- $name"
  if "$bin" loadtest --config "$dir/proxy.toml" "${targets[@]}" --sources 127.0.0.0/8 --leave --patience 20m \
      --report "$out/crowd-$name.json" --html "$out/crowd-$name.html" "$@" 2>&1 | tee "$out/crowd-$name.txt"; then
    echo "   limits met"
  else
    echo "   LIMITS MISSED (see above)"
  fi
}
# 30 arrivals a second against 20 admissions a second: the line grows, the rate paces it.
crowd rate --room checkout --arrival-rate 30 --duration "${CROWD_SECONDS}s" \
  --max-rate-error 1 --max-inversions 0 --max-errors 0 --max-overshoot 0
# 40 a second, each staying 2 s, into 50 places (25 a second at most): the places bind.
crowd capacity --room capacity --path /product --arrival-rate 40 --hold 2s --duration "$((CROWD_SECONDS / 2))s" \
  --max-inversions 0 --max-errors 0 --max-overshoot 0

echo; echo "== 6/7 admission that listens (a checkout slowed tenfold; then the same without [rooms.adaptive])"
cargo bench --quiet --bench adaptive | tee "$out/adaptive.txt"
ADAPTIVE=0 cargo bench --quiet --bench adaptive | tee "$out/adaptive-off.txt"

echo; echo "== 7/7 a sale's start (5000 visitors in the pre-queue, two instances; then through a Redis restarted empty)"
VESTIBULE=target/release/vestibule bash benches/sale.sh | tee "$out/sale-run.txt"
VESTIBULE=target/release/vestibule RESTART=1 bash benches/sale.sh | tee "$out/sale-restart.txt"

echo; echo "== against the goals of the speed issue (full output in $out/)"
goal() { # name, measured, limit, "min" or "max", unit
  local verdict
  verdict=$(awk -v m="$2" -v l="$3" -v k="$4" 'BEGIN { print ((k == "min" ? m >= l : m <= l) ? "met" : "MISSED") }')
  printf '  %-52s %10s %-6s (goal: %s %s)  %s\n' "$1" "$2" "$5" "$([ "$4" = min ] && echo ">=" || echo "<=")" "$3" "$verdict"
}
for run in ":one worker" "-tls:TLS, one worker" "-2:two workers"; do
  row=$(grep '^| vestibule ' "$out/admitted${run%%:*}.txt" | tr -d ' ')
  IFS='|' read -r _ _ _ _ rps_ratio p99_ratio _ cpu_ratio _ <<< "$row"
  goal "admitted req/s vs nginx, ${run#*:}" "$rps_ratio" 1.0 min x
  goal "admitted p99 vs nginx, ${run#*:}" "$p99_ratio" 1.0 max x
  goal "admitted CPU per request vs nginx, ${run#*:}" "$cpu_ratio" 1.0 max x
done
goal "system calls per request vs nginx" "$(sed -n 's/^vestibule \/ nginx: \([0-9.]*\)x.*/\1/p' "$out/syscalls.txt")" 1.0 max x
goal "memory per waiting socket" "$(sed -n 's/.*: \([0-9.]*\) KiB per waiting socket.*/\1/p' "$out/feed.txt")" 4.0 max KiB
goal "slot freed -> last socket's message (incl. the step)" "$(sed -n 's/.*last socket \([0-9.]*\) ms.*/\1/p' "$out/feed.txt")" 100 max ms
goal "proxy CPU per join, Redis store" "$(sed -n 's/.*redis store .*proxy CPU per join *\([0-9.]*\) µs.*/\1/p' "$out/line.txt")" 50 max µs
goal "Redis joins vs memory joins per second" "$(sed -n 's/.*(\([0-9.]*\)x memory.*/\1/p' "$out/line.txt")" 0.9 min x
echo "  idle rooms: $(grep -E 'Redis commands per second' "$out/idle-rooms.txt" | sed 's/^ *//') (10 instances x 100 rooms; docs/benchmarks.md: capacity)"
echo "  (the fan-out goal is the last of 18 000 sockets within 100 ms of the step: SOCKETS=18000 bash benches/run.sh)"

echo; echo "== summary"
for run in "" -tls -2; do grep -B1 -A4 "^| target" "$out/admitted$run.txt" || true; done
grep -E "memory store|redis store|redis per join|admissions," "$out/line.txt" || true
grep -E "system calls per request" "$out/syscalls.txt" || true
grep -Ei "sockets|per socket|fan-out" "$out/feed.txt" || true
for name in rate capacity; do
  echo "crowd $name: $(grep -E 'visitors in' "$out/crowd-$name.txt")"
  grep -E "admissions per minute|peak admitted" "$out/crowd-$name.txt" || true
done
