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

# `make bench` runs every benchmark (about an hour); `make bench ARGS=--quick` only the user
# benchmark, short, and one client run (under 3 min). ARGS go to bench_routing, USER_ARGS
# to bench_user (e.g. USER_ARGS="--sections confirm").
QUICK = $(findstring --quick,$(ARGS))

bench: $(STAMP)
	bash perf/setup.sh $(PY)
	$(PY) -m perf.bench_user $(if $(QUICK),--quick) $(USER_ARGS)
	$(if $(QUICK),,$(PY) -m perf.bench_routing $(ARGS))
	$(if $(QUICK),,$(PY) -m perf.bench_supervisor)
	$(if $(QUICK),,$(PY) -m perf.bench_persistence)
	$(PY) -m perf.bench_client $(if $(QUICK),--repeat 1 --messages 1000 --calls 3000)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
