#!/usr/bin/env bash
# Load benchmark of tollgate against a static upstream, with nginx, a bare pingora proxy and a
# bare hyper proxy as baselines. One command: `bash benches/load.sh` (see benches/README.md,
# "Load benchmark").
#
#   bash benches/load.sh          throughput (interleaved rounds) + latency at half load
#   bash benches/load.sh sse      500 concurrent SSE streams: memory per stream, TTFB overhead
#   bash benches/load.sh all      both
#   bash benches/load.sh keys     memory with KEYS_N (100,000) keys cached, under load
#   bash benches/load.sh syscalls system calls per request (strace -c -f, and perf stat on the
#                                 syscall tracepoints) of nginx, bare pingora, bare hyper, tollgate
#   bash benches/load.sh callgrind  instructions per request (valgrind --tool=callgrind) of the same,
#                                 and of each LOAD_FEATURES stage variant
#   bash benches/load.sh soak     tollgate on PostgreSQL (TEST_DATABASE_URL), one key, full metering,
#                                 at full load for LOAD_SOAK_MINUTES: RSS every minute, then idle,
#                                 then SSE streams; usage rows checked against requests served
#
# Settings (environment):
#   LOAD_DURATION=10      seconds per measured wrk run          LOAD_ROUNDS=3   interleaved rounds
#   LOAD_CONNECTIONS=64   wrk -c                                LOAD_WRK_THREADS=1  wrk -t
#   LOAD_WARMUP=2         seconds of unmeasured wrk before each measured run (0 = none)
#   LOAD_THREADS=2        pingora worker threads of tollgate and bare_proxy ([server] threads)
#   LOAD_LATENCY=1        run the half-load latency phase (0 = skip)
#   LOAD_LAT_DELAY_MS=4   pause per connection between requests in that phase
#   LOAD_LATENCY_STAGES=1 also run that phase with each LOAD_FEATURES stage on (p50/p99 it adds)
#   LOAD_LOGS=on          (off in syscalls, callgrind, soak) on: tollgate logs at its default level (info, a line per request) and
#                         nginx writes its access log, as both ship; off: RUST_LOG=warn, no log
#   LOAD_CONFIGS="direct nginx bare hyper tollgate-sqlite tollgate-pg"   which configurations run
#   LOAD_FEATURES="a b"   tollgate stages to measure on vs off (each alone, next to "all off");
#                         "all" = every stage defined (see `stage` below: rate_limits,
#                         rate_limits_redis — LOAD_REDIS_URL, default redis://127.0.0.1:6379)
#   TEST_DATABASE_URL     postgres://... : also run tollgate on PostgreSQL (a fresh database
#                         tollgate_bench_<random>, dropped at the end)
#   SSE_STREAMS=500  SSE_HOLD_SECS=10  SSE_SEQUENTIAL=50   the SSE scenario
#   LOAD_WRITER_BATCH     tollgate's [writer] batch_size (default: tollgate's own, 1000)
#   KEYS_N=100000  KEYS_SECS=20  KEYS_DB=sqlite|pg          the keys scenario (pg: TEST_DATABASE_URL)
#   LOAD_SKIP_BUILD=1     don't run cargo build (use the binaries already in target/release)
#   LOAD_OUT=target/load  where the report (Markdown) and the raw results (JSON lines) go
#   LOAD_KEEP_TMP=1       keep the temporary directory (configs, logs, databases)
#   LOAD_DB_CPUS=1        give the PostgreSQL server of TEST_DATABASE_URL these CPUs (a taskset list)
#                         and everything this script starts (upstream, proxies, wrk) the others,
#                         as in production where the database has its own machine; the server's
#                         affinity is put back at the end (needs taskset, and the right to set it)
#   LOAD_NO_NGINX=1       behave as if nginx were missing (Python upstream, no nginx baseline)
#   SYS_SECS=5  SYS_CONNECTIONS=64       the syscalls scenario (logs off unless LOAD_LOGS is set)
#   CG_SECS=5   CG_CONNECTIONS=8         the callgrind scenario (logs off unless LOAD_LOGS is set)
#   HYPER_RUNTIME=current|multi  HYPER_READ_BUF=N   passed to examples/bare_hyper.rs
#   LOAD_SOAK_MINUTES=10  LOAD_SOAK_SCRAPE_SECS=5 (/metrics scraped that often, 0 = never)
#   LOAD_SOAK_IDLE_SECS=60  LOAD_SOAK_SSE=1000 (streams after the idle phase, 0 = none)
#   LOAD_SOAK_SSE_HOLD=2  (seconds each stream is held open)     the soak scenario
#
# Everything listens on 127.0.0.1 only, every run is bounded in time, and every process this
# script starts is stopped when it exits (trap EXIT).
set -euo pipefail

MODE=${1:-rps}
case "$MODE" in rps | sse | all | keys | syscalls | callgrind | soak) ;; -h | --help) sed -n '2,53p' "$0"; exit 0 ;;
*) echo "usage: bash benches/load.sh [rps|sse|all|keys|syscalls|callgrind|soak]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HERE=$ROOT/benches/load

