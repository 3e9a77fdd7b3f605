# Every install step lives here or in setup.cfg: .ci/run calls `make test` on a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Checked by mypy --strict (pyproject.toml).
TYPED := consensus storage vaultnode cli

.PHONY: run demo test test-fast lint typecheck soak bench clean nemesis system-packages

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/run_local.py

# A live three-node walk-through with checked outcomes; its transcript is docs/demo.md.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP) system-packages
	$(BIN)/ruff check .
	$(BIN)/vulture
	$(BIN)/mypy $(TYPED)
	$(BIN)/pytest

# The fast loop (under a minute): the in-process tests, none that starts a real process
# (tests/conftest.py marks those `processes`) and no simulator campaign or planted-bug seed scan
# (marked `campaign`). `make test` is the full suite.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not processes and not campaign"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/vulture

typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

soak: $(STAMP)
	$(BIN)/python -m simulations --seeds 10000 --jobs 2

# Debian packages tests need: faketime (clock jumps and offsets), gcc (the nemesis fsync-stall
# shim), systemd-creds (tests/test_unseal.py encrypts a root-key credential) and chromium with
# chromedriver (tests/test_ui_console.py drives the web console headless), etcd-server (the
# etcd beside the vault in bench/bench_matrix.py and tests/test_bench_matrix.py).
# CI runs as root and installs them; elsewhere the step only says what is missing, and the
# nemesis runs without those faults.
SYSTEM_PACKAGES := faketime:faketime gcc:gcc systemd-creds:systemd chromium:chromium chromedriver:chromium-driver etcd:etcd-server
system-packages:
	@for pair in $(SYSTEM_PACKAGES); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 && continue; package="$${pair#*:}"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y "$$package" || { apt-get update && apt-get install -y "$$package"; }; \
	  else echo "missing Debian package $$package: sudo apt-get install -y $$package"; fi; \
	done

# The real-process campaign, short mode: 3 nodes, 75 s of faults, a fresh seed each time (it is
# printed; `make nemesis NEMESIS_SEED=N` replays one). docs/nemesis.md has the long mode.
NEMESIS_SEED ?= $(shell date +%s)
nemesis: $(STAMP) system-packages
	$(BIN)/python -m simulations.nemesis --seed $(NEMESIS_SEED)

bench: $(STAMP)
	$(BIN)/python bench/bench_single.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
