# retrainflow: `make demo` runs the pipeline on the demo data; `make test` runs the test suite.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
# `retrainflow` sets its own quiet, offline defaults (flows/cli/defaults.py: TF log level, no analytics, the
# .keras_home weights cache); make only exports what its own direct `dvc` calls need.
export DVC_NO_ANALYTICS := 1
# Offline ImageNet weights: a local Keras cache filled from ../shared/weights when that folder exists.
KERAS_HOME ?= $(CURDIR)/.keras_home
export KERAS_HOME

.PHONY: setup demo demo-data test lint format bench keras-home clean repro

setup: $(VENV)/.installed keras-home

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

keras-home:
	@mkdir -p $(KERAS_HOME)/models
	@if [ -d "$(SHARED)/weights" ]; then \
	  for f in $(SHARED)/weights/*.h5; do ln -sf "$$(realpath $$f)" "$(KERAS_HOME)/models/$$(basename $$f)"; done; \
	fi

DEMO_DATA ?= $(SHARED)/datasets/cats_vs_dogs

# Demo-speed overrides for 2 cores (one augmented pass, fewer epochs). `make demo DEMO_SET=` runs params.yaml
# exactly, and then DVC records the run (`dvc status` clean); runs with overrides are never committed to DVC.
DEMO_SET ?= --set augment.passes=1 --set top.epochs=15 --set finetune.epochs=1

# The whole pipeline on the demo data as the Prefect `retrain` flow, then where everything is. The run reports to
# a local Prefect server (a running `make dashboard`, else one started for the run and stopped after it).
demo: export PATH := $(abspath $(BIN)):$(PATH)
demo: setup demo-data
	@[ -d .dvc ] || { $(BIN)/dvc init -q && $(BIN)/dvc config core.analytics false \
	  && $(BIN)/dvc config core.check_update false && echo "initialised DVC (.dvc/)"; }
	$(BIN)/dvc add -q data
	$(BIN)/retrainflow run --with-server $(DEMO_SET)
	@echo; echo "== test metrics (metrics/evaluate.json; all: dvc metrics show)"
	@$(BIN)/python -c "import json; m = json.load(open('metrics/evaluate.json')); \
	  [print(f'  {k:<28} {m[k]:.4f}') for k in sorted(m) if k.startswith(('test_', 'top_only_test_')) and isinstance(m[k], float)]"
	@$(BIN)/retrainflow registry
	@echo "model:    models/champion/model.keras (champion), models/candidate/model.keras (this run)"
	@echo "plots:    plots/*.csv  (render: dvc plots show -> dvc_plots/index.html)"
	@echo "reports:  $$(ls reports/*.png reports/*.md 2>/dev/null | tr '\n' ' ')"
	@echo "registry: models/registry.json  (retrainflow registry)"
	@echo "dashboard: make dashboard, then open the flow run link above (http://127.0.0.1:$(DASHBOARD_PORT))"

# `dvc repro` with every stage reporting to one Prefect server (a running dashboard, else one started for it).
repro: export PATH := $(abspath $(BIN)):$(PATH)
repro: setup
	$(BIN)/python -m flows.cli.prefect_api -- $(BIN)/dvc repro

# The demo images: a copy of ../shared/datasets/cats_vs_dogs (see README for getting it elsewhere).
demo-data:
	@if [ ! -d data/images ]; then \
	  if [ ! -d "$(DEMO_DATA)" ]; then echo "demo data not found at $(DEMO_DATA); set DEMO_DATA=/path/to/class/folders"; exit 1; fi; \
	  mkdir -p data && cp -r "$(DEMO_DATA)" data/images && echo "copied $(DEMO_DATA) -> data/images"; \
	fi

# The Prefect server (API + dashboard) on 127.0.0.1; runs report to it with PREFECT_API_URL=http://127.0.0.1:PORT/api
DASHBOARD_PORT ?= 4200
.PHONY: dashboard
dashboard: setup
	$(BIN)/retrainflow dashboard --port $(DASHBOARD_PORT)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	@for b in bench/[a-z]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf index features cache models metrics plots reports .pytest_cache