# LOAD_DB_CPUS: this script (and so all it starts) runs on the CPUs the database does not get.
DB_CPUS=${LOAD_DB_CPUS:-}
if [ -n "$DB_CPUS" ] && [ -z "${LOAD_PINNED_CPUS:-}" ]; then
  command -v taskset >/dev/null || { echo "LOAD_DB_CPUS needs taskset (util-linux)" >&2; exit 2; }
  [ -n "${TEST_DATABASE_URL:-}" ] || { echo "LOAD_DB_CPUS needs TEST_DATABASE_URL (the server to pin)" >&2; exit 2; }
  rest=$(python3 -c 'import os, sys
db = set()
for part in sys.argv[1].split(","):
    a, _, b = part.partition("-")
    db.update(range(int(a), int(b or a) + 1))
rest = sorted(os.sched_getaffinity(0) - db)
if not rest or not db <= os.sched_getaffinity(0):
    sys.exit("LOAD_DB_CPUS=%s leaves no CPU for the rest, or names a CPU this machine does not have" % sys.argv[1])
print(",".join(map(str, rest)))' "$DB_CPUS") || exit 2
  LOAD_PINNED_CPUS=$rest exec taskset -c "$rest" bash "${BASH_SOURCE[0]}" "$@"
fi
DURATION=${LOAD_DURATION:-10}
ROUNDS=${LOAD_ROUNDS:-3}
CONNS=${LOAD_CONNECTIONS:-64}
WRK_THREADS=${LOAD_WRK_THREADS:-1}
WARMUP=${LOAD_WARMUP:-2}
THREADS=${LOAD_THREADS:-2}
LATENCY=${LOAD_LATENCY:-1}
LAT_DELAY_MS=${LOAD_LAT_DELAY_MS:-4}
# The syscall and instruction counts compare the engines, and the soak runs for minutes (a line per
# request would fill the disk): no per-request log unless asked for.
if [[ $MODE == syscalls || $MODE == callgrind || $MODE == soak ]]; then LOGS=${LOAD_LOGS:-off}; else LOGS=${LOAD_LOGS:-on}; fi
CONFIGS=${LOAD_CONFIGS:-direct nginx bare hyper tollgate-sqlite tollgate-pg}
[ "$MODE" != soak ] || CONFIGS=tollgate-pg # the soak is tollgate on PostgreSQL only
want() { [[ " $CONFIGS " == *" $1 "* ]]; }
SSE_STREAMS=${SSE_STREAMS:-500}
SSE_HOLD=${SSE_HOLD_SECS:-10}
SSE_SEQ=${SSE_SEQUENTIAL:-50}
KEYS_N=${KEYS_N:-100000}
KEYS_SECS=${KEYS_SECS:-20}
KEYS_DB=${KEYS_DB:-sqlite}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${LOAD_OUT:-$TARGET/load}
PY=${PYTHON:-python3}
REPORT="$PY $HERE/report.py"

log() { printf '[load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- tools --------------------------------------------------------------------------------------
find_nginx() { command -v nginx 2>/dev/null || { [ -x /usr/sbin/nginx ] && echo /usr/sbin/nginx; } || true; }
command -v "$PY" >/dev/null || die "python3 is required"
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
[ -n "$(find_nginx)" ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "${missing[@]}" >&2 ||
    { $SUDO apt-get update -q >&2 && $SUDO apt-get install -y -q "${missing[@]}" >&2; } ||
    log "apt-get could not install ${missing[*]}"
  # One that failed may be installable alone (nginx is optional, wrk is not).
  command -v wrk >/dev/null || $SUDO apt-get install -y -q wrk >&2 || true
fi
command -v wrk >/dev/null || die "wrk is required and could not be installed"
command -v curl >/dev/null || die "curl is required and could not be installed"
NGINX=$(find_nginx)
[ "${LOAD_NO_NGINX:-0}" != 1 ] || NGINX="" # as if nginx could not be installed
[ -n "$NGINX" ] || log "nginx is not available: the nginx configurations are skipped and the upstream is Python (slow)"

# --- build --------------------------------------------------------------------------------------
if [ "${LOAD_SKIP_BUILD:-0}" != 1 ] && [ "$MODE" = soak ]; then
  log "cargo build --release --bin tollgate (fat LTO: minutes on a cold tree)"
  (cd "$ROOT" && cargo build --release --bin tollgate)
elif [ "${LOAD_SKIP_BUILD:-0}" != 1 ]; then
  log "cargo build --release --bin tollgate --example bare_proxy --example bare_hyper (fat LTO: minutes on a cold tree)"
  (cd "$ROOT" && cargo build --release --bin tollgate --example bare_proxy --example bare_hyper)
fi
TG=$TARGET/release/tollgate
BARE=$TARGET/release/examples/bare_proxy
HYPER=$TARGET/release/examples/bare_hyper
if [[ $MODE != rps || " $CONFIGS " == *" tollgate-"* ]]; then
  [ -x "$TG" ] || die "$TG is missing (build it, or unset LOAD_SKIP_BUILD)"
fi
# rps, soak, syscalls and callgrind run only the configured proxies; the other modes need both.
needs() { case $MODE in rps | soak | syscalls | callgrind) want "$1" ;; *) true ;; esac; }
if needs bare; then
  [ -x "$BARE" ] || die "$BARE is missing (build it, or unset LOAD_SKIP_BUILD)"
fi
if needs hyper; then
  [ -x "$HYPER" ] || die "$HYPER is missing (build it, or unset LOAD_SKIP_BUILD)"
fi

# --- stages: what LOAD_FEATURES turns on ----------------------------------------------------------
# A stage is a piece of tollgate's request path that a config setting switches on (rate limits,
# spend admission, path normalisation, header limits, ...). Each is ONE line here:
#
#   stage NAME CRITERION_ID 'TOML'
#
# NAME is what LOAD_FEATURES names; CRITERION_ID is the stage's criterion bench
# (`group/function`, read from $CARGO_TARGET_DIR/criterion/.../new/estimates.json; "-" if none);
# TOML is merged into the generated tollgate config (a table that already exists there, such as
# [server], gets the keys; a new table is appended). With LOAD_FEATURES set, every tollgate
# configuration also runs once per named stage with that stage alone on ("tollgate-pg+NAME"), in
# the same interleaved rounds, and the report's per-stage budget table gives its ns (criterion)
# and its µs of CPU per request (on − off).
declare -A STAGE_TOML=() STAGE_BENCH=() STAGE_SETUP=()
STAGES=()
stage() { STAGES+=("$1"); STAGE_BENCH[$1]=$2; STAGE_TOML[$1]=$3; }
# A stage whose state lives in the database names a setup function in STAGE_SETUP[NAME]: it gets
# the base configuration's name and the stage variant's, and sets KEY[variant] (the key wrk sends).
# Rate limits: a generous limit of every kind on every key (never refuses), so each request pays
# the whole admission (rpm, rpd, tpm on the body's estimate, concurrency) and the settlement.
stage rate_limits rate_limit/check $'[limits]\nrpm = 1000000000\nrpd = 1000000000\ntpm = 1000000000\nmax_concurrent = 1000000'
# The same limits shared through the local Redis (LOAD_REDIS_URL): one round trip per request
# (admission) plus the settlement and release the worker batches; the latency phase reports the
# p50/p99 it adds.
# Spend control: the variant's key belongs to a user with a credit balance and a daily cost budget
# (both far above what a run spends), so each request pays the whole admission from the leases
# held (worst case reserved against two pools) and its settlement: a ledger row and the budget's
# spent in the usage write's transaction.
stage spend spend/admit ''
STAGE_SETUP[spend]=spend_setup
spend_setup() { # BASE VARIANT
  local cfg=$T/$1.toml
  "$TG" --config "$cfg" users add --email spend@example.com --username spend >/dev/null 2>>"$T/cli.log" ||
    die "tollgate users add failed: $(tail -3 "$T/cli.log")"
  KEY[$2]=$("$TG" --config "$cfg" keys create --user spend@example.com --name spend 2>>"$T/cli.log" | tail -1)
  "$TG" --config "$cfg" credits grant --user spend@example.com --amount 1000000000 >/dev/null 2>>"$T/cli.log" &&
    "$TG" --config "$cfg" budgets set --user spend@example.com --metric cost --limit 1000000000 --period day \
      >/dev/null 2>>"$T/cli.log" || die "spend setup failed: $(tail -3 "$T/cli.log")"
}
stage rate_limits_redis - $'[limits]\nrpm = 1000000000\nrpd = 1000000000\ntpm = 1000000000\nmax_concurrent = 1000000\nredis_url = "'"${LOAD_REDIS_URL:-redis://127.0.0.1:6379}"$'"\nredis_key_prefix = "tollgate-load:"'

FEATURES=()
UNKNOWN_FEATURES=()
for f in ${LOAD_FEATURES:-}; do
  if [ "$f" = all ]; then FEATURES+=("${STAGES[@]+"${STAGES[@]}"}"); continue; fi
  if [ -n "${STAGE_BENCH[$f]+x}" ]; then FEATURES+=("$f"); else UNKNOWN_FEATURES+=("$f"); fi
done
if [ ${#UNKNOWN_FEATURES[@]} -gt 0 ]; then
  log "LOAD_FEATURES: not a defined stage, ignored: ${UNKNOWN_FEATURES[*]} (defined: ${STAGES[*]:-none yet})"
fi
if [ -n "${LOAD_FEATURES:-}" ] && [ ${#FEATURES[@]} = 0 ]; then
  log "LOAD_FEATURES: no stages are defined yet; tollgate runs with every stage off (the baseline)"
fi

# --- process bookkeeping and cleanup ------------------------------------------------------------
T=$(mktemp -d /tmp/tollgate-load.XXXXXX)
PIDS=()
PG_DB=""
PG_ADMIN_URL=${TEST_DATABASE_URL:-}
PG_AFFINITY="" # the PostgreSQL server's CPU list before LOAD_DB_CPUS pinned it (put back at exit)
postmaster_pid() { # the PostgreSQL server's main process: the parent of its checkpointer
  local ck
  ck=$(psql "$PG_ADMIN_URL" -qXAt -c "select pid from pg_stat_activity where backend_type = 'checkpointer'" 2>/dev/null) || return 1
  [ -n "$ck" ] && ps -o ppid= -p "$ck" | tr -d ' '
}
pin_postgres() { # CPULIST: the server and every process it has forked (its backends inherit it)
  local pm p
  pm=$(postmaster_pid) || return 1
  for p in $pm $(pgrep -P "$pm"); do taskset -a -p -c "$1" "$p" >/dev/null 2>&1 || true; done
}
cleanup() {
  set +e
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.3
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  if [ -n "$PG_DB" ]; then
    psql "$PG_ADMIN_URL" -qXc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 &&
      log "dropped database $PG_DB"
  fi
  [ -z "$PG_AFFINITY" ] || pin_postgres "$PG_AFFINITY"
  if [ "${LOAD_KEEP_TMP:-0}" = 1 ]; then log "kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget() { # PID: no longer ours to stop
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

stop() { # PID SIGNAL SECONDS -> 0 if it exited by itself within SECONDS, 1 if it had to be killed
  local pid=$1 sig=$2 secs=$3 i
  kill "-$sig" "$pid" 2>/dev/null || { forget "$pid"; wait "$pid" 2>/dev/null || true; return 0; }
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  local rc=0
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; rc=1; fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
  return $rc
}

ticks() { # PID -> utime+stime in clock ticks (0 if gone)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo $((${12} + ${13}))
}
utime_stime() { # PID -> "utime stime" in clock ticks ("0 0" if gone)
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo "0 0"; return; }
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  echo "${12} ${13}"
}
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

wait_tcp() { # PORT SECONDS
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}
wait_http() { # URL SECONDS PID
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$3" 2>/dev/null || return 1
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}
port() { $REPORT freeport; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT"
RESULTS=$T/results.jsonl
: >"$RESULTS"
HZ=$(getconf CLK_TCK)
unset TOLLGATE_DATABASE_URL TOLLGATE_CONFIG TOLLGATE_ADMIN_TOKEN
if [ "$LOGS" = on ]; then RUST_LOG_LEVEL=info; ACCESS_LOG="access_log $T/nginx-proxy.access.log;"
else RUST_LOG_LEVEL=warn; ACCESS_LOG="access_log off;"; fi

# --- the static upstream ------------------------------------------------------------------------
NGX_TMP="client_body_temp_path $T/ngx/body; proxy_temp_path $T/ngx/proxy; fastcgi_temp_path $T/ngx/fcgi; uwsgi_temp_path $T/ngx/uwsgi; scgi_temp_path $T/ngx/scgi;"
mkdir -p "$T/ngx"
up_stats() { # -> "requests connections" the upstream has served and accepted so far
  local body
  body=$(curl -s -m 5 "http://127.0.0.1:$UP/__stats")
  if [ "$STATS_SELF" = 1 ]; then
    echo "$body" | awk 'NR == 3 {print $3, $1}'
  else
    echo "$body" | "$PY" -c 'import json, sys; s = json.load(sys.stdin); print(s["requests"], s["conns"])'
  fi
}
start_upstream() { # the JSON upstream of the throughput scenario -> UP, UP_PID, STATS_SELF, UP_KIND
  UP=$(port)
  if [ -n "$NGINX" ]; then
    # master_process off: the one process is the worker, so its CPU and memory are the server's.
    cat >"$T/nginx-up.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $T/nginx-up.pid;
error_log $T/nginx-up.err warn;
events { worker_connections 8192; }
http {
  access_log off;
  $NGX_TMP
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  server {
    listen 127.0.0.1:$UP backlog=4096;
    location = /__stats { stub_status; }
    location / { default_type application/json; return 200 '$(cat "$HERE/response.json")'; }
  }
}
EOF
    "$NGINX" -p "$T/ngx" -e "$T/nginx-up.err" -c "$T/nginx-up.conf" >"$T/nginx-up.out" 2>&1 &
    UP_PID=$!
    STATS_SELF=1 # stub_status counts the request that asks
    UP_KIND="nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), 1 worker, fixed JSON"
  else
    "$PY" "$HERE/upstream.py" --port "$UP" --mode json >"$T/upstream.log" 2>&1 &
    UP_PID=$!
    STATS_SELF=0
    UP_KIND="Python asyncio (benches/load/upstream.py), fixed JSON"
  fi
  PIDS+=("$UP_PID")
  wait_http "http://127.0.0.1:$UP/__stats" 10 "$UP_PID" ||
    die "the upstream did not start: $(cat "$T"/nginx-up.err "$T"/upstream.log 2>/dev/null | tail -5)"
  log "upstream: $UP_KIND on 127.0.0.1:$UP"
}
UP=""; UP_PID=""; STATS_SELF=0; UP_KIND=""

# --- tollgate databases -------------------------------------------------------------------------
declare -A DB_URL KEY
tg_config() { # NAME URL UPSTREAM_PORT -> writes $T/NAME.toml with fresh ports, sets TG_PORT, TG_METRICS
  TG_PORT=$(port); TG_METRICS=$(port)
  cat >"$T/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$TG_PORT"
threads = $THREADS
grace_period_secs = 10

[database]
url = "$2"

[metrics]
listen = "127.0.0.1:$TG_METRICS"

[admin]
listen = "127.0.0.1:$(port)"

[writer]
spool_dir = "$T/spool-$1"
${LOAD_WRITER_BATCH:+batch_size = $LOAD_WRITER_BATCH}

[prices."gpt-4o-mini"]
input = "0.15"
output = "0.60"
cached_input = "0.075"
EOF
  # NAME+STAGE: that stage on (see `stage` above).
  if [[ $1 == *+* ]]; then
    $REPORT tomlmerge "$T/$1.toml" "${STAGE_TOML[${1#*+}]}" >"$T/$1.toml.new" && mv "$T/$1.toml.new" "$T/$1.toml"
  fi
}
tg_setup() { # NAME URL UPSTREAM_PORT: a user, a key (-> KEY[NAME]) and an account at the upstream
  local cfg=$T/$1.toml
  tg_config "$1" "$2" "$3"
  DB_URL[$1]=$2
  "$TG" --config "$cfg" users add --email bench@example.com --username bench >/dev/null 2>>"$T/cli.log" ||
    die "tollgate users add failed: $(tail -3 "$T/cli.log")"
  KEY[$1]=$("$TG" --config "$cfg" keys create --user bench@example.com --name bench 2>>"$T/cli.log" | tail -1)
  [ -n "${KEY[$1]}" ] || die "tollgate keys create failed: $(tail -3 "$T/cli.log")"
  "$TG" --config "$cfg" accounts add --name upstream --type openai \
    --base-url "http://127.0.0.1:$3" --api-key sk-bench >/dev/null 2>>"$T/cli.log" ||
    die "tollgate accounts add failed: $(tail -3 "$T/cli.log")"
}
count_rows() { # NAME -> "rows rows_with_tokens"
  local url=${DB_URL[${1%%+*}]}
  if [[ $url == sqlite:* ]]; then
    "$PY" - "${url#sqlite://}" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(*c.execute("select count(*), count(case when tokens_used > 0 then 1 end) from usage_records").fetchone())
EOF
  else
    psql "$url" -qXAt -F ' ' -c "select count(*), count(*) filter (where tokens_used > 0) from usage_records"
  fi
}
pg_ticks() { # -> "pid:ticks ..." of the PostgreSQL backends of the bench database
  local pid out=""
  for pid in $(psql "$PG_ADMIN_URL" -qXAt -c "select pid from pg_stat_activity where datname = '$PG_DB' and pid <> pg_backend_pid()" 2>/dev/null); do
    out+="$pid:$(ticks "$pid") "
  done
  echo "$out"
}
pg_delta() { # BEFORE AFTER -> ticks the backends spent in between
  "$PY" -c 'import sys
b = dict(x.split(":") for x in sys.argv[1].split())
a = dict(x.split(":") for x in sys.argv[2].split())
print(sum(int(v) - int(b.get(p, 0)) for p, v in a.items()))' "$1" "$2"
}

ACTIVE=()
for c in direct nginx bare hyper tollgate-sqlite tollgate-pg; do
  want "$c" || continue
  case $c in
    nginx) [ -n "$NGINX" ] || continue ;;
    hyper) [ -x "$HYPER" ] || continue ;;
    tollgate-pg)
      if [ -z "$PG_ADMIN_URL" ]; then
        [[ $MODE == sse || $MODE == keys ]] || log "TEST_DATABASE_URL is not set: tollgate on PostgreSQL is skipped"
        continue
      fi
      command -v psql >/dev/null || { log "psql is missing: tollgate on PostgreSQL is skipped"; continue; } ;;
  esac
  ACTIVE+=("$c")
  if [[ $c == tollgate-* ]]; then
    for f in "${FEATURES[@]+"${FEATURES[@]}"}"; do ACTIVE+=("$c+$f"); done
  fi
done

# --- proxies ------------------------------------------------------------------------------------
WRAP=()         # a command the proxy runs under (callgrind)
READY_SECS=30   # how long a proxy may take to start
NGX_EXTRA=""    # more nginx proxy settings (the SSE scenario: proxy_buffering off)
start_proxy() { # CONFIG -> PROXY_PID PROXY_PORT
  case $1 in
    direct) PROXY_PID=$UP_PID; PROXY_PORT=$UP ;;
    nginx)
      PROXY_PORT=$(port)
      cat >"$T/nginx-proxy.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $T/nginx-proxy.pid;
error_log $T/nginx-proxy.err warn;
events { worker_connections 8192; }
http {
  $ACCESS_LOG
  $NGX_TMP
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  upstream up {
    server 127.0.0.1:$UP;
    keepalive 128;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$PROXY_PORT backlog=4096;
    location / {
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      $NGX_EXTRA
    }
  }
}
EOF
      "${WRAP[@]+"${WRAP[@]}"}" "$NGINX" -p "$T/ngx" -e "$T/nginx-proxy.err" -c "$T/nginx-proxy.conf" >>"$T/nginx-proxy.out" 2>&1 &
      PROXY_PID=$!
      PIDS+=("$PROXY_PID")
      wait_tcp "$PROXY_PORT" "$READY_SECS" || die "nginx (proxy) did not start: $(tail -5 "$T/nginx-proxy.err")"
      ;;
    bare)
      PROXY_PORT=$(port)
      BARE_LISTEN=127.0.0.1:$PROXY_PORT BARE_UPSTREAM=127.0.0.1:$UP BARE_THREADS=$THREADS \
        RUST_LOG=$RUST_LOG_LEVEL "${WRAP[@]+"${WRAP[@]}"}" "$BARE" >>"$T/bare.log" 2>&1 &
      PROXY_PID=$!
      PIDS+=("$PROXY_PID")
      wait_tcp "$PROXY_PORT" "$READY_SECS" || die "bare_proxy did not start: $(tail -5 "$T/bare.log")"
      ;;
    hyper)
      PROXY_PORT=$(port)
      BARE_LISTEN=127.0.0.1:$PROXY_PORT BARE_UPSTREAM=127.0.0.1:$UP BARE_THREADS=$THREADS \
        "${WRAP[@]+"${WRAP[@]}"}" "$HYPER" >>"$T/hyper.log" 2>&1 &
      PROXY_PID=$!
      PIDS+=("$PROXY_PID")
      wait_tcp "$PROXY_PORT" "$READY_SECS" || die "bare_hyper did not start: $(tail -5 "$T/hyper.log")"
      ;;
    tollgate-*)
      tg_config "$1" "${DB_URL[${1%%+*}]}" "$UP"
      PROXY_PORT=$TG_PORT
      RUST_LOG=$RUST_LOG_LEVEL "${WRAP[@]+"${WRAP[@]}"}" "$TG" --config "$T/$1.toml" serve >"$T/$1.log" 2>&1 &
      PROXY_PID=$!
      PIDS+=("$PROXY_PID")
      wait_http "http://127.0.0.1:$TG_METRICS/readyz" "$READY_SECS" "$PROXY_PID" ||
        die "tollgate ($1) did not become ready: $(tail -5 "$T/$1.log")"
      ;;
  esac
}
stop_proxy() { # CONFIG -> 0 if it stopped by itself
  case $1 in
    direct) return 0 ;;
    nginx) stop "$PROXY_PID" QUIT 10 ;;
    bare | hyper) stop "$PROXY_PID" TERM 10 ;;
    tollgate-*) stop "$PROXY_PID" TERM 40 ;; # SIGTERM: the writer flushes before exit
  esac
}

