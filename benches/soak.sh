#!/usr/bin/env bash
# Memory under a long crowd: one vestibule (memory store, one worker) in front of the demo
# shop, visitors arriving at RATE a second, admitted, shopping HOLD, then leaving, for
# DURATION. The instance's resident memory is sampled every SAMPLE seconds; at the end the
# script prints the curve's thirds, the growth per visitor over the last two thirds, and what
# the room holds (the admin view's `held`: entries per table). A curve that plateaus grows
# by far less over its last third than over its first.
#
#   bash benches/soak.sh                          # 30 minutes at 100 visitors a second
#   DURATION=5m bash benches/soak.sh              # a shorter look
#   RATE=200 HOLD=1s SESSION=120 bash benches/soak.sh
#   VESTIBULE=/path/to/other/vestibule bash benches/soak.sh   # another build
#
# Writes the samples to $OUT (default target/soak.csv: seconds,rss_kb,visitors_arrived).
# Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-30m}
RATE=${RATE:-100}
HOLD=${HOLD:-200ms}
SAMPLE=${SAMPLE:-10}
SESSION=${SESSION:-600}
OUT=${OUT:-target/soak.csv}

source tests/lib.sh
release_setup
start_shop 1

"$bin" keygen > "$dir/key.pem"
admin_port=$(free_port)
write_room_config "$dir/proxy.toml" 'listen = "127.0.0.1:0"
workers = 1' "admit_per_minute = 60000
max_active = 100000
session_seconds = $SESSION"
cat >> "$dir/proxy.toml" <<TOML
[admin]
listen = "127.0.0.1:$admin_port"
token = "soak-admin-token-0123"
TOML
start_vestibule "$dir/proxy.toml" "$dir/vestibule.log"
proxy_pid=${pids[-1]}

echo "== soak: $RATE visitors a second for $DURATION (hold $HOLD, session_seconds $SESSION) against $addr"
"$bin" loadtest --target "$addr" --duration "$DURATION" --arrival-rate "$RATE" --leave --hold "$HOLD" \
  --sources 127.0.0.0/8 --patience 60s --quiet --report "$dir/report.json" > "$dir/loadtest.out" 2>&1 &
load_pid=$!
pids+=($load_pid)

mkdir -p "$(dirname "$OUT")"
echo "seconds,rss_kb" > "$OUT"
started=$(date +%s)
while kill -0 "$load_pid" 2>/dev/null; do
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$proxy_pid/status")
  echo "$(( $(date +%s) - started )),$rss" >> "$OUT"
  sleep "$SAMPLE"
done
wait "$load_pid" || { cat "$dir/loadtest.out"; echo "the crowd failed" >&2; exit 1; }
held=$(curl -s -H "Authorization: Bearer soak-admin-token-0123" "http://127.0.0.1:$admin_port/rooms/checkout" |
  python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["held"]))')

python3 - "$OUT" "$RATE" "$dir/report.json" "$held" <<'PY'
import json, sys
path, rate, report, held = sys.argv[1], float(sys.argv[2]), json.load(open(sys.argv[3])), json.loads(sys.argv[4])
rows = [tuple(map(int, line.split(","))) for line in open(path).read().split()[1:]]
n = len(rows)
if n < 6:
    sys.exit("too few samples: run longer than 6 x SAMPLE")
third = [rows[0], rows[n // 3], rows[2 * n // 3], rows[-1]]
print("rss (MB) at " + ", ".join(f"{t} s: {kb / 1024:.1f}" for t, kb in third))
growth = [(b[1] - a[1]) / 1024 for a, b in zip(third, third[1:])]
print("growth per third (MB): " + ", ".join(f"{g:+.1f}" for g in growth))
seconds = third[3][0] - third[1][0]
per_visitor = (third[3][1] - third[1][1]) * 1024 / max(1.0, seconds * rate)
print(f"growth over the last two thirds: {per_visitor:.0f} bytes per visitor ({int(seconds * rate)} visitors)")
print(f"visitors {report['visitors']}, admitted {report['admitted']}, errors {sum(report['errors'].values())}")
print("held by the room at the end:", held)
PY
