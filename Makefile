# Two commands matter: `make run` and `make test`. Everything they need is set up here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/plexus run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m tests.layers          # the import floors (also tests/unit/test_layers.py in make test)

bench: $(STAMP)
	bash perf/setup.sh $(PY)
	$(PY) -m perf.bench_routing $(ARGS)
	$(PY) -m perf.bench_supervisor
	$(PY) -m perf.bench_persistence $(if $(findstring --quick,$(ARGS)),--quick)
	$(PY) -m perf.bench_client $(if $(findstring --quick,$(ARGS)),--repeat 1 --messages 1000 --calls 3000)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
