# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp changes whenever pyproject.toml changes, so setup re-runs only when needed.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_CONFIG ?= configs/demo.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first: the CPU build from local disk where no GPU is present, the CUDA build otherwise.
	@$(PY) -c 'import torch' 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; }
	@$(PY) -m pip install -q -e ".[dev,ray]"
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "setup: $(VENV) ready"

demo: setup
	$(PY) -m flows.synth --config $(DEMO_CONFIG)

test: setup
	$(PY) -m pytest tests

bench: setup
	for f in bench/[a-z]*.py; do $(PY) -m bench.$$(basename $$f .py) || exit 1; done

lint: setup
	$(VENV)/bin/ruff check pipeline flows trainer tests bench

clean:
	rm -rf $(VENV) .pytest_cache runs
