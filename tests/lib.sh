# Shell helpers shared by tests/load-smoke and benches/run.sh: the release binary as the demo
# shop and as vestibule instances, each on a free loopback port. Source it; set `bin` and
# `dir` first, and kill "${pids[@]}" on exit.

# For a script of its own: build the release binary and set `bin`, a temporary `dir` and
# `pids`, all stopped and removed when the script exits.
release_setup() {
  if [ -n "${VESTIBULE:-}" ]; then
    bin=$VESTIBULE # another build, to measure it (as the Rust benches' VESTIBULE=)
  else
    cargo build --release --locked --quiet
    bin=target/release/vestibule
  fi
  dir=$(mktemp -d)
  pids=()
  trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
}

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

# Start a redis-server of our own on a free loopback port (nothing kept on disk, so a restart
# comes back empty); sets `redis_port` (kept across restarts) and `redis_pid`.
start_redis() {
  redis_port=${redis_port:-$(free_port)}
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >> "$dir/redis.log" 2>&1 &
  redis_pid=$!
  pids+=($redis_pid)
  until redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG; do sleep 0.05; done
}

# nginx as the reverse proxy the admitted-path benches measure against: one worker,
# proxy_pass to an upstream keep-alive pool. Writes the file $1: listens on 127.0.0.1:$2,
# forwards to $3 (host:port), keeps its pid, logs and temporary files in the folder $4.
write_nginx_proxy() {
  local file=$1 port=$2 upstream=$3 work=$4
  cat > "$file" <<NGINX
worker_processes 1;
error_log $work/nginx-error.log warn;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work;
  proxy_temp_path $work;
  upstream shop { server $upstream; keepalive 256; }
  server {
    listen 127.0.0.1:$port;
    location / {
      proxy_pass http://shop;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
NGINX
}

# Write to $1 a configuration for one instance in front of the demo shop (`shop` set by
# start_shop; the signing key `key.pem` beside it): `[server]` with the lines $2 (listen on a
# free port unless they say otherwise), room `checkout` on /checkout with the lines $3, JSON logs.
write_room_config() {
  local file=$1 server=$2 room=$3
  cat > "$file" <<TOML
[server]
$server
[upstream]
url = "http://$shop"
[tokens]
signing_key = "key.pem"
[[rooms]]
id = "checkout"
paths = ["/checkout"]
$room
[log]
format = "json"
level = "warn,vestibule=info"
TOML
}
