#!/usr/bin/env bash
# Cookieless requests from one address into an idle room of 500 places, with wrk for 10 s:
# how many take a ticket (2xx) and how many are refused (429, Non-2xx).
#
#   bash benches/join-flood.sh                                 # this build
#   VESTIBULE=/path/to/other/vestibule bash benches/join-flood.sh   # another
#
# Installs wrk from apt when missing. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
if [ -z "${VESTIBULE:-}" ]; then cargo build --release --locked --quiet; fi
bin=${VESTIBULE:-target/release/vestibule}
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
source tests/lib.sh
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
[log]
format = "json"
level = "warn,vestibule=info"
TOML
start_vestibule "$dir/proxy.toml" "$dir/vestibule.log"
wrk -t1 -c16 -d10s "http://$addr/checkout" | grep -E "requests in|Non-2xx|Requests/sec"
