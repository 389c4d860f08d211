# Every target is documented by its '##' comment: `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
SHARED_CIFAR ?= ../shared/data/cifar10/prepare.py
CONFIG ?= fast
EPOCHS ?=
PRECISION ?=
RUN_DIR ?= runs/$(CONFIG)
BACKEND ?= tensorflow
BUNDLE ?= dist/gpu-bundle
BUNDLE_DATA ?= dist/gpu-data
MODEL_BASE_PATH ?= models/cifar10
PROTOS := worker/protos/tfserving_apis_pb2.py

.DEFAULT_GOAL := help
.PHONY: help setup data train configs study bench-train evaluate cost test export gpu-bundle

help: ## List every target with one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(VENV)/.installed $(PROTOS) ## Create .venv with every service's pinned requirements and the test tools

$(VENV)/.installed: requirements-dev.txt training/requirements.txt training/requirements-jax.txt gateway/requirements.txt worker/requirements.txt \
		worker/requirements-build.txt tfserving/requirements.txt k8s/trainjob/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $(VENV)/.serving-installed $@

# What `make up` needs, and no more: the gateway and the worker, plus the model server stand-in
# (TensorFlow) only where tensorflow_model_server is not on PATH.
SERVING_REQUIREMENTS := gateway/requirements.txt worker/requirements.txt worker/requirements-build.txt \
	$(if $(shell command -v tensorflow_model_server),,tfserving/requirements.txt)

$(VENV)/.serving-installed: $(SERVING_REQUIREMENTS)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(addprefix -r ,$(SERVING_REQUIREMENTS))
	touch $@

# A data/ made before the switch to the official pixels is the JPEG-compressed copy, and says so
# in its DATASET.txt: it is rebuilt.
# The worker's TF Serving messages, compiled from their .proto (worker/serving_apis.py).
$(PROTOS): worker/protos/tfserving_apis.proto | $(VENV)/.serving-installed
	$(PY) -m grpc_tools.protoc -I . --python_out=. $<

data: setup ## Get CIFAR-10 into data/ (the official pixels: the lossless copy in ../shared if present, else the official download)
	@if grep -qs JPEG $(DATA_DIR)/DATASET.txt; then \
		echo "$(DATA_DIR)/ holds the JPEG-compressed copy of CIFAR-10: rebuilding it from the official pixels"; \
		rm -rf $(DATA_DIR)/cifar-10-batches-py $(DATA_DIR)/cifar-10-python.tar.gz $(DATA_DIR)/DATASET.txt; fi
	@$(MAKE) --no-print-directory $(DATA_DIR)/cifar-10-batches-py/batches.meta

$(DATA_DIR)/cifar-10-batches-py/batches.meta:
	@if [ -f "$(SHARED_CIFAR)" ]; then $(PY) $(SHARED_CIFAR) $(DATA_DIR); \
	else $(PY) -m training.recipe.data download $(DATA_DIR); fi

train: setup data ## Train one config: make train CONFIG=base3 EPOCHS=5 [PRECISION=mixed_bfloat16] [BACKEND=jax] [EXPORT=1 serves it]; resumes if killed
	KERAS_BACKEND=$(BACKEND) $(PY) -m training.train --config $(CONFIG) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(PRECISION),--precision $(PRECISION)) --data $(DATA_DIR) \
		--run-dir $(RUN_DIR) $(if $(EXPORT),--export-base $(MODEL_BASE_PATH))

configs: setup ## List the training configurations (the seed's study, fast, default)
	@$(PY) -m training.recipe.configs

STUDY_DIR ?= runs/study
study: setup data ## Compare configurations (x seeds) in runs/study/STUDY.md [STUDY_DIR=]: make study EPOCHS=10 [CONFIGS=base1,base3] [SEEDS=0,1,2] [JOBS=2]; resumes, skips finished runs
	$(PY) -m training.lab.study $(if $(CONFIGS),--configs $(CONFIGS)) $(if $(SEEDS),--seeds $(SEEDS)) \
		$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(JOBS),--jobs $(JOBS)) --data $(DATA_DIR) --out $(STUDY_DIR)

bench-train: setup data ## Time the fast recipe from scratch: wall time and test accuracy per epoch [CONFIG= EPOCHS= PRECISION= BACKEND=]
	KERAS_BACKEND=$(BACKEND) $(PY) -m training.lab.bench --config $(CONFIG) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(PRECISION),--precision $(PRECISION)) --data $(DATA_DIR)

export: setup ## Evaluate and export a finished run directory with TensorFlow, whichever backend trained it: make export RUN=runs/default
	$(if $(RUN),,$(error RUN= is required: make export RUN=runs/<config>))
	$(PY) -m training.ship.finish $(RUN) --data $(DATA_DIR) --export-base $(MODEL_BASE_PATH)

