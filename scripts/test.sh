#!/usr/bin/env bash
# The project's test command: every test of the workspace, against the real
# RabbitMQ, Redis and S3 server (scripts/services.sh starts whichever is not
# running; the end-to-end tests also call it, so plain `cargo test` works too).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh)"
# Chromium, Node.js and playwright-core for the web page test (installed when missing).
eval "$(scripts/browser.sh)"
cargo test --workspace "$@"
