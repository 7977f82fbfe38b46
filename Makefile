# Two commands for a new user: `make demo` (the main job) and `make test` (the test suite).
# Each creates or refreshes the virtualenv in .venv and installs everything it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# `make test` runs the default suite in TEST_WORKERS pytest-xdist processes, one test file per worker at a time
# (--dist loadfile: a file's module fixtures and its tests stay in one process). 0: one process, no xdist.
# 3 on this 2-core machine: ~1/4 of the tests' time is waiting (timers, servers, subprocesses), so 2 workers kept
# ~1.5 cores busy; back to back, 623 s of pytest with 2 and 515 s with 3 (session 32).
TEST_WORKERS ?= 3

.PHONY: venv demo test test-all lint fmt protos bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the local CPU wheel: otherwise a dependency may pull a CUDA build.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m testbed.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m ruff format --check .

fmt: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/coinfer/v1/coinfer.proto

bench: $(STAMP)
	$(PY) bench/bench_modelgraph.py --out bench/results

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
