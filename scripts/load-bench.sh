#!/usr/bin/env bash
# The dispatcher's own capacity on loopback (P5): a release build of
# `dispatcher serve` against the real RabbitMQ and Redis, driven by wrk:
#
#   1. POST /v1/jobs       submits per second, p50 and p99 latency;
#   2. GET  /v1/jobs/{id}  status reads per second, p50 and p99 latency.
#
# No worker runs: the submits only pile up in a queue of the bench's own
# (`bench.<tag>`, Redis prefix the same), which is deleted afterwards with
# its dead-letter queue and exchange and its Redis keys.
#
# Prints a Markdown table with the machine and checks the figures against
# the targets (at least 2,000 submits/s with p99 under 20 ms; at least
# 10,000 status reads/s), PASS or MISS each. A missed target does not fail
# the script; a dispatcher that exits, a non-2xx answer or a socket error does.
#
#   scripts/load-bench.sh                      # defaults below
#   BENCH_DURATION=30s BENCH_SUBMIT_CONNECTIONS=32 scripts/load-bench.sh
#   BENCH_DISPATCHER=/tmp/dispatcher-before scripts/load-bench.sh   # A/B: that binary, no build
#   BENCH_PROFILE=debug scripts/load-bench.sh   # the dev build (dependencies at opt-level 3,
#                                               # our crates not optimized): what CI runs, as
#                                               # it has that build already and a release
#                                               # build of every dependency costs CI ~14 min
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${BENCH_DURATION:-10s}"
THREADS="${BENCH_THREADS:-1}"
SUBMIT_CONNECTIONS="${BENCH_SUBMIT_CONNECTIONS:-4}"
STATUS_CONNECTIONS="${BENCH_STATUS_CONNECTIONS:-16}"
TARGET_SUBMITS=2000
TARGET_SUBMIT_P99_MS=20
TARGET_STATUS_READS=10000

log() { echo "load-bench: $*" >&2; }

if ! command -v wrk >/dev/null; then
  log "installing wrk (apt)"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >&2
fi
eval "$(scripts/services.sh)"

BIN="${BENCH_DISPATCHER:-}"
PROFILE="${BENCH_PROFILE:-release}"
case "$PROFILE" in
  release) BUILD="release build" ;;
  debug) BUILD="dev build (dependencies at opt-level 3, our crates not optimized)" ;;
  *) log "BENCH_PROFILE=$PROFILE: allowed values are release, debug"; exit 2 ;;
esac
if [[ -n "$BIN" ]]; then
  BUILD="$BIN"
else
  log "building the dispatcher ($PROFILE)"
  if [[ "$PROFILE" == release ]]; then
    cargo build --release -p dispatcher >&2
  else
    cargo build -p dispatcher >&2
  fi
  BIN="${CARGO_TARGET_DIR:-target}/$PROFILE/dispatcher"
fi
WORK="$(mktemp -d /tmp/load-bench.XXXXXX)"
# A private copy: a concurrent build cannot swap the binary mid-run.
cp "$BIN" "$WORK/dispatcher"

TAG="bench.$(date +%s).$RANDOM"
PID=""
cleanup() {
  if [[ -n "$PID" ]] && kill -0 "$PID" 2>/dev/null; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  rabbitmqctl -q delete_queue "$TAG" >/dev/null 2>&1 || log "could not delete queue $TAG"
  rabbitmqctl -q delete_queue "$TAG.dead" >/dev/null 2>&1 || log "could not delete queue $TAG.dead"
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$TAG.dlx\">>), false, <<\"load-bench\">>)." \
    >/dev/null 2>&1 || log "could not delete exchange $TAG.dlx"
  redis-cli --scan --pattern "$TAG:*" | xargs -r -n 500 redis-cli del >/dev/null || log "could not delete Redis keys $TAG:*"
  rm -rf "$WORK"
}
trap cleanup EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=""
for _ in $(seq 50); do
  candidate=$((20000 + RANDOM % 30000))
  listening "$candidate" || { PORT="$candidate"; break; }
done
[[ -n "$PORT" ]] || { log "no free port"; exit 1; }
BASE="http://127.0.0.1:$PORT"

# warn: the per-submit `job queued` line at info would be measured too.
SDXL_QUEUE="$TAG" SDXL_REDIS_PREFIX="$TAG" SDXL_STATUS_TTL=1h \
  SDXL_RATE_LIMIT=0 SDXL_MAX_QUEUE_DEPTH=0 RUST_LOG="${BENCH_RUST_LOG:-warn}" \
  "$WORK/dispatcher" serve --listen "127.0.0.1:$PORT" >"$WORK/dispatcher.log" 2>&1 &
