# slimserve: two commands from a fresh clone - `make serve` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch, pinned explicitly: an unpinned `torch` from PyPI is a multi-GB CUDA
# build. On a machine without a local wheel cache, point TORCH_INDEX at PyTorch's CPU index:
#   make serve TORCH_INDEX=https://download.pytorch.org/whl/cpu
# GPU users: make serve TORCH=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?=
EXTRAS ?= dev,ray,peers
FMNIST_DIR := /usr/share/datasets/fashion-mnist
HOST ?= 127.0.0.1
PORT ?= 8000
BUNDLE ?= models/demo
RUN_DIR ?= runs/demo

.PHONY: help install install-runtime serve test lint typecheck unit data bundle bundle-quick baselines s2dnas lcnet loadtest clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

define install_torch
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)" \
	  || { echo "could not install $(TORCH); on machines without the local wheel cache run:"; \
	       echo "  make $(MAKECMDGOALS) TORCH_INDEX=https://download.pytorch.org/whl/cpu"; exit 1; }
endef

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(install_torch)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed ## create .venv and install slimserve with its dev, ray and peers extras

install-runtime: | $(BIN)/python ## install slimserve alone, not editable (what the Docker image runs)
	$(install_torch)
	$(BIN)/pip install --quiet .

data: ## install Fashion-MNIST from Debian (as root), or print the command
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist >/dev/null || { apt-get update >/dev/null && apt-get install -y dataset-fashion-mnist >/dev/null; }; \
	else echo "Fashion-MNIST is missing; install it with: sudo apt-get install -y dataset-fashion-mnist"; exit 1; fi

serve: install ## serve the bundled demo model on $(HOST):$(PORT)
	@echo "Try it (in another shell), with a tight and a loose latency budget:"
	@echo "  curl -s -H 'X-Latency-Budget-Ms: 5'   --data-binary @docs/examples/ankle-boot.png http://$(HOST):$(PORT)/v1/classify"
	@echo "  curl -s -H 'X-Latency-Budget-Ms: 500' --data-binary @docs/examples/ankle-boot.png http://$(HOST):$(PORT)/v1/classify"
	@echo "  open http://$(HOST):$(PORT)/docs for the API, /v1/subnets and /v1/status for what the scheduler knows"
	$(BIN)/slimserve serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

lint: install ## ruff lint + format check, hadolint on the Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: install ## mypy on the packages
	$(BIN)/mypy

test: install data lint typecheck ## lint, type-check and run the whole test suite
	$(BIN)/pytest

unit: install ## only the fast unit tests
	$(BIN)/pytest -m unit

bundle: install data ## regenerate the demo bundle from scratch (train + search; hours on 2 CPU cores)
	$(BIN)/slimserve train --out $(RUN_DIR)/supernet --epochs 12 --seed 0 --resolutions 28,24,20,16,12,8 --narrowest-full-depth
	$(BIN)/slimserve search --supernet $(RUN_DIR)/supernet/supernet.safetensors --out $(BUNDLE) --compare --report-dir docs/results --seed 0

bundle-quick: install data ## a smoke-test bundle in under 10 minutes (small network, short training) in runs/quick
	$(BIN)/slimserve train --out runs/quick/supernet --family-arg base_channels=16 --epochs 1 --seed 0
	$(BIN)/slimserve search --supernet runs/quick/supernet/supernet.safetensors --out runs/quick/bundle --quick --seed 0

baselines: install data ## static networks trained alone at widths 0.125 and 1.0 (full depth), for docs/RESULTS.md
	$(BIN)/slimserve train --out $(RUN_DIR)/static-0.125 --epochs 12 --seed 0 --static-width 0.125
	$(BIN)/slimserve train --out $(RUN_DIR)/static-1.0 --epochs 12 --seed 0 --static-width 1.0

s2dnas: install data ## S2DNAS: the full-width static network (make baselines) -> multi-stage bundle models/s2dnas
	$(BIN)/slimserve s2dnas --static $(RUN_DIR)/static-1.0/supernet.safetensors --out $(RUN_DIR)/s2dnas \
		--candidate-steps 100 --final-steps 2500 --bundle models/s2dnas --static-bundle $(RUN_DIR)/s2dnas-static \
		--serve-drop 0 --report-dir docs/results --seed 0

lcnet: install data ## LC-Net: gates on the demo bundle's most accurate row -> gated bundle models/lcnet
	$(BIN)/slimserve lcnet --from models/demo --out $(RUN_DIR)/lcnet --bundle models/lcnet \
		--report-dir docs/results --seed 0 --repeats 30

clean: ## remove caches (keeps .venv and runs/)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
