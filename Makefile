# Two commands for a new developer: `make run` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: help install run test lint format typecheck unit bench config-docs clean

help:
	@echo "make run    - the service on the simulated upstream (PORT=8000), with a local Redis if one is installed"
	@echo "make test   - lint, type-check and the whole test suite (real Redis, real servers)"
	@echo "make config-docs - regenerate .env.example and docs/configuration.md from app/config.py"
	@echo "make bench  - the benchmark against the Node.js original (docs/performance.md)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

run: install
	$(BIN)/python scripts/run_local.py

lint: install
	$(BIN)/ruff check app simupstream tests scripts
	$(BIN)/ruff format --check app simupstream tests scripts

format: install
	$(BIN)/ruff check --fix app simupstream tests scripts
	$(BIN)/ruff format app simupstream tests scripts

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
