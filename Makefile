# The two commands of the README:  `make reproduce`  and  `make test`.
# Both create the virtualenv on first use and reuse it afterwards.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: reproduce test env smoke clean-env help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

env: $(STAMP)  ## create / update the virtualenv (.venv) with the pinned dependencies

reproduce: $(STAMP)  ## run the whole DVC pipeline on the built-in benchmark (default scale)
	$(BIN)/dvc repro

test: $(STAMP)  ## run the test suite (unit tests + smoke-scale pipeline)
	$(BIN)/python -m pytest

clean-env:  ## remove the virtualenv
	rm -rf $(VENV)
