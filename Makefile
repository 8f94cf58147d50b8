# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install demo server stop test test-all test-gpu lint lint-docker bench clean \
        images push-images check-bases pin-bases work-pool k8s-render deploy

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The umbrella `factory` flow on its embedded defaults (CPU, no network, ./.factory/; docs/orchestration.md).
demo: $(STAMP)
	$(BIN)/factory demo

## A real Prefect server + worker + the local deployments on 127.0.0.1 (the UI path); `make stop` ends them.
server: $(STAMP)
	$(BIN)/factory server start

stop: $(STAMP)
	$(BIN)/factory server stop

## Lint (Python and Dockerfiles), then the default (fast) test suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint $(DOCKERFILES)
	$(BIN)/python -m pytest

## Every test, slow ones included.
test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

## The CUDA checks (marked gpu; skipped where CUDA is absent).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -s

lint: $(STAMP) lint-docker
	$(BIN)/ruff check .

lint-docker: $(STAMP)
	$(BIN)/hadolint $(DOCKERFILES)

clean:
	rm -rf .factory build *.egg-info

# --- Kubernetes and container images (docs/kubernetes.md) ---------------------------------
# No image is built by `make test` or CI; these targets need docker and a registry.
DOCKERFILES = images/trainer/Dockerfile images/catalog/Dockerfile
include images/bases.env
REGISTRY  ?= localhost:5000
# The image tag is the commit: 12 hex digits, "-dirty" when the tree has uncommitted changes
# (such an image is not reproducible from the SHA; push only clean ones).
IMAGE_TAG ?= $(shell git describe --always --dirty --abbrev=12 --exclude='*' 2>/dev/null)
DOCKER    ?= docker
TRAINER_IMAGE = $(REGISTRY)/dlm-factory-trainer:$(IMAGE_TAG)
CATALOG_IMAGE = $(REGISTRY)/dlm-factory-catalog:$(IMAGE_TAG)
OVERLAY   ?= dev
WORK_POOL ?= local
export CUDA_DEVEL_IMAGE CUDA_DEVEL_DIGEST CUDA_RUNTIME_IMAGE CUDA_RUNTIME_DIGEST UV_IMAGE UV_DIGEST \
       PYTHON_IMAGE PYTHON_DIGEST REGISTRY

check-bases:
	@for v in CUDA_DEVEL_DIGEST=$(CUDA_DEVEL_DIGEST) CUDA_RUNTIME_DIGEST=$(CUDA_RUNTIME_DIGEST) \
	          UV_DIGEST=$(UV_DIGEST) PYTHON_DIGEST=$(PYTHON_DIGEST); do \
	  case "$${v#*=}" in sha256:*) ;; \
	  *) echo "error: $${v%%=*} is not a sha256 digest: run 'make pin-bases' (images/bases.env)" >&2; exit 2;; \
	  esac; done

## Build both images from the repository root, tagged with the git SHA.
images: check-bases
	$(DOCKER) build -f images/trainer/Dockerfile -t $(TRAINER_IMAGE) \
	  --build-arg CUDA_DEVEL_IMAGE=$(CUDA_DEVEL_IMAGE) --build-arg CUDA_DEVEL_DIGEST=$(CUDA_DEVEL_DIGEST) \
	  --build-arg CUDA_RUNTIME_IMAGE=$(CUDA_RUNTIME_IMAGE) --build-arg CUDA_RUNTIME_DIGEST=$(CUDA_RUNTIME_DIGEST) \
	  --build-arg UV_IMAGE=$(UV_IMAGE) --build-arg UV_DIGEST=$(UV_DIGEST) .
	$(DOCKER) build -f images/catalog/Dockerfile -t $(CATALOG_IMAGE) \
	  --build-arg PYTHON_IMAGE=$(PYTHON_IMAGE) --build-arg PYTHON_DIGEST=$(PYTHON_DIGEST) .

push-images: images
	$(DOCKER) push $(TRAINER_IMAGE)
	$(DOCKER) push $(CATALOG_IMAGE)

## Pin images/bases.env to the digests the tags point at now (needs docker and the registries).
pin-bases:
	images/pin-bases.sh

## Create (or update) the `k8s-gpu` work pool with the factory's base job template.
work-pool: $(STAMP)
	$(BIN)/prefect work-pool create k8s-gpu --type kubernetes \
	  --base-job-template k8s/base-job-template.json --overwrite

## Print what `kubectl apply -k k8s/overlays/$(OVERLAY)` would apply.
k8s-render: $(STAMP)
	$(BIN)/kubectl kustomize k8s/overlays/$(OVERLAY)

## Deploy prefect.yaml's deployments for one work pool: `local` (default) or `k8s-gpu`
## (builds and pushes the trainer image to $(REGISTRY) first).
deploy: $(STAMP)
	$(BIN)/prefect --no-prompt deploy --name $(WORK_POOL)
