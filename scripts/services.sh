#!/usr/bin/env bash
# Starts what a fresh machine lacks for the tests and for local use, and prints
# the environment to use as `export NAME=value` lines on stdout:
#
#   eval "$(scripts/services.sh)"
#
# - RabbitMQ (5672) and Redis (6379), only when nothing listens on their port;
# - s3s-fs 0.14.1, an S3 server that really checks request signatures, built
#   from crates.io once (cached in $S3S_FS_ROOT/bin) and started on $S3_PORT.
#
# Everything it says goes to stderr, so stdout stays machine-readable.
# Idempotent: running it twice starts nothing twice.
set -euo pipefail

log() { echo "services.sh: $*" >&2; }

S3_PORT="${S3_PORT:-8014}"
S3S_FS_VERSION="0.14.1"
STATE_DIR="${SDXL_SERVICES_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/sdxl-queue}"
S3S_FS_ROOT="${S3S_FS_ROOT:-$HOME/.cache/sdxl-queue/s3s-fs-$S3S_FS_VERSION}"
S3_DATA="$STATE_DIR/s3-data"
# Local-only credentials: the S3 server is bound to loopback.
AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-sdxl-local}"
AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-sdxl-local-secret}"
mkdir -p "$STATE_DIR" "$S3_DATA"
# One run at a time (test runners may start several at once).
exec 9>"$STATE_DIR/services.lock"
flock 9

listening() { # port
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_port() { # port name seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    listening "$1" && return 0
    sleep 0.1
  done
  log "$2 did not start listening on 127.0.0.1:$1 within $3 s"
  return 1
}

# --- RabbitMQ ---------------------------------------------------------------
if listening 5672; then
  log "RabbitMQ already listening on 5672"
else
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server (apt)"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >&2
  fi
  log "starting RabbitMQ"
  rabbitmq-server -detached >&2
  wait_port 5672 RabbitMQ 90
fi

# --- Redis ------------------------------------------------------------------
if listening 6379; then
  log "Redis already listening on 6379"
else
  if ! command -v redis-server >/dev/null; then
    log "installing redis-server (apt)"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >&2
  fi
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$STATE_DIR" --logfile "$STATE_DIR/redis.log" >&2
  wait_port 6379 Redis 30
fi

# --- s3s-fs -----------------------------------------------------------------
S3S_FS_BIN="$S3S_FS_ROOT/bin/s3s-fs"
if [[ ! -x "$S3S_FS_BIN" ]]; then
  log "building s3s-fs $S3S_FS_VERSION from crates.io into $S3S_FS_ROOT (a few minutes, once)"
  # Its own target dir: never contend for the workspace's build lock.
  CARGO_TARGET_DIR="$S3S_FS_ROOT/target" cargo install --quiet --locked \
    --root "$S3S_FS_ROOT" --version "$S3S_FS_VERSION" --features binary s3s-fs >&2
  rm -rf "$S3S_FS_ROOT/target"
fi
if listening "$S3_PORT"; then
  log "something already listens on $S3_PORT: assuming it is s3s-fs"
else
  log "starting s3s-fs on 127.0.0.1:$S3_PORT (data in $S3_DATA)"
  nohup "$S3S_FS_BIN" --host 127.0.0.1 --port "$S3_PORT" \
    --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" \
    "$S3_DATA" >"$STATE_DIR/s3s-fs.log" 2>&1 9>&- &
  echo $! >"$STATE_DIR/s3s-fs.pid"
  wait_port "$S3_PORT" s3s-fs 30
fi

cat <<ENV
export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
export REDIS_URL=redis://127.0.0.1:6379/
export S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export S3_BUCKET=sdxl
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY
export S3S_FS_BIN=$S3S_FS_BIN
ENV
