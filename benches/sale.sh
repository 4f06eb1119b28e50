#!/usr/bin/env bash
# A scheduled sale's start, rehearsed: two instances (INSTANCES) on one Redis, a room whose event opened
# its pre-queue a minute ago and starts $LEAD seconds after the script does, and a crowd from
# `vestibule loadtest --rehearse-sale` (each visitor from its own address) that arrives in the
# pre-queue, waits for the start and goes in. With RESTART=1, Redis is killed and restarted
# empty in the middle of the pre-queue. The report states every visitor's place against the
# published draw, the rank correlation of arrival and admission, the time from the start to
# the first and the 1000th admission, FIFO inversions and places lost; the run fails if a
# place is not the one drawn, a place is lost, or a pair is admitted out of order.
#
#   bash benches/sale.sh                          # 5000 visitors at 1000/s, the start at 15 s,
#                                                 # 12000 admissions a minute
#   ADMIT=60000 INSTANCES=1 bash benches/sale.sh  # 1000 a second, one instance
#   VISITORS=20000 RATE=2000 LEAD=20 bash benches/sale.sh
#   RESTART=1 bash benches/sale.sh                # Redis restarted empty during the pre-queue
#   VESTIBULE=/path/to/vestibule bash benches/sale.sh   # another build
#   MAX_INVERSIONS=1000000 ADMIT=60000 bash benches/sale.sh   # report inversions, do not fail
#
# Results (text, JSON, HTML, logs) go to target/bench-results/sale.*. Needs redis-server; only
# loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
VISITORS=${VISITORS:-5000}
RATE=${RATE:-1000}
LEAD=${LEAD:-15}
RESTART=${RESTART:-0}
ADMIT=${ADMIT:-12000}
INSTANCES=${INSTANCES:-2}
TARGETS=${TARGETS:-$INSTANCES}
out=target/bench-results
mkdir -p "$out"
command -v redis-server >/dev/null || { echo "redis-server is not on the PATH (apt-get install redis-server)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
source tests/lib.sh
release_setup
loadtest_pid=""

start_redis
start_shop 1
"$bin" keygen > "$dir/key.pem"
now=$(date +%s)
at() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
targets=()
for n in $(seq 0 $((INSTANCES - 1))); do
  cat > "$dir/proxy-$n.toml" <<TOML
[server]
listen = "127.0.0.1:0"
workers = 1
shutdown_grace = "1s"
[upstream]
url = "http://$shop"
[store]
kind = "redis"
url = "redis://127.0.0.1:$redis_port/"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
admit_per_minute = 60
max_active = 100000
state = "closed"
message = "Opens soon"
[[rooms.events]]
name = "Rehearsal"
prequeue_at = $(at $((now - 60)))
starts_at = $(at $((now + LEAD)))
admit_per_minute = $ADMIT
[log]
format = "json"
level = "warn,vestibule=info"
TOML
  start_vestibule "$dir/proxy-$n.toml" "$out/sale.instance-$n.log"
  [ "$n" -lt "$TARGETS" ] && targets+=(--target "$addr")
done

echo "== sale rehearsal: $VISITORS visitors at $RATE/s into the pre-queue, the start at +${LEAD} s, $ADMIT admissions/min, $INSTANCES instance(s) on one Redis$([ "$RESTART" = 1 ] && echo ', Redis restarted empty mid pre-queue')"
"$bin" loadtest "${targets[@]}" --sources 127.0.0.0/8 --visitors "$VISITORS" --arrival-rate "$RATE" \
  --patience 5m --quiet --rehearse-sale --report "$out/sale.json" --html "$out/sale.html" \
  --max-lost 0 --max-errors 0 --max-inversions "${MAX_INVERSIONS:-0}" --max-misplaced 0 > "$out/sale.txt" 2>&1 &
loadtest_pid=$!
pids+=($loadtest_pid)
if [ "$RESTART" = 1 ]; then
  # Halfway between the end of the arrivals and the start.
  arrivals_end=$(python3 -c "print($VISITORS / $RATE)")
  sleep "$(python3 -c "print(max(1.0, ($arrivals_end + $LEAD) / 2 - 1))")"
  echo "   redis killed"
  kill -9 "$redis_pid"; wait "$redis_pid" 2>/dev/null || true
  start_redis
  echo "   redis restarted empty"
fi
status=0
wait "$loadtest_pid" || status=$?
cat "$out/sale.txt"
exit $status
