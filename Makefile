# Every target creates .venv on first use, so both README commands work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# make demo-cluster needs PostgreSQL's server binaries (Debian: postgresql).
.PHONY: demo demo-cluster test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	@# The real-TPM backend builds against libtss2-dev; without it the simulated TPM
	@# (the default, all `make demo` needs) still works and swtpm tests skip, saying why.
	if pkg-config --exists tss2-esys 2>/dev/null; then \
		$(BIN)/python -m pip install -q -e '.[tpm]'; \
	else echo "note: libtss2-dev missing, tpm2-pytss not installed (only --tpm simulated)"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vcomp.demo

demo-cluster: $(STAMP)
	$(BIN)/python -m vcomp.demo_cluster

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy src

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,dev,bench]'
	touch $(BENCH_STAMP)

# make bench QUICK=1: every benchmark, short (< 3 min); writes bench/RESULTS.md,
# bench/results.json and the PNG plots next to them.
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run_all.py $(if $(QUICK),--quick,)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
