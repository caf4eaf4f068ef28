#!/usr/bin/env bash
# The admin API against its own spec: starts a gateway (the given binary) on port 0 with a
# fresh database, then runs schemathesis with every check against the openapi.json it serves.
# Fails on any 5xx, any response that does not match the spec, any request valid by the spec
# that is refused, and any invalid one that is accepted.
#
#   bash .ci/schemathesis.sh target/debug/tollgate            # SQLite
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test bash .ci/schemathesis.sh BIN   # PostgreSQL
#
# The gateway binds port 0 for every listener and says which ports it got in its ready line.
# Bounded: SCHEMATHESIS_MAX_EXAMPLES test cases per operation (default 100) and the whole run
# under SCHEMATHESIS_TIMEOUT seconds (default 600). schemathesis is installed from PyPI into a
# virtualenv (pinned version) unless that virtualenv already has it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$(realpath "${1:?usage: schemathesis.sh PATH/TO/tollgate}")"
version=4.32.5
venv="${SCHEMATHESIS_VENV:-$HOME/.cache/tollgate-ci/schemathesis-$version}"
max_examples="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
budget="${SCHEMATHESIS_TIMEOUT:-600}"

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$version"
fi

work="$(mktemp -d)"
pid=""
cleanup() {
  cd /
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

db_url="${DATABASE_URL:-sqlite://$work/tollgate.db}"
if [[ "$db_url" == postgres* ]]; then
  # A database of its own, dropped at the end.
  name="tollgate_st_$$"
  psql "$db_url" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  base="$db_url"
  db_url="${db_url%/*}/$name"
  trap 'cleanup; psql "$base" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null || true' EXIT
fi
cat >"$work/config.toml" <<EOF
[server]
listen = "127.0.0.1:0"
threads = 1

[database]
url = "$db_url"

[writer]
spool_dir = "$work/spool"

[metrics]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
EOF

token="schemathesis-$(date +%s%N)"
# Every listener on port 0: the gateway's ready line says which ports it got.
TOLLGATE_ADMIN_TOKEN="$token" TOLLGATE_DATABASE_URL="" RUST_LOG="warn,tollgate::health=info" \
  "$bin" --config "$work/config.toml" serve >"$work/serve.log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 300); do
  ready=$(grep -o 'tollgate ready .*' "$work/serve.log" || true)
  [ -n "$ready" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/serve.log"; echo "schemathesis.sh: the gateway exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$ready" ] || { cat "$work/serve.log"; echo "schemathesis.sh: the gateway was not ready within 60 s" >&2; exit 1; }
metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' <<<"$ready")
admin=$(sed -n 's/.* admin=\([^ ]*\).*/\1/p' <<<"$ready")
curl -fsS "http://$metrics/healthz" >/dev/null

# Some rows to work on: a user, a key and an account (ids 1), so that the id routes find them.
H="Authorization: Bearer $token"
A="http://$admin"
curl -fsS -H "$H" -d '{"email":"seed@example.com","username":"seed"}' "$A/admin/users" >/dev/null
curl -fsS -H "$H" -d '{"user":"seed@example.com","name":"seed"}' "$A/admin/keys" >/dev/null
curl -fsS -H "$H" -d '{"name":"seed","type":"openai","base_url":"http://127.0.0.1:9","api_key":"sk-seed"}' "$A/admin/accounts" >/dev/null

cd "$work"
status=0
# Every check but unsupported_method: openapi.json documents that an unsupported method on a known
# path answers 404 (`not_found`) like an unknown path; the admin listener has no 405 (its small
# HTTP server sends no Allow header).
timeout --signal=INT --kill-after=30 "$budget" \
  "$venv/bin/schemathesis" --no-color --config-file "$here/schemathesis.toml" run "$A/openapi.json" \
  --header "$H" --checks all --exclude-checks unsupported_method --max-examples "$max_examples" --seed "${SCHEMATHESIS_SEED:-1}" \
  --workers 1 --request-timeout 10 || status=$?
if grep -q "panicked" "$work/serve.log"; then
  grep -B2 -A5 "panicked" "$work/serve.log" >&2
  status=1
fi
exit "$status"