gpu-bundle: setup data ## A GPU run without network: dist/gpu-bundle (code, wheels) + dist/gpu-data (CIFAR-10 in parts, one per call under the 64 MiB carry limit) [BUNDLE_PYTHON="3.12 3.13"]: ./run.sh CONFIG RUN_DIR there
	$(PY) -m training.lab.bundle build --out $(BUNDLE) --data-out $(BUNDLE_DATA) --data $(DATA_DIR) \
		$(if $(BUNDLE_PYTHON),--python $(BUNDLE_PYTHON))

evaluate: setup data ## Evaluation report of an exported model (default: the served, highest version): make evaluate MODEL=models/cifar10/3
	$(PY) -m training.ship.evaluate --export $(or $(MODEL),$(MODEL_BASE_PATH)/$(shell ls $(MODEL_BASE_PATH) | grep -E '^[0-9]+$$' | sort -n | tail -n 1)) --data $(DATA_DIR)

cost: setup ## Serving cost of exported models: multiply-adds, parameters, size, images/s at batch 32 [MODELS="models/cifar10/3 models/cifar10/4"]
	$(PY) -m training.ship.cost $(or $(MODELS),$(wildcard $(MODEL_BASE_PATH)/[0-9]*))

test: setup data ## Run the whole test suite (real redis-server, gunicorn, gRPC, SavedModel)
	$(PY) -m pytest

# ---- Serving: the local stack as processes (scripts/stack.py), logs in .stack/logs/ ----
WORKERS ?= 2
.PHONY: up down bench-serve profile-serve chaos soak

up: $(VENV)/.serving-installed $(PROTOS) ## Install what serving needs (venv; redis-server via apt), start redis, model server, workers (WORKERS=2), gateway on :5000
	@scripts/need_redis.sh
	$(PY) -m scripts.stack up --workers $(WORKERS) --model-base-path $(MODEL_BASE_PATH)

down: ## Stop everything `make up` started
	$(PY) -m scripts.stack down

bench-serve: ## Load-test the running stack (make up first), then the seed's one-process server: req/s, p50/p99, batch size, ratio
	$(PY) -m scripts.bench_serve

profile-serve: ## Where a request's CPU goes in the running stack (make up first): CPU ms per request per process under wrk, py-spy's breakdown by stage [SECONDS=20]
	$(PY) -m scripts.profile_serve $(if $(SECONDS),--seconds $(SECONDS))

chaos: setup ## Own stack under load while a worker, Redis, the model server and gunicorn's workers fail [SECONDS=60]; report in runs/chaos
	$(PY) -m scripts.chaos chaos $(if $(SECONDS),--seconds $(SECONDS))

soak: setup ## Own stack at half its capacity for SECONDS (600): RSS of every process, Redis memory, slopes, plot in runs/soak
	$(PY) -m scripts.chaos soak $(if $(SECONDS),--seconds $(SECONDS)) $(if $(RATE),--rate $(RATE))

# ---- Deployment: docker compose (built and run here) and Kubernetes (k8s/, validated offline) ----
K8S_VERSION ?= 1.32.0
K8S_NAMESPACE ?= cifar10
K8S_SECRET ?= k8s/overlays/production/redis-password.env
.PHONY: validate k8s-secret base-image images compose-up compose-down train-k8s study-k8s
# The default overlay rendered from a temporary copy of k8s/ with a throwaway Redis password (the
# trainer template does not depend on it): what `make train-k8s` and `make study-k8s` print
# instead of creating where there is no kubectl context, or with DRY_RUN=1.
RENDER_K8S = tree=$$(mktemp -d); trap 'rm -rf "$$tree"' EXIT; \
	$(PY) -c 'import sys; from k8s.tests.manifests import copy_tree; copy_tree(sys.argv[1])' "$$tree"; \
	kubectl kustomize "$$tree/k8s"
CREATE_OR_RENDER = if [ -z "$(DRY_RUN)" ] && kubectl config current-context >/dev/null 2>&1; then \
		$(PY) -m $(1) $(2) --namespace $(K8S_NAMESPACE); \
	else echo "no kubectl context (or DRY_RUN=1): printing the manifests, creating nothing" >&2; \
		$(RENDER_K8S) | $(PY) -m $(1) $(2) --dry-run --template-file -; fi