lua_script() { # FILE KEY [DELAY_MS]
  cat >"$1" <<EOF
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $2"
function done(s, latency, requests)
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    s.requests, s.duration, s.bytes, s.errors.connect, s.errors.read, s.errors.write, s.errors.status, s.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max))
end
EOF
  [ -z "${3:-}" ] || printf 'function delay() return %s end\n' "$3" >>"$1"
}

RUN=0
run_one() { # PHASE CONFIG ROUND CONNS SCRIPT [extra k=v ...]
  local phase=$1 config=$2 round=$3 conns=$4 script=$5
  shift 5
  local url pid extra=() before=() warm="" p0 p1 u0 u1 g0="" g1="" hwm clean=1
  RUN=$((RUN + 1))
  start_proxy "$config"
  pid=$PROXY_PID
  url="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
  local threads=$((WRK_THREADS < conns ? WRK_THREADS : conns))
  local up0 up1
  read -r -a up0 <<<"$(up_stats)"
  [[ $config != tollgate-* ]] || read -r -a before <<<"$(count_rows "$config")"
  if [ "$WARMUP" != 0 ]; then
    warm=$T/run$RUN.warm
    wrk -t"$threads" -c"$conns" -d"${WARMUP}s" --latency -s "$script" "$url" >"$warm" 2>&1 || true
  fi
  p0=$(ticks "$pid"); u0=$(ticks "$UP_PID")
  local us0 us1
  read -r -a us0 <<<"$(utime_stime "$pid")"
  [ "${config%%+*}" = tollgate-pg ] && g0=$(pg_ticks)
  wrk -t"$threads" -c"$conns" -d"${DURATION}s" --latency -s "$script" "$url" >"$T/run$RUN.wrk" 2>&1 ||
    { cat "$T/run$RUN.wrk" >&2; die "wrk failed ($config)"; }
  p1=$(ticks "$pid"); u1=$(ticks "$UP_PID")
  read -r -a us1 <<<"$(utime_stime "$pid")"
  [ "${config%%+*}" = tollgate-pg ] && { g1=$(pg_ticks); extra+=("db_ticks=$(pg_delta "$g0" "$g1")"); }
  hwm=$(hwm_kb "$pid")
  [ "$config" = direct ] || extra+=("proxy_ticks=$((p1 - p0))" "hwm_kb=$hwm"
    "proxy_user_ticks=$((us1[0] - us0[0]))" "proxy_sys_ticks=$((us1[1] - us0[1]))")
  stop_proxy "$config" || clean=0
  # Between the two queries: what the run sent, plus the first query (stub_status counts the
  # query that asks) and the second query's connection.
  read -r -a up1 <<<"$(up_stats)"
  extra+=("upstream_served=$((up1[0] - up0[0] - STATS_SELF))" "upstream_conns=$((up1[1] - up0[1] - 1))")
  if [[ $config == tollgate-* ]]; then
    local after
    read -r -a after <<<"$(count_rows "$config")"
    extra+=("rows=$((after[0] - before[0]))" "metered=$((after[1] - before[1]))" "stopped_cleanly=$clean")
    [ -z "$warm" ] || extra+=("warm=$warm")
    # Say what tollgate complained about (the first lines and how many), without the colours.
    sed 's/\x1b\[[0-9;]*m//g' "$T/$config.log" | grep -E ' (ERROR|WARN) ' | grep -v 'admin API is off' >"$T/$config.warn" || true
    if [ -s "$T/$config.warn" ]; then
      log "$config logged $(wc -l <"$T/$config.warn") ERROR/WARN lines, e.g.:"
      sort -k3 "$T/$config.warn" | uniq -c -f2 | sort -rn | head -3 | cut -c1-220 >&2
      extra+=("log_problems=$(wc -l <"$T/$config.warn")")
    fi
    # The request log is large; keep only its end.
    tail -200 "$T/$config.log" >"$T/$config.log.tail" && rm -f "$T/$config.log"
  fi
  $REPORT record "$RESULTS" phase="$phase" config="$config" round="$round" conns="$conns" \
    hz="$HZ" wrk="$T/run$RUN.wrk" upstream_ticks=$((u1 - u0)) "${extra[@]}" "$@" >&2
  rm -f "$T/nginx-proxy.access.log"
}

