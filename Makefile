# feedrank: `make help` lists what you can do.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned and always the CPU build: a local wheel (pip's find-links) when there is one, else
# from TORCH_INDEX. PyPI's own torch for Linux is the multi-GB CUDA build: never taken unless asked
# (make setup TORCH_INDEX=https://pypi.org/simple).
TORCH_VERSION := 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Local runs keep their own Redis on this port (never the machine's shared 6379).
LOCAL_REDIS_PORT ?= 6390
RUN_DIR := .run
# make loadtest: against a ranker that is already running (it starts none).
RANKER_URL ?= http://127.0.0.1:8000
LOADTEST_USERS ?= 50
LOADTEST_SPAWN_RATE ?= $(LOADTEST_USERS)
LOADTEST_DURATION ?= 30s

STAMP := $(VENV)/.installed

.PHONY: help setup test faults lint format bench bench-loop loadtest run redis redis-stop clean \
        wheels stack-env secrets-check images up down e2e docs prometheus-check

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null \
	  || $(BIN)/pip install --quiet --index-url $(TORCH_INDEX) torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP) ## create .venv with every service's dependencies and the dev tools
	@$(MAKE) --no-print-directory stack-env

test: setup ## unit, integration and fault tests (they start their own Redis: Docker or redis-server)
	$(BIN)/pytest -m "not e2e and not faults"
	@$(MAKE) --no-print-directory faults

faults: setup ## the fault suite alone: injected faults and fuzzing, one FAULT line of figures per fault
	$(BIN)/pytest -m faults -s -p no:cacheprovider

lint: setup ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: setup ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup ## benchmarks on ~1M events: ETL throughput and memory, training, ranking quality, ranker latency
	$(BIN)/python -m tests.benchmarks

bench-loop: setup ## the learning loop's error rates on the loop simulator (false alarms, A/A, power, drift knobs; budget 15 min)
	$(BIN)/python -m tests.benchmarks loop

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

# ---- The Docker Compose stack (compose.yaml). Runbook: README.md, "Running the stack".
COMPOSE ?= docker compose

wheels: ## copy this machine's local CPU torch wheel (pip's find-links) into wheels/ for the trainer image
	@mkdir -p wheels
	@links="$$($(PYTHON) -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p") $${PIP_FIND_LINKS:-}"; \
	 found=; for dir in $$links; do dir=$${dir#file://}; \
	   for wheel in "$$dir"/torch-$(TORCH_VERSION)+cpu-*.whl; do \
	     if [ -f "$$wheel" ]; then cp -u "$$wheel" wheels/; found=$$(basename "$$wheel"); fi; done; done; \
	 if [ -n "$$found" ]; then echo "wheels/: $$found (the trainer image installs torch from it)"; \
	 else echo "wheels/: no local torch $(TORCH_VERSION) CPU wheel; the trainer image takes torch from the CPU index"; fi

stack-env: ## create .env from .env.example with random secrets, or add the keys a newer .env.example introduced
	@test -f .env || { touch .env && chmod 600 .env && echo ".env: created (random secrets)"; }
	@grep -E '^[A-Z_]+=' .env.example | while IFS='=' read -r key value; do \
	   grep -q "^$$key=" .env && continue; \
	   case "$$value" in change-me*) value=$$(python3 -c 'import secrets; print(secrets.token_hex(24))');; esac; \
	   echo "$$key=$$value" >> .env; done

secrets-check: stack-env ## refuse to start the stack while .env holds a change-me placeholder
	@! grep -qE '^[A-Z_]+=change-me' .env || { echo "make: .env still holds change-me placeholders ($$(grep -oE '^[A-Z_]+=change-me' .env | cut -d= -f1 | xargs)): put secrets there, or delete .env to have random ones generated" >&2; exit 1; }

images: wheels ## build every image of the stack (torch only in the trainer's, and never a CUDA build)
	GIT_SHA=$$(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(COMPOSE) build

up: secrets-check images ## start the stack and wait until a champion is served (first start: etl + train)
	$(COMPOSE) up -d --wait --wait-timeout 1800
	@$(COMPOSE) ps --format 'table {{.Service}}\t{{.Status}}\t{{.Ports}}'

down: ## stop the stack (keeps the volumes: lake, queue, MLflow; `docker compose down -v` drops them)
	$(COMPOSE) down

e2e: setup wheels ## build the images, run the whole stack (tiny profile) end to end with Docker, tear it down
	$(BIN)/pytest -m e2e tests/e2e -v -s -p no:cacheprovider

docs: setup ## regenerate docs/api.md and docs/openapi/*.json from the services' OpenAPI schemas
	$(BIN)/python -m docs.gen_api

prometheus-check: ## validate prometheus/ (config and alert rules) with promtool from the Prometheus image
	docker run --rm -v $(CURDIR)/prometheus:/etc/prometheus:ro --entrypoint /bin/promtool \
	  prom/prometheus:v2.55.1 check config /etc/prometheus/prometheus.yml
