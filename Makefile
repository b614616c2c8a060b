# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision first, pinned to the builds this kind of machine serves from local disk.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test demo miniature gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

DEMO_DATA ?= .cache/demo_data

# Builds the demo data (reused when present), then pretrains the tiny model on it on the CPU. Two math threads
# beside the config's one loader worker, which needs a few percent of a core (docs/learning_check.md).
demo: install
	$(BIN)/omnimae-cli demo-data --root $(DEMO_DATA)
	OMP_NUM_THREADS=2 $(BIN)/omnimae-cli fit --config configs/demo.yaml

# OmniMAE's Fig. 2 in miniature on the demo data (docs/miniature.md): three pretrainings, fine-tuned on both tasks.
miniature: install
	$(BIN)/omnimae-cli demo-data --root $(DEMO_DATA)
	OMP_NUM_THREADS=1 $(BIN)/omnimae-cli miniature --data-root $(DEMO_DATA)

# Every check that needs a GPU, in one markdown report (docs/gpu_check.md).
gpu-check: install
	$(BIN)/python scripts/gpu_check.py --out gpu_check.md

# Removes the environment and build files; runs/ (checkpoints, logs) and .cache/ (demo data) are kept.
clean:
	rm -rf $(VENV) build dist .pytest_cache src/*.egg-info
