#!/usr/bin/env bash
# A visitor's wait while one address attacks: slowhttptest's slowloris (-H) and slow read
# (-X), and connections that pipeline requests and never read, each from 127.0.0.1 against
# one vestibule (memory store, max_connections = 400 as in the issue that found them, the
# per-address cap and send_timeout at their defaults unless set). Meanwhile a visitor from
# 127.0.0.7 asks for /checkout once a second; the script prints each attack's waits and
# fails when one is over MAX_WAIT seconds. Then testssl.sh against the TLS listener: it fails
# on a protocol below TLS 1.2 offered, or a HIGH or CRITICAL finding.
#
#   bash benches/attacks.sh                      # every attack, 30 s each, then testssl.sh
#   SECONDS_EACH=60 bash benches/attacks.sh
#   SERVER_EXTRA='max_connections_per_address = 10000' bash benches/attacks.sh   # the caps off
#   ATTACKS="slowloris" TLS_SCAN=0 bash benches/attacks.sh
#
# Installs slowhttptest and testssl.sh from apt when missing. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-30}
MAX_WAIT=${MAX_WAIT:-2}
ATTACKS=${ATTACKS:-"slowloris slowread pipeline"}
TLS_SCAN=${TLS_SCAN:-1}
SERVER_EXTRA=${SERVER_EXTRA:-}

missing=()
command -v slowhttptest >/dev/null || missing+=(slowhttptest)
command -v testssl >/dev/null || missing+=(testssl.sh)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} from apt..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

source tests/lib.sh
release_setup
start_shop 1
"$bin" keygen > "$dir/key.pem"
# A certificate as an operator would have one: signed by a CA (made here, given to testssl.sh
# as trusted), a year long, with revocation addresses (on loopback; nothing is fetched).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 400 -subj "/CN=bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
cat > "$dir/tls.ext" <<EXT
subjectAltName = DNS:localhost, IP:127.0.0.1
extendedKeyUsage = serverAuth
crlDistributionPoints = URI:http://127.0.0.1:9/bench.crl
authorityInfoAccess = OCSP;URI:http://127.0.0.1:9/ocsp
EXT
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -days 398 \
  -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null

config() { # $1: extra [server] lines
  write_room_config "$2" "listen = \"127.0.0.1:0\"
workers = 1
max_connections = 400
$1
$SERVER_EXTRA" "admit_per_minute = 60000
max_active = 100000"
}
config "" "$dir/proxy.toml"
start_vestibule "$dir/proxy.toml" "$dir/vestibule.log"
url="http://$addr/checkout"

# The visitor from another address: one request a second for `seconds`; prints the waits.
visitor() {
  local seconds=$1 waits=()
  for _ in $(seq "$seconds"); do
    waits+=("$(curl -s -o /dev/null --interface 127.0.0.7 --max-time 15 -w '%{time_total}' "$url" || echo 15)")
    sleep 1
  done
  printf '%s\n' "${waits[@]}"
}

# Connections from 127.0.0.1 that pipeline GETs for a large page and never read.
pipeline() {
  python3 - "$addr" "$1" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
held, deadline = [], time.time() + float(sys.argv[2])
while time.time() < deadline:
    if len(held) < 1000:
        try:
            s = socket.create_connection((host, int(port)), timeout=2)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /checkout HTTP/1.1\r\nHost: shop.test\r\n\r\n" * 64)
            held.append(s)
        except OSError:
            time.sleep(0.05)
    else:
        time.sleep(0.1)
PY
}

failed=0
report() { # $1: name; stdin: waits
  python3 -c '
import sys
name, limit = sys.argv[1], float(sys.argv[2])
waits = sorted(float(w) for w in sys.stdin.read().split())
worst, median = waits[-1], waits[len(waits) // 2]
verdict = "ok" if worst <= limit else "FAILED"
print(f"{name:<40} visitor from 127.0.0.7: {len(waits)} requests, median {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms  {verdict}")
sys.exit(0 if worst <= limit else 1)' "$1" "$MAX_WAIT" || failed=1
}

echo "== attacks from 127.0.0.1 on $addr (max_connections 400), a visitor from 127.0.0.7"
visitor 5 | report "no attack"
for attack in $ATTACKS; do
  case $attack in
    slowloris)
      slowhttptest -H -c 1000 -r 200 -i 10 -l "$SECONDS_EACH" -u "$url" -p 3 > "$dir/slowloris.log" 2>&1 &
      name="slowhttptest -H -c 1000 (slowloris)" ;;
    slowread)
      slowhttptest -X -c 1000 -r 200 -w 32 -y 64 -n 5 -z 16 -k 8 -l "$SECONDS_EACH" -u "$url" -p 3 \
        > "$dir/slowread.log" 2>&1 &
      name="slowhttptest -X -c 1000 (slow read)" ;;
    pipeline)
      pipeline "$SECONDS_EACH" &
      name="1000 pipelining sockets, never read" ;;
    *) echo "unknown attack $attack" >&2; exit 2 ;;
  esac
  attacker=$!
  sleep 3 # the attack takes hold
  visitor $((SECONDS_EACH - 5)) | report "$name"
  wait "$attacker" 2>/dev/null || true
done

if [ "$TLS_SCAN" = 1 ]; then
  config "tls = { cert = \"tls.crt\", key = \"tls.key\" }" "$dir/tls.toml"
  start_vestibule "$dir/tls.toml" "$dir/vestibule-tls.log"
  echo "== testssl.sh against https://$addr"
  testssl --quiet --color 0 --warnings off --add-ca "$dir/ca.crt" --jsonfile "$dir/testssl.json" "https://$addr" \
    > "$dir/testssl.out" 2>&1 || true
  python3 - "$dir/testssl.json" <<'PY' || failed=1
import json, sys
findings = json.load(open(sys.argv[1]))
old = [f["id"] for f in findings if f["id"] in ("SSLv2", "SSLv3", "TLS1", "TLS1_1") and not f["finding"].startswith("not offered")]
bad = [(f["id"], f["severity"], f["finding"]) for f in findings if f["severity"] in ("HIGH", "CRITICAL")]
offered = [f["id"] for f in findings if f["id"].startswith("TLS1") and f["finding"].startswith("offered")]
print(f"protocols offered: {', '.join(offered) or '-'}; below TLS 1.2 offered: {', '.join(old) or 'none'}")
print(f"findings of severity HIGH or CRITICAL: {len(bad)}")
for finding in bad:
    print("  ", *finding)
sys.exit(1 if old or bad else 0)
PY
fi
exit $failed
