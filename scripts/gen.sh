#!/usr/bin/env bash
# Generates Python code, gRPC stubs and typed stubs (.pyi) for every proto
# under proto/ into gen/. Deterministic: running it twice gives the same files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=${1:-gen}
# protoc finds the mypy plugins (protoc-gen-mypy, protoc-gen-mypy_grpc) next to the interpreter.
export PATH="$(dirname "$PY"):$PATH"
mkdir -p "$out"
find "$out" -path "$out/loraforge/*" \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete
mapfile -t protos < <(cd proto && find loraforge -name '*.proto' | LC_ALL=C sort)
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "${protos[@]}"
# Every directory of generated code is a regular package.
find "$out/loraforge" -type d | while read -r d; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done
[ -f "$out/loraforge/py.typed" ] || : > "$out/loraforge/py.typed"
