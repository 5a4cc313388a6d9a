# Two commands for a new developer: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# Every dependency is installed at the exact version and hash that uv.lock
# records (the image is built from the same lock). uv itself is pinned, by hash
# too, in requirements-uv.txt and installed into a small venv of its own, so
# `uv sync` never removes it from the project's venv. Bump UV_VERSION, then
# `make lock`, to move to a newer uv.
UV_VERSION := 0.13.8
UV_VENV    := .uv
UV         := $(UV_VENV)/bin/uv
# uv uses this machine's Python, never one it downloads, and syncs into $(VENV).
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | cksum | cut -d' ' -f1)

.PHONY: help install run test lint format typecheck unit bench lock config-docs clean

help:
	@echo "make run    - the service on the simulated upstream (PORT=8000), with a local Redis if one is installed"
	@echo "make test   - lint, type-check and the whole test suite (real Redis, real servers)"
	@echo "make config-docs - regenerate .env.example and docs/configuration.md from app/config.py"
	@echo "make bench  - the benchmark against the Node.js original (docs/performance.md)"
	@echo "make lock   - re-resolve uv.lock to the newest versions pyproject.toml allows"

$(UV): requirements-uv.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install -q --require-hashes -r requirements-uv.txt
	@touch $@

# --locked: refuse to install when uv.lock no longer matches pyproject.toml
# (someone edited a dependency without `make lock`) instead of re-resolving.
$(STAMP): pyproject.toml uv.lock $(UV)
	$(UV) sync --locked --extra dev --python $(PYTHON)
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

run: install
	$(BIN)/python scripts/run_local.py

lint: install
	$(BIN)/ruff check app simupstream tests scripts bench
	$(BIN)/ruff format --check app simupstream tests scripts bench

format: install
	$(BIN)/ruff check --fix app simupstream tests scripts bench
	$(BIN)/ruff format app simupstream tests scripts bench

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	@scripts/ensure-system-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	@scripts/ensure-system-deps.sh bench || \
		echo "make bench: some tools could not be installed; measuring what can be" >&2
	$(BIN)/python -m bench $(BENCH_ARGS)

# .env.example and docs/configuration.md's tables, from the Settings class (app/config.py).
config-docs: install
	$(BIN)/python scripts/gen_config_docs.py

# Newest versions within pyproject.toml's ranges, and uv's own pin; review the
# diff of uv.lock, run `make test`, commit both files. After editing a dependency
# in pyproject.toml, `make lock LOCK_ARGS=` resolves only what changed.
LOCK_ARGS ?= --upgrade
lock: $(UV)
	$(UV) lock $(LOCK_ARGS)
	echo "uv==$(UV_VERSION)" | $(UV) pip compile - --universal --generate-hashes --no-header \
		--quiet --output-file requirements-uv.txt

clean:
	rm -rf $(VENV) $(UV_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
