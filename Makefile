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

# ---- Deployment: docker compose and Kubernetes (k8s/), validated offline ----
K8S_VERSION ?= 1.32.0
K8S_NAMESPACE ?= cifar10
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
.PHONY: validate compose-up compose-down train-k8s

validate: setup ## Check deployment offline: compose config, kustomize renders, strict k8s schemas, policy tests
	docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: valid"
	@set -eo pipefail; for dir in k8s k8s/base $(wildcard k8s/overlays/*); do \
		kubectl kustomize $$dir | $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k $(K8S_VERSION) -; \
		echo "$$dir: renders, passes the Kubernetes $(K8S_VERSION) schemas"; done
	$(PY) -m pytest -q k8s/tests

compose-up: ## Build the images and start the stack in Docker, gateway on :5000 (compose v2 or Debian's v1)
	$(COMPOSE) up --build --detach

compose-down: ## Stop the Docker stack (volumes, hence trained models, are kept)
	$(COMPOSE) down

train-k8s: setup ## Train a new model version in the cluster: make train-k8s CONFIG=default EPOCHS=5 (kubectl context)
	$(PY) -m k8s.trainjob --config $(CONFIG) $(if $(EPOCHS),--epochs $(EPOCHS)) --namespace $(K8S_NAMESPACE)
