#!/usr/bin/env bash
# The test command: set-up (if needed), lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check services tests bench scripts
node_modules/.bin/buf lint
exec .venv/bin/python -m pytest "$@"
