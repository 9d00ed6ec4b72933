"""The Dockerfile, checked without a Docker engine: hadolint, its structure, and its
HEALTHCHECK command run for real against a gRPC health server."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy import dockerfile
from tests.deploy.catalog import REPO_ROOT
from tests.prometheus_harness import free_loopback_port, require_binary


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("hadolint"), "--no-color", "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_hadolint_passes() -> None:
    result = hadolint(dockerfile.DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """hadolint really lints: an unpinned base image and apt-get without cleanup fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install curl\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged image


def test_final_stage_runs_pkvm_sim_serve_as_non_root() -> None:
    final = dockerfile.stages()[-1]
    assert final.base.startswith("python:3.11-slim")
    [user] = final.args("USER")
    assert user.split(":")[0] not in {"root", "0"}
    [entrypoint] = final.args("ENTRYPOINT")
    [cmd] = final.args("CMD")
    assert dockerfile.exec_form(entrypoint) == ["pkvm-sim"]
    assert dockerfile.exec_form(cmd) == ["serve"]
    assert dockerfile.exposed_ports() == {50051, 9100}


def test_entrypoint_is_the_projects_console_script() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "pkvm-sim" in pyproject["project"]["scripts"]
    assert any(d.startswith("grpcio-health-checking") for d in pyproject["project"]["dependencies"])


def test_copied_sources_exist_and_are_not_dockerignored() -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in dockerfile.DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [
        rest
        for stage in dockerfile.stages()
        for rest in stage.args("COPY")
        if not rest.startswith("--from")
    ]
    assert copies
    for rest in copies:
        *sources, _dest = rest.split()
        for source in sources:
            source = source.rstrip("/")
            assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repo"
            hits = [p for p in ignored if fnmatch.fnmatch(source, p)]
            assert hits == [], f"{source} is copied but .dockerignore excludes it ({hits})"


# --- HEALTHCHECK --------------------------------------------------------------------------


def healthcheck_command(port: int) -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD, pointed at `port` instead of 50051."""
    [rest] = dockerfile.stages()[-1].args("HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = dockerfile.exec_form(command)
    assert argv[0] == "python" and "localhost:50051" in argv[-1]
    return [sys.executable, *argv[1:-1], argv[-1].replace("localhost:50051", f"localhost:{port}")]


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        yield port, servicer
    finally:
        server.stop(grace=None)


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [(health_pb2.HealthCheckResponse.SERVING, 0), (health_pb2.HealthCheckResponse.NOT_SERVING, 1)],
    ids=["serving", "not-serving"],
)
def test_healthcheck_reports_the_health_service_status(
    health_server: tuple[int, health.HealthServicer], status: int, exit_code: int
) -> None:
    port, servicer = health_server
    servicer.set("", status)
    result = subprocess.run(healthcheck_command(port), capture_output=True, text=True, timeout=30)
    assert result.returncode == exit_code, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    port = free_loopback_port()
    result = subprocess.run(healthcheck_command(port), capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
