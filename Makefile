# sfedge: the one entry point.  `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SFEDGE := $(VENV)/bin/sfedge
# The setup stamp changes whenever pyproject.toml, the Makefile or tests/typecheck.py does, so `make setup` is a
# no-op when nothing changed.
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml Makefile tests/typecheck.py | cksum | cut -d' ' -f1)
export PYTHONDONTWRITEBYTECODE := 1
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: setup demo test test-fast test-tier2 test-e2e test-arm arm-device arm-device-stop bench lint lint-imports typecheck clean help

help:
	@echo "make setup   create .venv and install sfedge with its build, runtime and dev extras"
	@echo "make demo    train (or load) the demo U-Nets, build host-cpu and device bundles, profile"
	@echo "make test    check the import rules, then run the test suite"
	@echo "make test-fast  the tests not marked slow (seconds to a few minutes)"
	@echo "make test-tier2 the second CI tier: the heaviest builds and QAT (run by .ci/run after make test)"
	@echo "make test-e2e   end to end: your own models (train, factorize, build, verify, profile), QAT, latency tables"
	@echo "make test-arm       start the emulated aarch64 device, run the ARM tier against it, stop it (root)"
	@echo "make arm-device     start the emulated aarch64 device (Debian arm64 under QEMU, sshd on localhost)"
	@echo "make arm-device-stop"
	@echo "make bench   write the benchmark report to reports/bench/"
	@echo "make lint    ruff, the import rules (lint-imports) and the TensorRT type check (typecheck)"
	@echo "make typecheck  mypy --strict on the TensorRT backend against TensorRT 10.13's API (stubs)"

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	@# torch first and pinned: any unpinned torch would pull a multi-GB CUDA wheel.
	@$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[build,runtime,plots,dev]"
	@# TensorRT's type stubs: --no-deps, off sys.path, two defects repaired (tests/typecheck.py says why).
	@$(PY) tests/typecheck.py install
	@rm -f $(VENV)/.setup-*
	@touch $@
	@echo "setup: .venv ready"

demo: setup
	$(SFEDGE) demo

test: setup lint-imports typecheck
	$(PY) -m pytest -q

test-fast: setup lint-imports typecheck
	$(PY) -m pytest -q -m "not slow and not arm and not e2e and not tier2"

# The second CI tier: the heaviest builds (Factorizer TFLite, the dense demo's int8 search) and QAT.
test-tier2: setup
	$(PY) -m pytest -q -m tier2

test-e2e: setup
	$(PY) -m pytest -q -m e2e

# The direction of dependencies (pyproject.toml [tool.importlinter]; README: Architecture).
lint-imports: setup
	$(VENV)/bin/lint-imports --no-cache

# The emulated aarch64 device (tests/arm_device.py): built once into .cache/arm-device, then started in seconds.
# ARM_TARGET picks QEMU's CPU model from a target (raspberry-pi-5: Cortex-A76).  Exit 3 = this machine cannot.
ARM_TARGET ?= raspberry-pi-5
arm-device: setup
	$(PY) tests/arm_device.py start --target $(ARM_TARGET)

arm-device-stop:
	$(PYTHON) tests/arm_device.py stop

# The ARM tier: start (or build) the device, run the tests marked `arm`, always stop it.  Where the machine cannot
# run the device (no root, no binfmt_misc) the tests are skipped with that reason.
test-arm: setup
	@$(PY) tests/arm_device.py start --target $(ARM_TARGET); rc=$$?; \
	if [ $$rc -ne 0 ] && [ $$rc -ne 3 ]; then $(PY) tests/arm_device.py stop; exit $$rc; fi; \
	$(PY) -m pytest -q -m arm tests/test_arm_device.py; rc=$$?; \
	$(PY) tests/arm_device.py stop; exit $$rc

# sfedge's TensorRT calls checked against TensorRT 10.13's real Python API ([tool.mypy] in pyproject.toml).
typecheck: setup
	$(PY) tests/typecheck.py check

bench: setup
	$(PY) bench/run.py --out reports/bench

lint: setup lint-imports typecheck
	$(VENV)/bin/ruff check sfedge tests bench

clean:
	rm -rf .cache runs reports bundles