meta() {
  "$PY" - "$@" <<'EOF'
import json, os, subprocess, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
m = dict(a.split("=", 1) for a in sys.argv[1:])
m.update(nproc=os.cpu_count(), cpu=cpu, mem_gib=round(mem / 1048576, 1), load=open("/proc/loadavg").read().split()[:3])
print(json.dumps(m))
EOF
}

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "$DB_CPUS" ]; then
  pm=$(postmaster_pid) || die "LOAD_DB_CPUS: cannot find the PostgreSQL server of TEST_DATABASE_URL (pg_stat_activity)"
  PG_AFFINITY=$(taskset -c -p "$pm" | sed 's/.*: *//')
  pin_postgres "$DB_CPUS" || die "LOAD_DB_CPUS: could not pin the PostgreSQL server (pid $pm)"
  [ "$(taskset -c -p "$pm" | sed 's/.*: *//')" = "$DB_CPUS" ] ||
    die "LOAD_DB_CPUS: the PostgreSQL server (pid $pm) is still on $(taskset -c -p "$pm" | sed 's/.*: *//')"
  log "PostgreSQL (pid $pm) on CPUs $DB_CPUS (was $PG_AFFINITY), this script and all it starts on $LOAD_PINNED_CPUS"
fi

setup_tollgates() { # a database, user, key and account for each tollgate configuration in ACTIVE
  local c
  for c in "${ACTIVE[@]}"; do
    case $c in
      tollgate-sqlite) tg_setup "$c" "sqlite://$T/bench.db" "$UP" ;;
      tollgate-pg)
        PG_DB=tollgate_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
        psql "$PG_ADMIN_URL" -qXc "CREATE DATABASE $PG_DB" >/dev/null || die "could not create database $PG_DB"
        tg_setup "$c" "$($REPORT pgurl "$PG_ADMIN_URL" "$PG_DB")" "$UP"
        log "database $PG_DB created"
        ;;
      *) continue ;;
    esac
    local f
    for f in "${FEATURES[@]+"${FEATURES[@]}"}"; do
      if [ -n "${STAGE_SETUP[$f]:-}" ]; then "${STAGE_SETUP[$f]}" "$c" "$c+$f"; fi
    done
  done
}

