# Developer tasks. `make setup` is what the README's commands run first.
PY ?= .venv/bin/python
BUF ?= node_modules/.bin/buf
PROTOS := $(shell find proto -name '*.proto' | sort)

.PHONY: setup gen check-gen lint fmt test demo bench clean

setup:
	bash scripts/setup.sh

# Regenerate gen/ from proto/ with the pinned grpcio-tools and mypy-protobuf.
gen:
	bash scripts/gen.sh

# `buf breaking` compares proto/ with the contracts it replaces (scripts/buf-breaking.sh).
lint:
	$(PY) -m ruff check services clients tests bench scripts
	$(PY) -m ruff format --check services clients tests bench scripts
	bash scripts/mypy.sh
	$(BUF) lint
	BUF=$(BUF) bash scripts/buf-breaking.sh

fmt:
	$(PY) -m ruff format services clients tests bench scripts
	$(PY) -m ruff check --fix services clients tests bench scripts

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

clean:
	rm -rf .venv node_modules .pytest_cache
