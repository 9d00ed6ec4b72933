# pkvm-sim: the gRPC service (:50051) and its Prometheus metrics (:9100/metrics).
#
#   docker build -t pkvm-sim .
#   docker run --rm -p 50051:50051 -p 9100:9100 pkvm-sim
#
# Where no image registry can be reached (the project's machines), `make image` builds it
# with Podman on a local stand-in for the base image (PYTHON_IMAGE, scripts/podman-images).
# Built, run and driven for real by tests/deploy/test_container.py; see deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: turn the source tree into a wheel with the compiled core ------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A C compiler for mypyc (setup.py compiles pkvm_sim.core), and Python's headers where the
# base lacks them (the official image has them; a Debian python3 needs python3-dev). Only
# this stage has them: the runtime stage below ships no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && if ! python -c 'import sys, sysconfig, pathlib; sys.exit(not pathlib.Path(sysconfig.get_paths()["include"], "Python.h").is_file())'; then \
        apt-get install -y --no-install-recommends python3-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
# The image must run the compiled core: fail here if the wheel came out pure.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -c 'import glob, sys, zipfile; names = zipfile.ZipFile(glob.glob("/wheels/pkvm_sim-*.whl")[0]).namelist(); sys.exit(0 if any("core/_native__mypyc" in n for n in names) else "the wheel holds no compiled core")'

# ---- runtime: the wheel with the server's dependencies only, run as an unprivileged user ----
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pkvm \
 && useradd --system --uid 10001 --gid pkvm --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pkvm

# The project's wheel with its `server` extra (no grpcio-tools, no test or lint tools), every
# dependency at the version constraints.txt pins (`make lock` regenerates it).
# PKVM_SIM_EXTRAS adds optional extras, e.g. `sweep` (Dask) for deploy/docker-compose.sweep.yml;
# empty by default: the service's image carries the service only.
ARG PKVM_SIM_EXTRAS=""
COPY constraints.txt /wheels/
COPY --from=build /wheels/ /wheels/
RUN set -- /wheels/pkvm_sim-*.whl \
 && pip install --constraint /wheels/constraints.txt "$1[server]" \
        ${PKVM_SIM_EXTRAS:+"$1[$PKVM_SIM_EXTRAS]"} \
 && rm -rf /wheels

USER 10001:10001
WORKDIR /tmp

EXPOSE 50051 9100

# Ready = the standard gRPC health service says SERVING, on whichever port the server really
# listens (`pkvm-sim healthcheck` reads the container's listening sockets from /proc).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["pkvm-sim", "healthcheck", "--timeout", "3"]

# Explicit addresses: the server's own default is loopback, unreachable from outside.
ENTRYPOINT ["pkvm-sim"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9100"]
