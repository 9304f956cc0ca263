# Every target sets up .venv itself on a fresh machine (python3 -m venv + pip install -e .[dev]).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Test processes run side by side (pytest-xdist); most tests wait on the trainlab processes
# and servers they start; more workers than cores only adds contention on a small machine.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist load
# The package maps conf/ and experiments/ into trainlab/; setuptools' default editable mode
# then imports through a finder that hides src/hydra_plugins from Hydra's plugin scan.
# compat mode puts src/ on the path instead (the configs are read from the clone).
EDITABLE := --config-settings editable_mode=compat -e

.PHONY: install run test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(EDITABLE) '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)              ## train the default experiment (digits, CNN) on CPU
	$(VENV)/bin/trainlab train $(ARGS)

test: $(STAMP)             ## the whole suite, slow tests included
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(STAMP)        ## everything but the tests marked slow
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)            ## speed benchmarks, written to tests/benchmarks/RESULTS.md
	$(PY) tests/benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs multirun mlruns mlflow.db .pytest_cache