engine_configs() { # the proxies of ACTIVE, without direct and the stage variants
  local c
  for c in "${ACTIVE[@]}"; do [[ $c == direct || $c == *+* ]] || echo "$c"; done
}

# --- scenario 4: system calls per request ---------------------------------------------------------
# For each proxy: a fresh process, 2 s of warm-up, then SYS_SECS of wrk while (1) `strace -c -f`
# is attached to every thread, and in a second fresh process (2) `perf stat` counts the syscall
# tracepoints (far less overhead than strace, so the batching is closer to a normal run). The
# requests are the ones the upstream served in between; logs are off unless LOAD_LOGS is set.
if [ "$MODE" = syscalls ]; then
  command -v strace >/dev/null || die "strace is required (apt-get install strace)"
  SYS_SECS=${SYS_SECS:-5}
  SYS_CONNS=${SYS_CONNECTIONS:-$CONNS}
  start_upstream
  setup_tollgates
  # Software events too: a context switch is a thread going to sleep or being preempted, a page
  # fault is memory touched for the first time (or after mimalloc gave it back).
  SYS_EVENTS=raw_syscalls:sys_enter,context-switches,cpu-migrations,page-faults
  for n in read readv recvfrom recvmsg write writev sendto sendmsg epoll_wait epoll_pwait epoll_ctl \
    futex accept4 close connect getrandom sched_yield setsockopt getsockopt getsockname getpeername \
    mmap munmap madvise mprotect openat pread64 pwrite64 fsync fdatasync ioctl; do
    SYS_EVENTS+=",syscalls:sys_enter_$n"
  done
  HAVE_PERF=0
  perf stat -e "$SYS_EVENTS" -o /dev/null -- true 2>/dev/null && HAVE_PERF=1
  [ $HAVE_PERF = 1 ] || log "perf cannot count the syscall tracepoints here: strace only"
  ANY_KEY=${KEY[tollgate-sqlite]:-${KEY[tollgate-pg]:-tg_nokey_000000000000000000000000000000}}
  for c in $(engine_configs); do
    lua_script "$T/$c.lua" "${KEY[$c]:-$ANY_KEY}"
    for tool in strace perf; do
      [ $tool = strace ] || [ $HAVE_PERF = 1 ] || continue
      start_proxy "$c"
      pid=$PROXY_PID
      url="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
      wrk -t1 -c"$SYS_CONNS" -d2s -s "$T/$c.lua" "$url" >/dev/null 2>&1 || true
      sleep 0.5
      read -r -a s0 <<<"$(up_stats)"
      if [ $tool = strace ]; then
        strace -c -f -qq -p "$pid" -o "$T/sys-$c.strace" 2>>"$T/strace.err" &
      else
        perf stat -x, -e "$SYS_EVENTS" -p "$pid" -o "$T/sys-$c.perf" 2>>"$T/perf.err" &
      fi
      tp=$!
      sleep 1 # attached to every thread before the first request
      log "syscalls: $c under $tool, wrk -t1 -c$SYS_CONNS for ${SYS_SECS}s"
      wrk -t1 -c"$SYS_CONNS" -d"${SYS_SECS}s" --latency -s "$T/$c.lua" "$url" >"$T/sys-$c-$tool.wrk" 2>&1 ||
        { cat "$T/sys-$c-$tool.wrk" >&2; die "wrk failed ($c)"; }
      sleep 0.5
      kill -INT "$tp" 2>/dev/null || true
      wait "$tp" 2>/dev/null || true
      read -r -a s1 <<<"$(up_stats)"
      stop_proxy "$c" || true
      $REPORT sysrecord "$RESULTS" config="$c" tool="$tool" file="$T/sys-$c.$tool" \
        requests=$((s1[0] - s0[0] - STATS_SELF)) wrk="$T/sys-$c-$tool.wrk" >&2
    done
  done
  STAMP=$(date +%Y%m%d-%H%M%S)
  {
    echo "## System calls per request, $(date -u '+%Y-%m-%d %H:%M UTC'), $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "wrk -t1 -c$SYS_CONNS for ${SYS_SECS} s per proxy and tool (after 2 s of warm-up), $THREADS threads (pingora, hyper), logs $LOGS; requests = what the upstream served while the tracer was attached."
    echo
    $REPORT syscalls "$RESULTS"
  } | tee "$OUT/syscalls-$STAMP.md"
  cp "$RESULTS" "$OUT/syscalls-$STAMP.jsonl"
  log "report: $OUT/syscalls-$STAMP.md"
  exit 0
fi

# --- scenario 5: instructions per request (callgrind) ---------------------------------------------
# For each proxy: started under `valgrind --tool=callgrind`, warmed up for 3 s, counters zeroed
# (`callgrind_control -z`), CG_SECS of wrk -cCG_CONNECTIONS, then `callgrind_control -d`: the dump's
# total instructions (Ir, every thread) divided by the requests the upstream served in between.
if [ "$MODE" = callgrind ]; then
  if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    die "valgrind is required (apt-get install valgrind)"
  fi
  CG_SECS=${CG_SECS:-5}
  CG_CONNS=${CG_CONNECTIONS:-8}
  start_upstream
  setup_tollgates
  ANY_KEY=${KEY[tollgate-sqlite]:-${KEY[tollgate-pg]:-tg_nokey_000000000000000000000000000000}}
  READY_SECS=180
  for c in "${ACTIVE[@]}"; do # the stage variants too: a stage's instructions per request
    [ "$c" = direct ] && continue
    lua_script "$T/$c.lua" "${KEY[$c]:-${KEY[${c%%+*}]:-$ANY_KEY}}"
    rm -f "$T/cg-$c.out"*
    WRAP=(valgrind --tool=callgrind --callgrind-out-file="$T/cg-$c.out" --dump-instr=no --compress-strings=no)
    log "callgrind: starting $c under valgrind"
    start_proxy "$c"
    WRAP=()
    pid=$PROXY_PID
    url="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
    wrk -t1 -c"$CG_CONNS" -d3s -s "$T/$c.lua" "$url" >/dev/null 2>&1 || true
    sleep 0.5
    cgc() { callgrind_control "$@" >>"$T/cg.log" 2>&1 || die "callgrind_control $* failed: $(tail -3 "$T/cg.log")"; }
    # First what the process does with nothing to serve (timers, housekeeping threads), per
    # second: a slow process under valgrind serves few requests a second, so that cost is
    # subtracted from the loaded window below (the table shows both).
    cgc -z "$pid"; i0=$(date +%s.%N)
    sleep "$CG_SECS"
    cgc -d "$pid"; i1=$(date +%s.%N) # part .1: idle (a dump also zeroes the counters)
    read -r -a s0 <<<"$(up_stats)"
    cgc -z "$pid"; w0=$(date +%s.%N)
    log "callgrind: $c, wrk -t1 -c$CG_CONNS for ${CG_SECS}s"
    wrk -t1 -c"$CG_CONNS" -d"${CG_SECS}s" --latency -s "$T/$c.lua" "$url" >"$T/cg-$c.wrk" 2>&1 ||
      { cat "$T/cg-$c.wrk" >&2; die "wrk failed ($c)"; }
    sleep 0.5
    read -r -a s1 <<<"$(up_stats)"
    cgc -d "$pid"; w1=$(date +%s.%N) # part .2: loaded
    stop_proxy "$c" || true
    $REPORT cgrecord "$RESULTS" config="$c" file="$T/cg-$c.out.2" idle_file="$T/cg-$c.out.1" \
      idle_secs="$(echo "$i1 - $i0" | bc -l 2>/dev/null || echo "$CG_SECS")" \
      window_secs="$(echo "$w1 - $w0" | bc -l 2>/dev/null || echo "$CG_SECS")" \
      requests=$((s1[0] - s0[0] - STATS_SELF)) wrk="$T/cg-$c.wrk" >&2
    # The loaded dump, for callgrind_annotate.
    cp "$T/cg-$c.out.2" "$OUT/callgrind-$c.out" 2>/dev/null || true
  done
  STAMP=$(date +%Y%m%d-%H%M%S)
  {
    echo "## Instructions per request (callgrind), $(date -u '+%Y-%m-%d %H:%M UTC'), $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "valgrind $(valgrind --version | sed 's/valgrind-//') --tool=callgrind; wrk -t1 -c$CG_CONNS for ${CG_SECS} s after 3 s of warm-up, counters zeroed in between; $THREADS threads, logs $LOGS. Ir = instructions executed in the process (user space, every thread), not the kernel's."
    echo
    $REPORT callgrind "$RESULTS"
    echo
    echo "Where the instructions go: \`callgrind_annotate $OUT/callgrind-CONFIG.out | head -40\` (the loaded window of the last run)."
  } | tee "$OUT/callgrind-$STAMP.md"
  cp "$RESULTS" "$OUT/callgrind-$STAMP.jsonl"
  log "report: $OUT/callgrind-$STAMP.md"
  exit 0
