# Shell helpers shared by tests/load-smoke and benches/run.sh: the release binary as the demo
# shop and as vestibule instances, each on a free loopback port. Source it; set `bin` and
# `dir` first, and kill "${pids[@]}" on exit.

# Start the demo shop; sets `shop` to its host:port.
start_shop() {
  "$bin" shop --listen 127.0.0.1:0 --workers "${1:-1}" > "$dir/shop.log" &
  pids+=($!)
  until grep -q "demo shop on" "$dir/shop.log" 2>/dev/null; do sleep 0.1; done
  shop=$(sed -n 's|demo shop on http://\([^/]*\)/|\1|p' "$dir/shop.log")
}

# Start an instance with a config (JSON logs, listen port 0); sets `addr` to its host:port.
start_vestibule() {
  local config=$1 log=$2
  "$bin" run --config "$config" > "$log" &
  pids+=($!)
  until grep -q '"listening"' "$log" 2>/dev/null; do
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "vestibule did not start:" >&2; cat "$log" >&2; exit 1; }
    sleep 0.1
  done
  addr=$(grep '"listening"' "$log" | sed 's/.*"addr":"\([^"]*\)".*/\1/')
}

# A free loopback TCP port.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
