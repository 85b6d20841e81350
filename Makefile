# The few verbs people expect. Every target sets up what it needs, so each works on a
# fresh machine (Python 3.11 + gcc); nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= .data
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: setup run serve test test-fast bench lint clean

setup: $(STAMP)

# Reinstall when the build inputs change: metadata, build script or the Cython source.
$(STAMP): pyproject.toml setup.py engine/_fastpath.pyx
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# Sets up, starts the engine on the embedded log, creates a demo poll, casts demo votes and
# prints curl lines to try; then keeps serving until Ctrl-C.
run: setup
	$(BIN)/votes demo --data-dir $(DATA_DIR) --port $(PORT)

serve: setup
	$(BIN)/votes serve --data-dir $(DATA_DIR) --port $(PORT)

test: setup
	VOTES_REQUIRE_CYTHON=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(BIN)/python perf/bench_vote_vs_ceiling.py
	$(BIN)/python perf/bench_fastpath.py

clean:
	rm -rf $(VENV) build *.egg-info engine/_fastpath.c engine/_fastpath*.so
