#!/usr/bin/env bash
# Starts a real tollgate (the binary given as $1, default target/debug/tollgate) on SQLite against a
# tiny mock upstream, sends a few requests, then checks deploy/ against the LIVE /metrics
# (dashboard and alert metric names, promtool check metrics) and that SIGTERM exits 0.
# Used by .ci/run; runs anywhere with python3 and the tools deploy/check.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/tollgate}")
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free_port); proxy=$(free_port); metrics=$(free_port); admin=$(free_port)

python3 - "$up" <<'PY' &
import http.server, json, sys
body = json.dumps({"model": "gpt-4o-mini", "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)
for _ in $(seq 1 200); do
  curl -fsS -X POST -d '{}' "http://127.0.0.1:$up/" >/dev/null 2>&1 && break
  sleep 0.05
done

cat > "$tmp/config.toml" <<TOML
[server]
listen = "127.0.0.1:$proxy"
grace_period_secs = 5
[database]
url = "sqlite://$tmp/tollgate.db"
[writer]
spool_dir = "$tmp/spool"
[metrics]
listen = "127.0.0.1:$metrics"
[admin]
listen = "127.0.0.1:$admin"
[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"
TOML
tg() { "$bin" --config "$tmp/config.toml" "$@"; }
tg users add --email smoke@example.com --username smoke >/dev/null 2>&1
key=$(tg keys create --user smoke@example.com --name smoke 2>/dev/null | tail -n1)
tg accounts add --name mock --type openai --base-url "http://127.0.0.1:$up" --api-key sk-mock >/dev/null 2>&1
TOLLGATE_ADMIN_TOKEN=smoke-token "$bin" --config "$tmp/config.toml" serve >/dev/null 2>"$tmp/serve.log" &
server=$!
pids+=($server)
for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$metrics/readyz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -fsS "http://127.0.0.1:$metrics/healthz" >/dev/null
curl -fsS "http://127.0.0.1:$metrics/readyz" >/dev/null || { echo "never ready"; cat "$tmp/serve.log"; exit 1; }
echo "ok   /healthz and /readyz"
for _ in 1 2 3; do
  out=$(curl -sS -w ' %{http_code}' "http://127.0.0.1:$proxy/v1/chat/completions" -H "Authorization: Bearer $key" -d '{"model":"gpt-4o-mini"}')
  case "$out" in *" 200") ;; *) echo "proxy request failed: $out"; tail -n 20 "$tmp/serve.log"; exit 1 ;; esac
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$proxy/v1/chat/completions" -H "Authorization: Bearer tg_nope" -d '{}')
[ "$code" = 401 ] || { echo "expected 401, got $code"; exit 1; }
# The last request is counted in its logging phase, just after its response: wait for all four.
for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$metrics/metrics" > "$tmp/metrics.txt"
  awk '$1 == "tollgate_request_duration_seconds_count" && $2 >= 4 { found = 1 } END { exit !found }' "$tmp/metrics.txt" && break
  sleep 0.05
done
promtool check metrics < "$tmp/metrics.txt"
echo "ok   promtool check metrics on a live /metrics"
TOLLGATE_METRICS_URL="http://127.0.0.1:$metrics/metrics" bash deploy/check.sh
kill -TERM "$server"
if wait "$server"; then echo "ok   SIGTERM: exit 0"; else echo "tollgate exited non-zero on SIGTERM"; cat "$tmp/serve.log"; exit 1; fi
