# The two commands a new user needs: `make demo` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all demo demo-static demo-k8s test lint unit sysdeps venv native bench clean lock fuzz

all: test

sysdeps:
	@scripts/sysdeps.sh

CARGO := $(shell command -v cargo 2>/dev/null || { test -x $(HOME)/.cargo/bin/cargo && echo $(HOME)/.cargo/bin/cargo; })

$(STAMP): pyproject.toml lab/pyproject.toml requirements.lock native/wgkernel/Cargo.toml native/wgkernel/Cargo.lock $(wildcard native/wgkernel/src/*.rs)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -c requirements.lock -e '.[dev]' -e ./lab
	@$(MAKE) --no-print-directory native
	@touch $@

# Re-pin the images' runtime dependencies (requirements.lock) from a clean virtualenv.
lock:
	@rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	@build/lock-venv/bin/pip install -q '.[postgres]'
	@{ sed -n '1,2p' requirements.lock; build/lock-venv/bin/pip freeze --exclude wiremesh; } > requirements.lock.new
	@mv requirements.lock.new requirements.lock && rm -rf build/lock-venv

# The WireGuard transport kernel in Rust (crates.io), built with maturin into the venv. Without
# cargo the agent runs the same kernel in Python (wiremesh.core.wireguard.kernel says which).
native:
	@if [ -n "$(CARGO)" ]; then \
		PATH="$(CURDIR)/$(VENV)/bin:$(dir $(CARGO)):$$PATH" $(PY) -m pip install -q --no-build-isolation ./native/wgkernel; \
	else echo "note: no cargo: the native WireGuard kernel is not built; the Python kernel is used"; fi

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test: sysdeps venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The whole mesh: NATS, coord, keys, two relay regions and agents behind several kinds of NAT.
demo: sysdeps venv
	$(PY) -m wiremesh.lab.meshdemo

# wiremesh in a real two-node Kubernetes cluster built here (helm install), and a laptop outside.
demo-k8s: sysdeps venv
	$(PY) -m wiremesh.lab.k8sdemo

# Two agents joined by a static (wg-quick style) tunnel through one NAT: ping and iperf3.
demo-static: sysdeps venv
	$(PY) -m wiremesh.lab.demo

bench: sysdeps venv
	$(PY) bench/throughput

# Every fuzz target for FUZZ_SECONDS each (coverage-guided, atheris); new inputs grow fuzz/corpus/,
# crashes land in fuzz/artifacts/ (see fuzz/README.md). `make test` runs each for a few seconds.
FUZZ_SECONDS ?= 300
fuzz: venv
	@mkdir -p fuzz/artifacts
	@for t in $$($(PY) -c "import sys; sys.path.insert(0, 'fuzz'); import targets; print(*targets.TARGETS)"); do \
	  echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
	  $(PY) fuzz/run.py $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -timeout=10 \
	    -artifact_prefix=fuzz/artifacts/$$t- fuzz/corpus/$$t 2>&1 | grep -E "^(Done|stat::number_of_executed_units|==[0-9]+==|.*Error)" || true; \
	  test -z "$$(ls fuzz/artifacts/ 2>/dev/null)" || { echo "found: fuzz/artifacts/"; exit 1; }; \
	done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache native/wgkernel/target
