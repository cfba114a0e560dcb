#!/usr/bin/env bash
# The main job: set-up (if needed), then the end-to-end demo on the embedded
# defaults (upload, version, train, predict; base vs fine-tuned side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/loraforge demo ${ARGS:-} "$@"