fi

# --- scenario 6: soak (memory over time) ------------------------------------------------------------
# One tollgate on PostgreSQL, one key, full metering, `wrk` at full load for LOAD_SOAK_MINUTES with
# /metrics scraped every LOAD_SOAK_SCRAPE_SECS; RSS (VmRSS) and the served rate every minute. Then
# the load stops (RSS after LOAD_SOAK_IDLE_SECS), then LOAD_SOAK_SSE concurrent SSE streams
# through the same process (an account at a streaming upstream added at a preferred priority), RSS
# once they closed and again after the idle time. At the end (after SIGTERM, so the writer
# flushed): usage rows written == requests the upstreams served, and no request refused.
if [ "$MODE" = soak ]; then
  [ -n "$PG_ADMIN_URL" ] || die "the soak runs on PostgreSQL: set TEST_DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/test)"
  command -v psql >/dev/null || die "psql is required"
  SOAK_MIN=${LOAD_SOAK_MINUTES:-10}
  SOAK_SCRAPE=${LOAD_SOAK_SCRAPE_SECS:-5}
  SOAK_IDLE=${LOAD_SOAK_IDLE_SECS:-60}
  SOAK_SSE=${LOAD_SOAK_SSE:-1000}
  SOAK_SSE_HOLD=${LOAD_SOAK_SSE_HOLD:-2}
  rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
  mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
  start_upstream
  setup_tollgates
  c=tollgate-pg
  lua_script "$T/soak.lua" "${KEY[$c]}"
  start_proxy "$c"
  pid=$PROXY_PID
  metrics_url="http://127.0.0.1:$TG_METRICS/metrics"
  url="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
  rows_at_start=$(count_rows "$c" | cut -d' ' -f1)
  read -r -a s0 <<<"$(up_stats)"
  ROWS_MD=$T/soak-rows.md
  : >"$ROWS_MD"
  row() { echo "| $1 | $2 | $3 | $4 |" >>"$ROWS_MD"; log "soak: $1: RSS $2 MiB, $3 req/s, peak $4 MiB"; }
  row "start (idle)" "$(mib "$(rss_kb "$pid")")" "-" "$(mib "$(hwm_kb "$pid")")"
  if [ "$SOAK_SCRAPE" != 0 ]; then
    (while sleep "$SOAK_SCRAPE"; do curl -s -m 5 -o /dev/null "$metrics_url" || true; done) &
    SCRAPER=$!
    PIDS+=("$SCRAPER")
  fi
  log "soak: wrk -t$WRK_THREADS -c$CONNS for $SOAK_MIN min (pid $pid, /metrics every ${SOAK_SCRAPE}s, logs $LOGS)"
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"$((SOAK_MIN * 60))s" --latency -s "$T/soak.lua" "$url" >"$T/soak.wrk" 2>&1 &
  WRK=$!
  PIDS+=("$WRK")
  t0=$(ticks "$pid"); prev=${s0[0]}; prev_t=$(date +%s.%N)
  for ((m = 1; m <= SOAK_MIN; m++)); do
    sleep 60
    read -r -a s1 <<<"$(up_stats)"
    now=$(date +%s.%N)
    rate=$(awk -v n="$((s1[0] - prev - STATS_SELF))" -v a="$prev_t" -v b="$now" 'BEGIN { printf "%.0f", n / (b - a) }')
    prev=${s1[0]}; prev_t=$now
    row "load, minute $m" "$(mib "$(rss_kb "$pid")")" "$rate" "$(mib "$(hwm_kb "$pid")")"
  done
  wait "$WRK" || { cat "$T/soak.wrk" >&2; die "wrk failed"; }
  forget "$WRK"
  t1=$(ticks "$pid")
  read -r -a s_load <<<"$(up_stats)"
  served_load=$((s_load[0] - s0[0] - (SOAK_MIN + 1) * STATS_SELF)) # stub_status counts each query that asks
  sleep "$SOAK_IDLE"
  row "load stopped, ${SOAK_IDLE} s idle" "$(mib "$(rss_kb "$pid")")" "-" "$(mib "$(hwm_kb "$pid")")"
  sse_served=0; sse_ok=0
  if [ "$SOAK_SSE" != 0 ]; then
    SSE_UP=$(port)
    "$PY" "$HERE/upstream.py" --port "$SSE_UP" --mode sse --hold "$SOAK_SSE_HOLD" --interval 0.5 >"$T/sse-upstream.log" 2>&1 &
    SSE_UP_PID=$!
    PIDS+=("$SSE_UP_PID")
    wait_http "http://127.0.0.1:$SSE_UP/__stats" 10 "$SSE_UP_PID" || die "the SSE upstream did not start"
    # A preferred account at the streaming upstream; the gateway picks it up on its own (NOTIFY).
    "$TG" --config "$T/$c.toml" accounts add --name sse --type openai --priority 0 \
      --base-url "http://127.0.0.1:$SSE_UP" --api-key sk-bench >/dev/null 2>>"$T/cli.log" ||
      die "tollgate accounts add (sse) failed: $(tail -3 "$T/cli.log")"
    for ((i = 0; i < 100; i++)); do
      [ "$(curl -s "http://127.0.0.1:$SSE_UP/__stats" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["requests"])')" != 0 ] && break
      curl -s -m 10 -o /dev/null -H "Authorization: Bearer ${KEY[$c]}" -H 'Content-Type: application/json' \
        -d '{"model":"gpt-4o-mini","messages":[],"stream":true}' "$url?hold=0" || true
      sleep 0.1
    done
    log "soak: $SOAK_SSE concurrent SSE streams held ${SOAK_SSE_HOLD}s"
    timeout $((SOAK_SSE_HOLD + 180)) "$PY" "$HERE/sse_client.py" --url "$url" --key "${KEY[$c]}" \
      --streams "$SOAK_SSE" --hold "$SOAK_SSE_HOLD" --pid "$pid" >"$T/soak-sse.json" || die "sse_client.py failed"
    read -r sse_ok sse_open_kb <<<"$("$PY" -c 'import json,sys; o=json.load(open(sys.argv[1])); print(o["ok"], o.get("rss_all_open_kb") or 0)' "$T/soak-sse.json")"
    row "$SOAK_SSE SSE streams all open" "$(mib "$sse_open_kb")" "-" "-"
    row "after the $SOAK_SSE SSE streams closed ($sse_ok complete)" "$(mib "$(rss_kb "$pid")")" "-" "$(mib "$(hwm_kb "$pid")")"
    sleep "$SOAK_IDLE"
    row "then ${SOAK_IDLE} s idle" "$(mib "$(rss_kb "$pid")")" "-" "$(mib "$(hwm_kb "$pid")")"
    sse_served=$(curl -s "http://127.0.0.1:$SSE_UP/__stats" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
  fi
  read -r -a s_end <<<"$(up_stats)"
  served=$((s_end[0] - s0[0] - (SOAK_MIN + 2) * STATS_SELF + sse_served))
  clean=1
  stop "$pid" TERM 40 || clean=0
  rows=$(($(count_rows "$c" | cut -d' ' -f1) - rows_at_start))
  wrk_req=$(awk '/requests in/ {print $1}' "$T/soak.wrk")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$T/soak.wrk"); non2xx=${non2xx:-0}
  sockerr=$(awk '/Socket errors/ {print}' "$T/soak.wrk")
  cpu_us=$(awk -v t="$((t1 - t0))" -v hz="$HZ" -v n="$served_load" 'BEGIN { printf "%.1f", n ? t / hz * 1e6 / n : 0 }')
  ok=yes; [ "$rows" = "$served" ] && [ "$non2xx" = 0 ] && [ "$clean" = 1 ] && [ "$sse_ok" = "$SOAK_SSE" ] || ok=FAIL
  STAMP=$(date +%Y%m%d-%H%M%S)
  {
    echo "## tollgate soak, $(date -u '+%Y-%m-%d %H:%M UTC'), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "tollgate on PostgreSQL, one key, full metering, $THREADS pingora threads, logs $LOGS, /metrics scraped every ${SOAK_SCRAPE} s (0 = never); wrk -t$WRK_THREADS -c$CONNS for $SOAK_MIN min against $UP_KIND; machine load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
    echo
    echo "| phase | RSS, MiB | req/s (upstream-served, that minute) | peak RSS (VmHWM), MiB |"
    echo "|---|---:|---:|---:|"
    cat "$ROWS_MD"
    echo
    echo "| check | value |"
    echo "|---|---|"
    echo "| requests the upstreams served (JSON under load + SSE streams and probes) | $served |"
    echo "| usage rows written | $rows |"
    echo "| wrk: requests completed, non-2xx | $wrk_req, $non2xx ${sockerr:+($sockerr)} |"
    echo "| tollgate CPU per request under load | $cpu_us µs |"
    echo "| SSE streams complete (200 and \`[DONE]\`) | $sse_ok of $SOAK_SSE |"
    echo "| stopped cleanly on SIGTERM | $([ "$clean" = 1 ] && echo yes || echo no) |"
    echo "| **rows == requests, no non-2xx** | **$ok** |"
  } | tee "$OUT/soak-$STAMP.md"
  log "report: $OUT/soak-$STAMP.md"
  [ "$ok" = yes ] || die "usage rows ($rows) != requests served ($served), or non-2xx ($non2xx), or SSE streams incomplete ($sse_ok of $SOAK_SSE), or not stopped cleanly"
  exit 0
fi

# --- scenario 1: throughput and latency ---------------------------------------------------------
if [ "$MODE" = rps ] || [ "$MODE" = all ]; then
  start_upstream
  setup_tollgates
  ANY_KEY=${KEY[tollgate-sqlite]:-${KEY[tollgate-pg]:-tg_nokey_000000000000000000000000000000}}
  for c in "${ACTIVE[@]}"; do lua_script "$T/$c.lua" "${KEY[$c]:-${KEY[${c%%+*}]:-$ANY_KEY}}"; done

  log "throughput: ${ACTIVE[*]}; $ROUNDS rounds x ${DURATION}s (+${WARMUP}s warm-up), wrk -t$WRK_THREADS -c$CONNS"
  n=${#ACTIVE[@]}
  for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS"
    for ((i = 0; i < n; i++)); do
      c=${ACTIVE[$(((i + r - 1) % n))]} # rotate the order so no configuration always goes first
      run_one rps "$c" "$r" "$CONNS" "$T/$c.lua"
    done
  done

  if [ "$LATENCY" = 1 ]; then
    read -r RATE LAT_CONNS <<<"$($REPORT rate "$RESULTS" "$LAT_DELAY_MS")"
    for c in "${ACTIVE[@]}"; do lua_script "$T/$c.lat.lua" "${KEY[$c]:-${KEY[${c%%+*}]:-$ANY_KEY}}" "$LAT_DELAY_MS"; done
    # wrk's pause timer is coarse: measure what LAT_CONNS paced connections offer to the upstream
    # directly, and scale the connection count to the target once, for every configuration.
    wrk -t"$((WRK_THREADS < LAT_CONNS ? WRK_THREADS : LAT_CONNS))" -c"$LAT_CONNS" -d3s -s "$T/${ACTIVE[0]}.lat.lua" "http://127.0.0.1:$UP/v1/chat/completions" >"$T/calibrate.wrk" 2>&1 || true
    LAT_CONNS=$($REPORT calibrate "$T/calibrate.wrk" "$RATE" "$LAT_CONNS")
    log "latency at half load: about $RATE req/s offered (wrk -c$LAT_CONNS, ${LAT_DELAY_MS} ms pause per connection)"
    for c in "${ACTIVE[@]}"; do
      # the stages are compared at full load only, unless LOAD_LATENCY_STAGES=1
      [[ $c != *+* || ${LOAD_LATENCY_STAGES:-0} = 1 ]] || continue
      run_one lat "$c" 1 "$LAT_CONNS" "$T/$c.lat.lua" target="$RATE" delay_ms="$LAT_DELAY_MS"
    done
  fi
fi

# --- scenario 2: SSE streams --------------------------------------------------------------------
# --- scenario 3: memory with many keys cached -----------------------------------------------------
if [ "$MODE" = keys ]; then
  start_upstream
  if [ "$KEYS_DB" = pg ]; then
    [ -n "$PG_ADMIN_URL" ] || die "KEYS_DB=pg needs TEST_DATABASE_URL"
    PG_DB=tollgate_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
    psql "$PG_ADMIN_URL" -qXc "CREATE DATABASE $PG_DB" >/dev/null || die "could not create database $PG_DB"
    keys_db=$($REPORT pgurl "$PG_ADMIN_URL" "$PG_DB")
    tg_setup tollgate-keys "$keys_db" "$UP"
    keys_target=$keys_db
  else
    tg_setup tollgate-keys "sqlite://$T/keys.db" "$UP"
    keys_target=$T/keys.db
  fi
  log "keys: adding $KEYS_N keys to the database ($KEYS_DB)"
  "$PY" "$HERE/keys.py" "$keys_target" bench@example.com "$KEYS_N" "$T/keys.txt" || die "keys.py failed"
  cat >"$T/keys.lua" <<EOF
local keys = {}
for line in io.lines("$T/keys.txt") do keys[#keys + 1] = line end
local i = 0
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[]}'
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i + 1
  wrk.headers["Authorization"] = "Bearer " .. keys[(i % #keys) + 1]
  return wrk.format()
end
EOF
  start_proxy tollgate-keys
  pid=$PROXY_PID
  rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
  idle_kb=$(rss_kb "$pid")
  log "keys: wrk -t1 -c$CONNS for ${KEYS_SECS}s cycling through $KEYS_N keys (pid $pid)"
  wrk -t1 -c"$CONNS" -d"${KEYS_SECS}s" -s "$T/keys.lua" "http://127.0.0.1:$PROXY_PORT/v1/chat/completions" >"$T/keys.wrk" 2>&1 ||
    { cat "$T/keys.wrk" >&2; die "wrk failed (keys)"; }
  scrape=$(curl -s "http://127.0.0.1:$TG_METRICS/metrics")
  entries=$(echo "$scrape" | awk '/^tollgate_key_cache_entries / {print $2}')
  depth=$(echo "$scrape" | awk '/^tollgate_writer_queue_depth / {print $2}')
  load_kb=$(rss_kb "$pid"); peak_kb=$(hwm_kb "$pid")
  stop_proxy tollgate-keys || true
  rps=$(awk '/Requests\/sec/ {print $2}' "$T/keys.wrk")
  bad=$(awk '/Non-2xx/ {print $NF}' "$T/keys.wrk"); bad=${bad:-0}
  mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
  met=no; [ "$peak_kb" -le $((64 * 1024)) ] && met=yes
  STAMP=$(date +%Y%m%d-%H%M%S)
  {
    echo "## tollgate with many keys cached, $(date -u '+%Y-%m-%d %H:%M') UTC, $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo
    echo "tollgate on $KEYS_DB, $THREADS pingora threads, logs $LOGS; wrk -t1 -c$CONNS for ${KEYS_SECS} s, each request with the next of $KEYS_N keys (every key looked up in the database once, then served from the cache)."
    echo
    echo "| measure | value |"
    echo "|---|---:|"
    echo "| keys in the cache at the end (\`tollgate_key_cache_entries\`) | ${entries:-?} |"
    echo "| req/s (misses included) | $rps |"
    echo "| usage records waiting in the writer queue at the end (\`tollgate_writer_queue_depth\`) | ${depth:-?} |"
    echo "| non-2xx responses | $bad |"
    echo "| RSS idle before, MiB | $(mib "$idle_kb") |"
    echo "| RSS at the end of the load, MiB | $(mib "$load_kb") |"
    echo "| **peak RSS (VmHWM), MiB** | **$(mib "$peak_kb")** |"
    echo
    echo "| goal | met? | measured |"
    echo "|---|---|---|"
    echo "| RSS under full load ≤ 64 MiB with $KEYS_N keys cached | **$met** | peak $(mib "$peak_kb") MiB |"
  } | tee "$OUT/keys-$STAMP.md"
  log "report: $OUT/keys-$STAMP.md"
  [ "$bad" = 0 ] || die "$bad requests were refused: the generated keys did not authenticate"
  exit 0
fi

if [ "$MODE" = sse ] || [ "$MODE" = all ]; then
  SSE_UP=$(port)
  "$PY" "$HERE/upstream.py" --port "$SSE_UP" --mode sse --hold "$SSE_HOLD" >"$T/sse-upstream.log" 2>&1 &
  SSE_UP_PID=$!
  PIDS+=("$SSE_UP_PID")
  UP_KIND="${UP_KIND:+$UP_KIND; }SSE: Python asyncio (benches/load/upstream.py)"
  wait_http "http://127.0.0.1:$SSE_UP/__stats" 10 "$SSE_UP_PID" || die "the SSE upstream did not start: $(tail -5 "$T/sse-upstream.log")"
  tg_setup tollgate-sse "sqlite://$T/sse.db" "$SSE_UP"
  start_proxy tollgate-sse
  TGP=$PROXY_PID
  direct="http://127.0.0.1:$SSE_UP/v1/chat/completions"
  gw="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
  k=${KEY[tollgate-sse]}
  log "SSE: warm-up stream, then $SSE_SEQ streams one at a time (direct, then through tollgate)"
  "$PY" "$HERE/sse_client.py" --url "$gw" --key "$k" --streams 1 --hold 0 >"$T/sse-warm.json"
  "$PY" "$HERE/sse_client.py" --url "$direct" --key "$k" --streams "$SSE_SEQ" --hold 0 --sequential >"$T/sse-direct-seq.json"
  "$PY" "$HERE/sse_client.py" --url "$gw" --key "$k" --streams "$SSE_SEQ" --hold 0 --sequential >"$T/sse-gw-seq.json"
  log "SSE: $SSE_STREAMS concurrent streams held ${SSE_HOLD}s, direct"
  timeout $((SSE_HOLD + 120)) "$PY" "$HERE/sse_client.py" --url "$direct" --key "$k" --streams "$SSE_STREAMS" --hold "$SSE_HOLD" >"$T/sse-direct.json"
  sleep 1
  # The same through each baseline engine: what the engine alone costs per stream. nginx gets
  # `proxy_buffering off` (as an SSE deployment would have), so each event is passed on at once.
  engine_sse=()
  saved_up=$UP
  UP=$SSE_UP
  for e in ${SSE_ENGINES:-nginx bare hyper}; do
    case $e in
      nginx) [ -n "$NGINX" ] || continue; NGX_EXTRA="proxy_buffering off;" ;;
      bare) [ -x "$BARE" ] || continue ;;
      hyper) [ -x "$HYPER" ] || continue ;;
      *) log "SSE_ENGINES: unknown engine $e (nginx, bare, hyper)"; continue ;;
    esac
    start_proxy "$e"
    ep=$PROXY_PID
    eu="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
    log "SSE: $SSE_STREAMS concurrent streams held ${SSE_HOLD}s, through $e (pid $ep)"
    "$PY" "$HERE/sse_client.py" --url "$eu" --key "$k" --streams 1 --hold 0 >/dev/null
    "$PY" "$HERE/sse_client.py" --url "$eu" --key "$k" --streams "$SSE_SEQ" --hold 0 --sequential >"$T/sse-$e-seq.json"
    timeout $((SSE_HOLD + 120)) "$PY" "$HERE/sse_client.py" --url "$eu" --key "$k" --streams "$SSE_STREAMS" --hold "$SSE_HOLD" --pid "$ep" >"$T/sse-$e.json"
    stop_proxy "$e" || true
    NGX_EXTRA=""
    engine_sse+=("$e=$T/sse-$e.json" "${e}_seq=$T/sse-$e-seq.json")
    sleep 1
  done
  UP=$saved_up
  log "SSE: $SSE_STREAMS concurrent streams held ${SSE_HOLD}s, through tollgate (pid $TGP)"
  timeout $((SSE_HOLD + 120)) "$PY" "$HERE/sse_client.py" --url "$gw" --key "$k" --streams "$SSE_STREAMS" --hold "$SSE_HOLD" --pid "$TGP" >"$T/sse-gw.json"
  clean=1
  stop "$TGP" TERM 40 || clean=0
  read -r -a rows <<<"$(count_rows tollgate-sse)"
  $REPORT sse "$RESULTS" direct="$T/sse-direct.json" gateway="$T/sse-gw.json" \
    direct_seq="$T/sse-direct-seq.json" gateway_seq="$T/sse-gw-seq.json" \
    rows="${rows[0]}" metered="${rows[1]}" expected_rows=$((1 + SSE_SEQ + SSE_STREAMS)) stopped_cleanly=$clean \
    "${engine_sse[@]+"${engine_sse[@]}"}" >&2
fi

# --- report -------------------------------------------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M%S)
meta mode="$MODE" rounds="$ROUNDS" duration="$DURATION" warmup="$WARMUP" connections="$CONNS" \
  wrk_threads="$WRK_THREADS" threads="$THREADS" logs="$LOGS" upstream="$UP_KIND" \
  load_before="$LOAD_BEFORE" criterion="$TARGET/criterion" db_cpus="$DB_CPUS" cpus="${LOAD_PINNED_CPUS:-}" \
  stages="$(for n in "${STAGES[@]+"${STAGES[@]}"}"; do printf '%s:%s ' "$n" "${STAGE_BENCH[$n]}"; done)" \
  features="${FEATURES[*]+"${FEATURES[*]}"}" unknown_features="${UNKNOWN_FEATURES[*]+"${UNKNOWN_FEATURES[*]}"}" >"$T/meta.json"
{
  echo "## tollgate load benchmark, $(date -u '+%Y-%m-%d %H:%M UTC'), $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  "$PY" -c 'import json,sys; m=json.load(open(sys.argv[1]))
where = ("PostgreSQL on CPU %s alone; wrk, the upstream and the proxy share CPU %s." % (m["db_cpus"], m["cpus"])) if m.get("db_cpus") else "wrk, the upstream, the proxy and PostgreSQL share these CPUs."
print("Machine: %s CPUs (%s), %s GiB; load average before %s, at the end %s. Upstream: %s. Proxies: %s threads (pingora, hyper), logs %s. %s" % (m["nproc"], m["cpu"], m["mem_gib"], m["load_before"], " ".join(m["load"]), m["upstream"], m["threads"], m["logs"], where))' "$T/meta.json"
  echo
  $REPORT summary "$RESULTS" "$T/meta.json"
  echo
  echo "Total time: $(($(date +%s) - START)) s (after the build)."
} >"$OUT/load-$STAMP.md"
cp "$RESULTS" "$OUT/load-$STAMP.jsonl"
cat "$OUT/load-$STAMP.md"
log "report: $OUT/load-$STAMP.md (raw runs: $OUT/load-$STAMP.jsonl)"
if grep -q 'usage rows: FAIL\|| FAIL' "$OUT/load-$STAMP.md"; then
  log "a usage-row check FAILED"
  exit 1
fi
