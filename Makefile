# sfedge: the one entry point.  `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SFEDGE := $(VENV)/bin/sfedge
# The setup stamp changes whenever pyproject.toml does, so `make setup` is a no-op when nothing changed.
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
export PYTHONDONTWRITEBYTECODE := 1
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup demo test test-fast test-e2e bench lint lint-imports clean help

help:
	@echo "make setup   create .venv and install sfedge with its build, runtime and dev extras"
	@echo "make demo    train (or load) the demo U-Nets, build host-cpu and device bundles, profile"
	@echo "make test    check the import rules, then run the test suite"
	@echo "make test-fast  the tests not marked slow (seconds to a few minutes)"
	@echo "make test-e2e   the second tier: your own models end to end (train, factorize, build, verify, profile)"
	@echo "make bench   write the benchmark report to reports/bench/"
	@echo "make lint    ruff and the import rules (lint-imports)"

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	@# torch first and pinned: any unpinned torch would pull a multi-GB CUDA wheel.
	@$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[build,runtime,plots,dev]"
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: .venv ready"

demo: setup
	$(SFEDGE) demo

test: setup lint-imports
	$(PY) -m pytest -q

test-fast: setup lint-imports
	$(PY) -m pytest -q -m "not slow and not e2e"

test-e2e: setup
	$(PY) -m pytest -q -m e2e

# The direction of dependencies (pyproject.toml [tool.importlinter]; README: Architecture).
lint-imports: setup
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) bench/run.py --out reports/bench

lint: setup lint-imports
	$(VENV)/bin/ruff check sfedge tests bench

clean:
	rm -rf .cache runs reports bundles
