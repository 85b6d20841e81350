# The few verbs people expect. Every target sets up what it needs, so each works on a
# fresh machine (Python 3.11 + gcc); nothing is installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= .data
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: setup run serve test two-regions chaos bench bench-quick bench-ceiling lint lint-deploy cluster-up cluster-run cluster-down cluster-status clean

setup: $(STAMP)

# Reinstall when the build inputs change: metadata, build script or the Cython source.
$(STAMP): pyproject.toml setup.py engine/_fastpath.pyx engine/_fastpath_locator.pxi engine/_fastpath_crypto.pxi
	@# The receipt loops link OpenSSL's libcrypto (engine/_fastpath_crypto.pxi).
	test -f /usr/include/openssl/sha.h || (apt-get update -q && apt-get install -y -q libssl-dev)
	command -v java >/dev/null || (apt-get update -q && apt-get install -y -q default-jre-headless)
	@# The power-loss filesystem of the tests (tests/support/powerloss) is a FUSE server (pyfuse3).
	test -f /usr/include/fuse3/fuse_lowlevel.h -a -x /usr/bin/fusermount3 || (apt-get update -q && apt-get install -y -q fuse3 libfuse3-dev pkg-config)
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

# -rs lists every skip with its reason; under CI=true a skip whose reason tests/conftest.py
# does not allow (ALLOWED_SKIP_REASONS) fails the run.
test: setup
	VOTES_REQUIRE_CYTHON=1 $(BIN)/python -m pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)

# Two regions, each on a full local stack of its own (3 Kafka brokers, S3, Redis; base ports
# VOTES_STACK_BASE_PORT and 20300): tests/integration/test_two_regions.py, which `make test`
# runs with the second region on the embedded log.
two-regions: setup
	VOTES_TWO_REGIONS_FULL_STACKS=1 $(BIN)/python -m pytest -q -rs -p no:cacheprovider \
		tests/integration/test_two_regions.py $(PYTEST_ARGS)

# Faults under load, the long profile of every schedule in tests/chaos (embedded log, and the
# Kafka/S3 ones on the local stack, which the suite starts itself); `make test` runs the short
# profile. The summary table prints at the end and is written as JSON to CHAOS_SUMMARY.
# VOTES_TEST_SEED=<seed> repeats a run's random choices.
CHAOS_SUMMARY ?= build/chaos-summary.json
chaos: setup
	mkdir -p $(dir $(CHAOS_SUMMARY))
	VOTES_REQUIRE_CYTHON=1 VOTES_CHAOS_PROFILE=long VOTES_CHAOS_SUMMARY=$(CHAOS_SUMMARY) \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/chaos $(PYTEST_ARGS)

# The perf harness (perf/README.md): micro-benchmarks, then the engine (default config)
# against the ceiling and the peers (PostgreSQL and Redis installed and started by the
# harness's own scripts) with the shard sweep after each engine, then the capacity model and
# issue 10's targets table; between them, issue 13's results freshness (~15 s) and SSE
# fan-out (~80 s) benches. JSON and PNG plots land in perf/results/. bench-quick with
# --kafka took 5 min 9 s (2026-12-02); bench without --kafka is estimated at 6-7 min.
# BENCH_ARGS passes more, e.g. BENCH_ARGS="--kafka --stack-base-port 19400 --duration-scale 3".
PERF_STAMP := $(VENV)/.installed-perf

$(PERF_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test,perf]'
	touch $(PERF_STAMP)

bench: setup $(PERF_STAMP)
	$(BIN)/python -m perf.bench_micro
	$(BIN)/python -m perf.bench_peers $(BENCH_ARGS)
	$(BIN)/python -m perf.bench_memory
	$(BIN)/python -m perf.bench_results_freshness --duration-s 10
	$(BIN)/python -m perf.bench_results_fanout --updates 20
	$(BIN)/python -m perf.bench_defences
	$(BIN)/python -m perf.bench_attack
	$(BIN)/python -m perf.bench_tracing
	$(BIN)/python -m perf.capacity
	$(BIN)/python -m perf.targets_report

bench-quick: setup $(PERF_STAMP)
	$(BIN)/python -m perf.bench_micro --quick
	$(BIN)/python -m perf.bench_peers --quick $(BENCH_ARGS)
	$(BIN)/python -m perf.bench_memory --lookup-s 2
	$(BIN)/python -m perf.bench_results_freshness --duration-s 4
	$(BIN)/python -m perf.bench_results_fanout --subscribers 1000,5000,20000 --updates 10
	$(BIN)/python -m perf.bench_defences --quick
	$(BIN)/python -m perf.bench_attack --quick
	$(BIN)/python -m perf.capacity
	$(BIN)/python -m perf.targets_report

# The engine against the ceiling only, with the paced run and the WAL commits the earlier
# wrk-only bench measured (--kafka adds the private stack), then the Cython apply bench.
bench-ceiling: setup $(PERF_STAMP)
	$(BIN)/python -m perf.bench_peers --peers ceiling,embedded --only closed_max --no-sweep \
		--paced-fraction 0.5 --wal-commits --out perf/results/ceiling.json --no-plots $(BENCH_ARGS)
	$(BIN)/python -m perf.bench_fastpath

# The real local stack (3 Kafka KRaft brokers, SeaweedFS S3, Redis) on 127.0.0.1; see
# deploy/local/README.md. STACK_ARGS passes e.g. --base-port 19100 for a second stack.
cluster-up: setup
	$(BIN)/python -m deploy.local.stack up $(STACK_ARGS)

# The engine on the real stack: Kafka WAL (acks=all, transactional) and S3 snapshots.
cluster-run: cluster-up
	$(BIN)/python -m deploy.local.stack engine-config $(STACK_ARGS) > $(DATA_DIR)-cluster.toml
	$(BIN)/votes serve --data-dir $(DATA_DIR)-cluster --port $(PORT) --config $(DATA_DIR)-cluster.toml

cluster-down: setup
	$(BIN)/python -m deploy.local.stack down $(STACK_ARGS)

cluster-status: setup
	$(BIN)/python -m deploy.local.stack status $(STACK_ARGS)

# Static checks, run by .ci/run before the tests: ruff, the layer contract (import-linter,
# pyproject's [tool.importlinter]), mypy ([tool.mypy]: strict on the kernel and shards/) and
# the fast path's stub against the built extension (mypy.stubtest), then the deployment
# (deploy/check.sh).
LINT_STAMP := $(VENV)/.installed-lint

$(LINT_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $(LINT_STAMP)

lint: setup $(LINT_STAMP)
	$(BIN)/ruff check engine shards replay perf tests deploy
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m mypy.stubtest --allowlist engine/stubtest-allowlist.txt engine._fastpath
	bash deploy/check.sh

# The operators' deployment alone (deploy/ansible, deploy/packer): ansible-lint (production
# profile, offline), playbook syntax checks, packer fmt/validate; installs the deploy extra.
lint-deploy: setup
	bash deploy/check.sh

clean:
	rm -rf $(VENV) build *.egg-info engine/_fastpath.c engine/_fastpath*.so
