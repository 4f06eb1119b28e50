#!/usr/bin/env bash
# What idle rooms cost Redis: N instances, each with the same M rooms and nobody in any line,
# on a redis-server of our own; Redis's own count of commands processed (INFO stats) over a
# window, per second, and Redis's CPU time per second.
#
#   bash benches/idle-rooms.sh                      # 10 instances x 100 rooms, 20 s
#   INSTANCES=3 ROOMS=10 SECONDS_MEASURED=10 bash benches/idle-rooms.sh
#
# Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=${INSTANCES:-10}
ROOMS=${ROOMS:-100}
SECONDS_MEASURED=${SECONDS_MEASURED:-20}

source tests/lib.sh
release_setup
start_redis
"$bin" keygen > "$dir/key.pem"
{
  printf '[server]\nlisten = "127.0.0.1:0"\nworkers = 1\n[upstream]\nurl = "http://127.0.0.1:9"\n'
  printf '[store]\nkind = "redis"\nurl = "redis://127.0.0.1:%s/0"\n' "$redis_port"
  printf '[tokens]\nsigning_key = "%s/key.pem"\n[log]\nformat = "json"\n' "$dir"
  for r in $(seq "$ROOMS"); do
    printf '[[rooms]]\nid = "room-%s"\npaths = ["/room-%s"]\nadmit_per_minute = 600\nmax_active = 100\n' "$r" "$r"
  done
} > "$dir/proxy.toml"
for i in $(seq "$INSTANCES"); do
  start_vestibule "$dir/proxy.toml" "$dir/instance-$i.log"
done
# Let leases settle, then measure.
sleep 3
stat() { redis-cli -p "$redis_port" info stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }
cpu() { redis-cli -p "$redis_port" info cpu | awk -F: '/^used_cpu_(sys|user):/ { total += $2 } END { print total }'; }
redis-cli -p "$redis_port" config resetstat > /dev/null
c0=$(stat); t0=$(cpu)
sleep "$SECONDS_MEASURED"
c1=$(stat); t1=$(cpu)
commands=$(( (c1 - c0) / SECONDS_MEASURED ))
redis_cpu=$(awk -v a="$t0" -v b="$t1" -v s="$SECONDS_MEASURED" 'BEGIN { printf "%.1f", (b - a) * 100 / s }')
echo "idle: $INSTANCES instances x $ROOMS rooms, nobody waiting, over ${SECONDS_MEASURED} s:"
echo "  Redis commands per second: $commands"
echo "  Redis CPU: ${redis_cpu} % of a core"
echo "  commands per second, by command (INFO commandstats):"
redis-cli -p "$redis_port" info commandstats | awk -F'[:=,]' -v s="$SECONDS_MEASURED" \
  '/^cmdstat_/ { sub("cmdstat_", "", $1); printf "    %-12s %8.0f\n", $1, $3 / s }' | sort -k2 -nr | head -8
