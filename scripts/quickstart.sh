#!/usr/bin/env bash
# From a fresh machine without Docker to a first image: starts the services
# (scripts/services.sh), builds and starts a worker and the dispatcher, and
# submits one job through the CLI, waiting for it.
#
#   scripts/quickstart.sh [--model REPO_OR_FOLDER] [--device cpu|cuda] [--prompt TEXT]
#                         [--steps N] [--size PX] [--output FILE]
#
# Defaults: SDXL base from the Hugging Face hub; CUDA when nvidia-smi sees a
# GPU (the worker is then built with --features cuda), else CPU (slow with
# SDXL base: try --model tests/fixtures/sdxl-reference/tiny-sdxl --size 256).
# Everything keeps running afterwards; the PIDs and logs are printed.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="stabilityai/stable-diffusion-xl-base-1.0"
DEVICE=""
PROMPT="a lighthouse on a cliff at dusk, oil painting"
STEPS=20
SIZE=1024
OUTPUT="first-image.png"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --prompt) PROMPT="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --size) SIZE="$2"; shift 2 ;;
    --output) OUTPUT="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$DEVICE" ]]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi

eval "$(scripts/services.sh)"

FEATURES=()
[[ "$DEVICE" == cuda ]] && FEATURES=(--features cuda)
# SDXL_PROFILE=dev reuses the debug build of the tests (dependencies are
# optimised in it too); release is the default.
PROFILE="${SDXL_PROFILE:-release}"
echo "quickstart: building ($PROFILE, $DEVICE)" >&2
cargo build --profile "$PROFILE" -p dispatcher >&2
cargo build --profile "$PROFILE" -p worker "${FEATURES[@]}" >&2
DIR="$PROFILE"; [[ "$PROFILE" == dev ]] && DIR=debug
TARGET="${CARGO_TARGET_DIR:-target}/$DIR"

LOGS="${XDG_STATE_HOME:-$HOME/.local/state}/sdxl-queue"
mkdir -p "$LOGS"
RUST_LOG=info nohup "$TARGET/worker" run --model "$MODEL" --device "$DEVICE" >"$LOGS/worker.log" 2>&1 &
WORKER=$!
RUST_LOG=info nohup "$TARGET/dispatcher" serve --listen 127.0.0.1:8080 >"$LOGS/dispatcher.log" 2>&1 &
DISPATCHER=$!
echo "quickstart: worker pid $WORKER (log $LOGS/worker.log), dispatcher pid $DISPATCHER on http://127.0.0.1:8080 (log $LOGS/dispatcher.log)" >&2

echo "quickstart: submitting; the first run downloads the model, which can take a while" >&2
"$TARGET/dispatcher" submit --prompt "$PROMPT" --steps "$STEPS" --width "$SIZE" --height "$SIZE" \
  --wait --output "$OUTPUT"
echo "quickstart: image saved to $OUTPUT; stop with: kill $WORKER $DISPATCHER" >&2
