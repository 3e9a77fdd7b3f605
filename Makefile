# Every install step lives here or in setup.cfg: .ci/run calls `make test` on a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo test lint typecheck soak bench clean

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

test: $(STAMP)
	# systemd-creds (package systemd) for tests/test_unseal.py's credential test; CI runs as root.
	@command -v systemd-creds >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || apt-get install -y systemd
	$(BIN)/ruff check .
	$(BIN)/mypy consensus storage
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy consensus storage

soak: $(STAMP)
	$(BIN)/python -m simulations --seeds 10000 --jobs 2

bench: $(STAMP)
	$(BIN)/python bench/bench_single.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
