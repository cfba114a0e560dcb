#!/usr/bin/env bash
# Type-checks the services and the Python client, strictly, with first-party imports resolved.
#
# The package `loraforge` is assembled from three folders (gen/, services/, clients/python/;
# see [tool.setuptools.package-dir] in pyproject.toml), which mypy cannot follow through the
# editable install. A tree of links in .mypy-src/ gives it the same layout as the installed
# package, so every `loraforge.*` import resolves to our own code.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.mypy-src/loraforge
rm -rf .mypy-src
mkdir -p "$tree"
for entry in gen/loraforge/*; do
  ln -s "../../$entry" "$tree/$(basename "$entry")"
done
ln -s ../../services "$tree/services"
ln -s ../../clients/python "$tree/client"
exec .venv/bin/python -m mypy -p loraforge.services -p loraforge.client "$@"
