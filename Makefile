# Every install step lives here or in setup.cfg: .ci/run calls `make test` on a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo test lint typecheck soak bench clean faketime

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

# libfaketime for tests/test_clock_offset.py (a node started a day ahead). CI runs as root and
# installs it when missing; elsewhere the test is skipped with that reason printed.
faketime:
	@ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y faketime || \
	    (apt-get update && apt-get install -y faketime); \
	  else echo "faketime is not installed and this is not root: the clock test will skip"; fi

test: $(STAMP) faketime
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