PID=$!
for i in $(seq 300); do
  curl -fsS "$BASE/healthz" >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { log "the dispatcher exited:"; cat "$WORK/dispatcher.log" >&2; exit 1; }
  [[ $i -lt 300 ]] || { log "the dispatcher did not become healthy"; cat "$WORK/dispatcher.log" >&2; exit 1; }
  sleep 0.1
done

cat >"$WORK/submit.lua" <<'LUA'
-- A distinct small job per request (the seed and the prompt change).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = string.format(
    '{"prompt":"bench job %d","width":256,"height":256,"num_inference_steps":1,"seed":%d,"preview_every":0}', n, n)
  return wrk.format(nil, nil, nil, body)
end
LUA

# Milliseconds from wrk's units (us, ms, s).
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.2f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.2f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.2f", v * 1000 }
    else { printf "%s", v } }'
}

# run NAME CONNECTIONS URL [wrk args...]: sets RPS, P50, P99, REQUESTS.
run() {
  local name="$1" conns="$2" url="$3"
  shift 3
  local out="$WORK/$name.txt"
  log "$name: wrk -t$THREADS -c$conns -d$DURATION --latency $* $url"
  wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency "$@" "$url" >"$out"
  cat "$out" >&2
  if ! kill -0 "$PID" 2>/dev/null; then
    log "the dispatcher exited during $name:"
    cat "$WORK/dispatcher.log" >&2
    exit 1
  fi
  if grep -q "Non-2xx or 3xx responses" "$out"; then
    log "$name: wrk got non-2xx answers"
    tail -20 "$WORK/dispatcher.log" >&2
    exit 1
  fi
  if grep -q "Socket errors" "$out"; then
    log "$name: wrk reports socket errors"
    exit 1
  fi
  RPS="$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")"
  REQUESTS="$(awk '/requests in/ {print $1}' "$out")"
  P50="$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")"
  P99="$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")"
}

# A short warm-up: connections, the channel, the allocator.
wrk -t1 -c4 -d2s -s "$WORK/submit.lua" "$BASE/v1/jobs" >/dev/null

run submit "$SUBMIT_CONNECTIONS" "$BASE/v1/jobs" -s "$WORK/submit.lua"
S_RPS="$RPS" S_P50="$P50" S_P99="$P99" S_N="$REQUESTS"

ID="$(curl -fsS -X POST -H 'Content-Type: application/json' \
  -d '{"prompt":"bench status","width":256,"height":256,"num_inference_steps":1,"seed":1}' \
  "$BASE/v1/jobs" | grep -o '"id":"[0-9a-f-]*"' | head -1 | cut -d'"' -f4)"
[[ -n "$ID" ]] || { log "no job id from the submit"; exit 1; }
run status "$STATUS_CONNECTIONS" "$BASE/v1/jobs/$ID"
R_RPS="$RPS" R_P50="$P50" R_P99="$P99" R_N="$REQUESTS"

verdict() { # ok?
  if [[ "$1" == 1 ]]; then echo PASS; else echo MISS; fi
}
S_OK="$(awk -v r="$S_RPS" -v p="$S_P99" -v tr="$TARGET_SUBMITS" -v tp="$TARGET_SUBMIT_P99_MS" \
  'BEGIN {print (r >= tr && p < tp) ? 1 : 0}')"
R_OK="$(awk -v r="$R_RPS" -v tr="$TARGET_STATUS_READS" 'BEGIN {print (r >= tr) ? 1 : 0}')"
CPU="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"

cat <<EOF

### Dispatcher capacity: $(nproc) cores ($CPU), $(date -u +%Y-%m-%d)

wrk 4.1, $THREADS thread, $DURATION per run; dispatcher $BUILD, RUST_LOG=${BENCH_RUST_LOG:-warn}; RabbitMQ, Redis and wrk on the same cores.

| what | connections | requests | per second | p50 | p99 | target | |
|---|---:|---:|---:|---:|---:|---|---|
| \`POST /v1/jobs\` (submit) | $SUBMIT_CONNECTIONS | $S_N | $S_RPS | $S_P50 ms | $S_P99 ms | ≥ $TARGET_SUBMITS/s, p99 < $TARGET_SUBMIT_P99_MS ms | $(verdict "$S_OK") |
| \`GET /v1/jobs/{id}\` (status) | $STATUS_CONNECTIONS | $R_N | $R_RPS | $R_P50 ms | $R_P99 ms | ≥ $TARGET_STATUS_READS/s | $(verdict "$R_OK") |

EOF
log "submits $S_RPS/s (p50 $S_P50 ms, p99 $S_P99 ms): $(verdict "$S_OK"); status reads $R_RPS/s (p50 $R_P50 ms, p99 $R_P99 ms): $(verdict "$R_OK")"
