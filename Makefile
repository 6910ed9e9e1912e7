# Every target bootstraps .venv from the pinned requirements by itself, so any of them works
# first on a clean clone. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/elecdemand.yaml
MODEL_URI ?= models:/forecaster@production
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9100
DEVICE ?= auto
IMAGE_PREFIX ?=
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

.DEFAULT_GOAL := help
.PHONY: help install protos run train serve client test test-packaging lint bench bench-peers soak docker clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements/dev.txt -c requirements/constraints.txt
	touch $(STAMP)

install: $(STAMP) protos ## create .venv from the pinned requirements and generate the gRPC stubs

protos: $(STAMP) ## generate the Python gRPC stubs from protos/ (never edit them by hand)
	$(PY) -m serving.protogen

run: install ## train/register/promote the default model if needed, then serve it on $(HOST):$(PORT)
	$(PY) -m training ensure-production --config $(CONFIG)
	$(PY) -m serving --model-uri $(MODEL_URI) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --device $(DEVICE)

train: install ## fit, backtest, export, register and gate a model (CONFIG=configs/NAME.yaml)
	$(PY) -m training fit --config $(CONFIG)

serve: install ## serve MODEL_URI over gRPC
	$(PY) -m serving --model-uri $(MODEL_URI) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --device $(DEVICE)

client: install ## stream a CSV to a running server (CSV=path, default: a slice of elecdemand)
	$(PY) -m serving.client stream --target $(HOST):$(PORT) $(if $(CSV),--csv $(CSV),--demo)

test: install ## run the whole test suite (unit, integration, e2e)
	$(PY) -m pytest -q tests

test-packaging: install ## install the serving image's requirements into a fresh venv: no torch, and it serves (slow)
	$(PY) -m pytest -q -m packaging --timeout=1800 tests/packaging

lint: $(STAMP) ## ruff, and hadolint on the Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

bench: install ## run the benchmarks in bench/ and print their tables (JSON in bench/results/)
	$(PY) -m bench

bench-peers: install ## this server beside MLflow's scoring server, MLServer and Triton, same model and load (own venv in bench/.venv-peers; ~20 min)
	$(PY) -m bench.peers

soak: install ## 200 streams for 5 minutes against the server on loopback: errors, RSS growth, latency (fails on either)
	$(PY) -m bench.soak

docker: ## build the serving (ONNX Runtime + CUDA, no torch) and training images
	docker build --target serving -t $(IMAGE_PREFIX)streamcast-serving:$(IMAGE_TAG) .
	docker build --target training -t $(IMAGE_PREFIX)streamcast-training:$(IMAGE_TAG) .

clean: ## remove the venv, generated stubs, local MLflow store and caches
	rm -rf $(VENV) serving/_proto .pytest_cache .ruff_cache mlruns mlartifacts artifacts bench/results bench/.venv-peers
	rm -f mlflow.db
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
