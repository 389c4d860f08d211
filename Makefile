# Every target is documented by its '##' comment: `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
SHARED_CIFAR ?= ../shared/data/cifar10/prepare.py
CONFIG ?= fast
EPOCHS ?=
RUN_DIR ?= runs/$(CONFIG)
MODEL_BASE_PATH ?= models/cifar10

.DEFAULT_GOAL := help
.PHONY: help setup data train study bench-train evaluate test

help: ## List every target with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed ## Create .venv with every service's pinned requirements and the test tools

$(VENV)/.installed: requirements-dev.txt training/requirements.txt gateway/requirements.txt worker/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

data: $(DATA_DIR)/cifar-10-batches-py/batches.meta ## Get CIFAR-10 into data/ (offline copy from ../shared if present, else the official download)

$(DATA_DIR)/cifar-10-batches-py/batches.meta:
	@if [ -f "$(SHARED_CIFAR)" ]; then $(PY) $(SHARED_CIFAR) $(DATA_DIR) && \
		echo "CIFAR-10 (JPEG copy)" > $(DATA_DIR)/DATASET.txt; \
	else $(PY) -m training.data download $(DATA_DIR); fi

train: setup data ## Train one configuration: make train CONFIG=base3 EPOCHS=5 (resumes if interrupted)
	$(PY) -m training.train --config $(CONFIG) $(if $(EPOCHS),--epochs $(EPOCHS)) --data $(DATA_DIR) --run-dir $(RUN_DIR)

test: setup data ## Run the whole test suite (real redis-server, gunicorn, gRPC, SavedModel)
	$(PY) -m pytest
