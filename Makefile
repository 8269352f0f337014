# retrainflow: `make demo` runs the pipeline on the demo data; `make test` runs the test suite.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TF_CPP_MIN_LOG_LEVEL := 2
# Offline ImageNet weights: a local Keras cache filled from ../shared/weights when that folder exists.
KERAS_HOME ?= $(CURDIR)/.keras_home
export KERAS_HOME

.PHONY: setup demo demo-data test lint format bench keras-home clean

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

demo: setup demo-data
	$(BIN)/retrainflow index

# The demo images: a copy of ../shared/datasets/cats_vs_dogs (see README for getting it elsewhere).
demo-data:
	@if [ ! -d data/images ]; then \
	  if [ ! -d "$(DEMO_DATA)" ]; then echo "demo data not found at $(DEMO_DATA); set DEMO_DATA=/path/to/class/folders"; exit 1; fi; \
	  mkdir -p data && cp -r "$(DEMO_DATA)" data/images && echo "copied $(DEMO_DATA) -> data/images"; \
	fi

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