# Production does not render without the operator's password file, so the overlays are rendered
# from a temporary copy of k8s/ that has a throwaway one (never the real file).
validate: setup ## Check deployment offline: compose config, kustomize renders, strict k8s schemas, policy tests
	docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: valid"
	docker-compose -f docker-compose.yml -f compose/offline.yml config -q && echo "docker-compose.yml + compose/offline.yml: valid"
	@set -eo pipefail; tree=$$(mktemp -d); trap 'rm -rf "$$tree"' EXIT; \
	$(PY) -c 'import sys; from k8s.tests.manifests import copy_tree; copy_tree(sys.argv[1])' "$$tree"; \
	for dir in k8s k8s/base $(wildcard k8s/overlays/*); do \
		kubectl kustomize "$$tree/$$dir" | $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k $(K8S_VERSION) -; \
		echo "$$dir: renders, passes the Kubernetes $(K8S_VERSION) schemas"; done
	@set -eo pipefail; $(RENDER_K8S) > "$$tree/k8s.yaml"; \
	$(PY) -m k8s.trainjob.study --dry-run --template-file "$$tree/k8s.yaml" --configs base1,base3 --seeds 0,1,2 \
		--parallelism 2 | $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k $(K8S_VERSION) -; \
	$(PY) -m k8s.trainjob --dry-run --template-file "$$tree/k8s.yaml" --config default --gpus 8 --nodes 2 \
		| $(VENV)/bin/kubernetes-validate --strict --quiet --no-warn -k $(K8S_VERSION) -; \
	echo "make study-k8s, make train-k8s GPUS=8 NODES=2: their Jobs and Service pass the Kubernetes $(K8S_VERSION) schemas"
	$(PY) -m pytest -q k8s/tests

k8s-secret: ## Create the production Redis password: k8s/overlays/production/redis-password.env (git-ignored, mode 600); keeps an existing one
	@if [ -e "$(K8S_SECRET)" ]; then echo "$(K8S_SECRET) exists; kept (delete it to rotate the password)"; \
	else set -eo pipefail; password=$$(python3 -c 'import secrets; print(secrets.token_hex(32))'); \
		(umask 077; printf 'REDIS_PASSWORD=%s\n' "$$password" > "$(K8S_SECRET)"); \
		echo "wrote $(K8S_SECRET): kubectl apply -k k8s/ now deploys with this password"; fi

base-image: ## Build the local Python 3.11 bookworm base (debootstrap + docker import) for machines that cannot pull python:3.11-slim-bookworm
	compose/base-image.sh

images: ## Build every image with BuildKit (gateway, worker, trainer; model server stand-in and Redis where the official images cannot be pulled)
	compose/images.sh

GATEWAY_HOST_PORT ?= 5000
compose-up: images ## Start the stack in Docker (compose v2 or Debian's v1; compose/offline.yml where the official images are missing); waits for /readyz?deep=1
	GATEWAY_HOST_PORT=$(GATEWAY_HOST_PORT) compose/compose.sh up --detach
	@started=$$SECONDS; until curl -sf "http://127.0.0.1:$(GATEWAY_HOST_PORT)/readyz?deep=1" >/dev/null; do \
		if [ $$((SECONDS - started)) -gt 300 ]; then echo "not ready after 300 s: compose/compose.sh logs" >&2; exit 1; fi; \
		sleep 1; done; echo "ready in $$((SECONDS - started)) s after up: http://127.0.0.1:$(GATEWAY_HOST_PORT)/"

compose-down: ## Stop the Docker stack (volumes, hence trained models, are kept)
	compose/compose.sh down

train-k8s: setup ## Train a new model version in the cluster: make train-k8s CONFIG=default EPOCHS=5 [PRECISION=] [BACKEND=jax] [GPUS=8 per pod] [NODES=2 pods] [SCALE_BATCH=1]; no kubectl context or DRY_RUN=1: prints it
	@set -eo pipefail; $(call CREATE_OR_RENDER,k8s.trainjob,--config $(CONFIG) $(if $(EPOCHS),--epochs $(EPOCHS)) \
		$(if $(PRECISION),--precision $(PRECISION)) $(if $(GPUS),--gpus $(GPUS)) $(if $(NODES),--nodes $(NODES)) \
		$(if $(SCALE_BATCH),--scale-batch) --backend $(BACKEND))

study-k8s: setup ## The study as one Indexed Job, one GPU per run: make study-k8s CONFIGS=base1,base3 SEEDS=0,1,2 [PARALLELISM=4] [EPOCHS=]; no kubectl context or DRY_RUN=1: prints it
	@set -eo pipefail; $(call CREATE_OR_RENDER,k8s.trainjob.study,$(if $(CONFIGS),--configs $(CONFIGS)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(PARALLELISM),--parallelism $(PARALLELISM)) $(if $(EPOCHS),--epochs $(EPOCHS)))
