# The two commands of the README: `make train` (main job) and `make test` (test suite).
# Each creates .venv on first use. The tests run in 2 processes (pytest-xdist), a test file
# each at a time, so that a file's module fixtures are built once.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/census_apem
CONFIG ?= configs/census_apem.py

.PHONY: train test venv clean

$(VENV)/.installed: setup.cfg
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) train.py --config $(CONFIG) --workdir $(WORKDIR)
	$(PY) eval.py --config $(CONFIG) --workdir $(WORKDIR) --split test

test: $(VENV)/.installed
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) runs
