#!/usr/bin/env bash
# Installs what the browser tests (tests/tests/web_page.rs) need and prints
# their environment as `export NAME=value` lines on stdout:
#
#   eval "$(scripts/browser.sh)"
#
# - Chromium: Debian's `chromium` (apt) when none is on the PATH;
# - Node.js and npm (apt) when missing;
# - playwright-core, at the version of tests/browser/package-lock.json,
#   installed with `npm ci` into tests/browser/node_modules (git ignores it),
#   again only when the lock file changed since the last install. It drives
#   the system Chromium and downloads no browser of its own.
#
# Everything it says goes to stderr. Idempotent; one run at a time.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "browser.sh: $*" >&2; }

STATE_DIR="${SDXL_SERVICES_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/sdxl-queue}"
mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/browser.lock"
flock 9

apt_install() {
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >&2
}

CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [[ -z "$CHROMIUM" ]]; then
  log "installing chromium (apt)"
  apt_install chromium
  CHROMIUM="$(command -v chromium)"
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  log "installing nodejs and npm (apt)"
  apt_install nodejs npm
fi
NODE_MAJOR="$(node -p 'process.versions.node.split(".")[0]')"
if ((NODE_MAJOR < 20)); then
  log "Node.js $(node --version) is too old: playwright-core 1.65 wants 20 or newer"
  exit 1
fi

DIR=tests/browser
WANT="$(sha256sum <"$DIR/package-lock.json")"
if [[ "$(cat "$DIR/node_modules/.installed-lock" 2>/dev/null)" != "$WANT" ]]; then
  log "npm ci in $DIR (playwright-core)"
  (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error) >&2
  echo "$WANT" >"$DIR/node_modules/.installed-lock"
fi

cat <<ENV
export CHROMIUM=$CHROMIUM
export NODE=$(command -v node)
ENV
