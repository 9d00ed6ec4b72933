# pkvm-sim: the gRPC service (:50051) and its Prometheus metrics (:9100/metrics).
#
#   docker build -t pkvm-sim .
#   docker run --rm -p 50051:50051 -p 9100:9100 pkvm-sim
#
# Linted by hadolint in tests/deploy/test_dockerfile.py; no Docker engine runs on the
# project's machines, so the image itself is not built there (see deploy/README.md).

# ---- build: turn the source tree into a wheel ----------------------------------------------
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: the wheel and its dependencies, run as an unprivileged user --------------------
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 pkvm \
 && useradd --system --uid 10001 --gid pkvm --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pkvm

# The project's own wheel; its dependencies come from pyproject.toml's ranges.
COPY --from=build /wheels/ /wheels/
RUN pip install /wheels/*.whl && rm -rf /wheels

USER 10001:10001
WORKDIR /tmp

EXPOSE 50051 9100

# Ready = the standard gRPC health service says SERVING (grpcio-health-checking is a dependency).
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; r = hg.HealthStub(grpc.insecure_channel('localhost:50051')).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["pkvm-sim"]
CMD ["serve"]
