# The two commands a new user needs: `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all demo demo-static test lint unit sysdeps venv bench clean

all: test

sysdeps:
	@scripts/sysdeps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: sysdeps venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The whole mesh: NATS, coord, keys, two relay regions and agents behind several kinds of NAT.
demo: sysdeps venv
	$(PY) -m wiremesh.lab.meshdemo

# Two agents joined by a static (wg-quick style) tunnel through one NAT: ping and iperf3.
demo-static: sysdeps venv
	$(PY) -m wiremesh.lab.demo

bench: sysdeps venv
	$(PY) bench/throughput

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
