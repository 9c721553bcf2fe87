# The two commands of the README:  `make reproduce`  and  `make test`.
# Both create the virtualenv on first use (exact versions from requirements.lock) and reuse it afterwards.
# VENV may point at an existing virtualenv (the pipeline test passes the one it runs in, so it never reinstalls).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(abspath $(VENV))/.installed
# dvc.yaml's stage commands call `cart-stage`: the venv's bin goes first on PATH, as `activate` would do,
# so `make reproduce` works from a shell where nothing is activated
STAGE_PATH := $(BIN):$(PATH)
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: reproduce reproduce-full tune test env lock stage-path clean-env help queue-grid

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

# requirements.lock was resolved on Python 3.11.7; some pins (e.g. soupsieve 4.x) need 3.11.5 or newer
CHECK_PYTHON := import sys; v = sys.version_info; sys.exit(0 if (3, 11, 5) <= v[:3] < (3, 12) else \
  f"make: {sys.executable} is Python {v.major}.{v.minor}.{v.micro}; requirements.lock needs Python 3.11.5 or a newer 3.11 "\
  "(point PYTHON= at one, e.g. make test PYTHON=/usr/local/bin/python3.11)")

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -c '$(CHECK_PYTHON)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$$(grep -i '^pip==' requirements.lock)"
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

env: $(STAMP)  ## create / update the virtualenv (.venv) with the locked dependencies

reproduce: $(STAMP)  ## run the whole DVC pipeline on the built-in benchmark (default scale)
	PATH="$(STAGE_PATH)" $(BIN)/dvc repro $(DVC_ARGS)

# an overlay of params.yaml run as `dvc exp run -S …` in the workspace (scripts/run_profile.py checks it first)
PROFILE ?= params.full.yaml
reproduce-full: $(STAMP)  ## the whole grid at the main scale on all three tasks, for a GPU: dvc exp run with params.full.yaml (PROFILE=…; docs/full_profile.md)
	PATH="$(STAGE_PATH)" $(BIN)/python scripts/run_profile.py run $(PROFILE) $(DVC_ARGS)

tune: $(STAMP)  ## choose the grid's schedule on validation queries → results/tuning/
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/tune_grid.py --task image

test: $(STAMP)  ## run the test suite (unit tests + smoke-scale pipeline)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

JOBS ?= 2
queue-grid: $(STAMP)  ## the ablation rows as queued DVC experiments, JOBS at a time, collected (docs/parallel.md; ROWS=…, FORCE=--force)
	$(BIN)/python scripts/queue_grid.py queue $(FORCE) $(ROWS)
	$(BIN)/python scripts/queue_grid.py start --jobs $(JOBS)
	$(BIN)/python scripts/queue_grid.py collect --repro

stage-path:  ## print the PATH under which `make reproduce` runs the stage commands
	@echo "$(STAGE_PATH)"

lock:  ## regenerate requirements.lock + environment.yml from pyproject.toml's ranges (needs PyPI, ~2 min)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q -U pip
	.venv-lock/bin/python -m pip install -q -e '.[dev]'
	.venv-lock/bin/pip freeze --all --exclude-editable | $(PYTHON) scripts/lock.py
	rm -rf .venv-lock

clean-env:  ## remove the virtualenv
	rm -rf $(VENV)
