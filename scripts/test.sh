#!/usr/bin/env bash
# The test command: set-up (if needed), lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check services clients tests bench scripts
bash scripts/mypy.sh
node_modules/.bin/buf lint
bash scripts/buf-breaking.sh
exec .venv/bin/python -m pytest "$@"
