#!/usr/bin/env bash
# The OpenAPI document against the server it describes: schemathesis (PyPI)
# sends what the document allows (and what it forbids) to a running
# dispatcher with an API key configured, and fails on any answer the document
# does not describe: a 5xx, an undocumented status, header or content type, a
# body off its schema, valid data refused, invalid data accepted, a route
# that ignores the key.
#
#   scripts/schemathesis.sh            # after `eval "$(scripts/services.sh)"`
#
# Uses the debug dispatcher (built if missing), its own queue and Redis
# prefix (removed afterwards), and no rate limit (the fuzzer's burst is not
# a client to slow down). Installs schemathesis with pip when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "schemathesis.sh: $*" >&2; }
VERSION=4.32.5
if ! command -v schemathesis >/dev/null || [ "$(schemathesis --version | awk '{print $3}')" != "$VERSION" ]; then
  log "installing schemathesis $VERSION (pip)"
  python3 -m pip install -q "schemathesis==$VERSION" >&2
fi
cargo build -q -p dispatcher
PORT=${SCHEMATHESIS_PORT:-18090}
KEY="schemathesis-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
QUEUE="schemathesis.$$"
PREFIX="schemathesis-$$"
# Webhook targets are taken without a DNS lookup (SDXL_WEBHOOK_ALLOW_PRIVATE):
# the fuzzer's host names would each cost a lookup that fails, against a 1 s
# request timeout; tests/tests/integrations.rs checks the refusals.
SDXL_API_KEYS="fuzzer:$KEY" SDXL_RATE_LIMIT=0 SDXL_QUEUE="$QUEUE" SDXL_REDIS_PREFIX="$PREFIX" \
  SDXL_WEBHOOK_ALLOW_PRIVATE=1 \
  SDXL_LISTEN="127.0.0.1:$PORT" AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-sdxl-local}" \
  AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-sdxl-local-secret}" RUST_LOG=warn \
  "${CARGO_TARGET_DIR:-target}/debug/dispatcher" serve >"${TMPDIR:-/tmp}/schemathesis-dispatcher.log" 2>&1 &
PID=$!
cleanup() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  # the job queue, its dead letters, the webhook queues
  rabbitmqctl -q list_queues name 2>/dev/null | grep -F "$QUEUE" | while read -r q; do
    rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  sleep 0.1
done
# The coverage phase walks every documented value and boundary; fuzzing
# draws 50 more cases per operation. Events of a queued job stream until the
# request timeout (no worker runs here): 1 s keeps the run short. One
# worker: with several, hypothesis parses lambda sources on several threads
# and CPython 3.11's AST recursion check trips on the race ("AST constructor
# recursion depth mismatch", seen on GET /v1/jobs); one is no slower here.
schemathesis --config-file scripts/schemathesis.toml run "http://127.0.0.1:$PORT/openapi.json" \
  --checks all --phases coverage,fuzzing --max-examples 50 --workers "${SCHEMATHESIS_WORKERS:-1}" \
  --request-timeout 1 -H "Authorization: Bearer $KEY" --seed 1 "$@"
