# feedrank: `make help` lists what you can do.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned; on machines without a local CPU wheel set TORCH_INDEX to avoid the CUDA build:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_PIP_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# Local runs keep their own Redis on this port (never the machine's shared 6379).
LOCAL_REDIS_PORT ?= 6390
RUN_DIR := .run
# make loadtest: against a ranker that is already running (it starts none).
RANKER_URL ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 50
LOADTEST_SPAWN_RATE ?= $(LOADTEST_USERS)
LOADTEST_DURATION ?= 30s

STAMP := $(VENV)/.installed

.PHONY: help setup test lint format bench loadtest run redis redis-stop clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP) ## create .venv with every service's dependencies and the dev tools
	@test -f .env || cp .env.example .env

test: setup ## unit and integration tests (they start their own Redis: Docker or redis-server)
	$(BIN)/pytest -m "not e2e"

lint: setup ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: setup ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup ## benchmarks on ~1M events: ETL throughput and memory, training, ranking quality, ranker latency
	$(BIN)/python -m tests.benchmarks

loadtest: setup ## Locust load on a running ranker at RANKER_URL (starts none): rps, p50/p95/p99
	@$(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(RANKER_URL)/readyz', timeout=5)" 2>/dev/null \
	  || { echo "no ready ranker at $(RANKER_URL): start one (python -m services.ranker serve) or set RANKER_URL"; exit 1; }
	@mkdir -p $(RUN_DIR)/loadtest
	@set -o pipefail; $(BIN)/locust -f tests/load/locustfile.py --headless --only-summary \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_SPAWN_RATE) -t $(LOADTEST_DURATION) --host $(RANKER_URL) \
	  --csv $(RUN_DIR)/loadtest/ranker 2>&1 | tee $(RUN_DIR)/loadtest/locust.log; rc=$$?; \
	  grep '^LOADTEST' $(RUN_DIR)/loadtest/locust.log; exit $$rc

redis: ## start a private local Redis on LOCAL_REDIS_PORT (for `make run`)
	@mkdir -p $(RUN_DIR)
	@$(BIN)/python -c "import redis,sys; redis.Redis(port=$(LOCAL_REDIS_PORT)).ping()" 2>/dev/null \
	  || redis-server --port $(LOCAL_REDIS_PORT) --bind 127.0.0.1 --save "" --appendonly no \
	       --daemonize yes --dir $(CURDIR)/$(RUN_DIR) --pidfile $(CURDIR)/$(RUN_DIR)/redis.pid \
	       --logfile $(CURDIR)/$(RUN_DIR)/redis.log

redis-stop: ## stop the private local Redis
	@test -f $(RUN_DIR)/redis.pid && kill $$(cat $(RUN_DIR)/redis.pid) || true

run: setup redis ## set up, then run etl and train locally (real RQ worker) and show the registered model
	$(BIN)/python -m services.trainer pipeline run etl+train --source simulate
	$(BIN)/python -m services.trainer worker --burst --queues ingest features training
	$(BIN)/python -m services.feature pipeline runs --name etl --limit 1
	$(BIN)/python -m services.feature pipeline runs --name train --limit 1
	$(BIN)/python -m services.trainer registry list

clean: redis-stop ## remove local data, caches and the virtualenv
	rm -rf $(RUN_DIR) data .mypy_cache .ruff_cache .pytest_cache $(VENV)
