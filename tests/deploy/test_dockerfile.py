"""The Dockerfile, checked statically: hadolint, its structure, and its HEALTHCHECK command
(`pkvm-sim healthcheck`) run for real against real servers. The image itself is built and run
by test_container.py."""

from __future__ import annotations

import fnmatch
import os
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


@pytest.mark.parametrize(
    "path", sorted((REPO_ROOT / "deploy" / "podman").glob("*.Containerfile")), ids=lambda p: p.name
)
def test_hadolint_passes_on_the_base_image_stand_ins(path: Path) -> None:
    result = hadolint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """hadolint really lints: an unpinned base image and apt-get without cleanup fail."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install curl\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged image


def test_base_image_is_an_argument_defaulting_to_the_official_python_image() -> None:
    assert dockerfile.global_args() == {"PYTHON_IMAGE": "python:3.11-slim-bookworm"}
    assert [stage.base for stage in dockerfile.stages()] == ["python:3.11-slim-bookworm"] * 2


def test_final_stage_runs_pkvm_sim_serve_as_non_root_on_every_address() -> None:
    final = dockerfile.stages()[-1]
    [user] = final.args("USER")
    assert user.split(":")[0] not in {"root", "0"}
    [entrypoint] = final.args("ENTRYPOINT")
    [cmd] = final.args("CMD")
    assert dockerfile.exec_form(entrypoint) == ["pkvm-sim"]
    # Explicit: the server's own default address is loopback, unreachable from outside.
    assert dockerfile.exec_form(cmd) == [
        "serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9100",
    ]
    assert dockerfile.exposed_ports() == {50051, 9100}


def test_runtime_installs_the_server_extra_under_the_constraints() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "pkvm-sim" in pyproject["project"]["scripts"]
    server = pyproject["project"]["optional-dependencies"]["server"]
    assert any(d.startswith("grpcio-health-checking") for d in server)
    [install] = [r for r in dockerfile.stages()[-1].args("RUN") if "pip install" in r]
    assert "--constraint /wheels/constraints.txt" in install and "[server]" in install
    assert "grpcio-tools" not in install


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


def healthcheck_command(*extra: str) -> list[str]:
    """The Dockerfile's HEALTHCHECK CMD, run here with the venv's `pkvm-sim`."""
    [rest] = dockerfile.stages()[-1].args("HEALTHCHECK")
    options, _, command = rest.partition("CMD ")
    assert "--timeout=" in options and "--interval=" in options
    argv = dockerfile.exec_form(command)
    assert argv[:2] == ["pkvm-sim", "healthcheck"]
    return [sys.executable, "-m", "pkvm_sim.cli", *argv[1:], *extra]


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
    result = subprocess.run(healthcheck_command("--target", f"localhost:{port}"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == exit_code, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    port = free_loopback_port()
    result = subprocess.run(healthcheck_command("--target", f"127.0.0.1:{port}"),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0


@pytest.fixture
def serve_process() -> Iterator[subprocess.Popen[str]]:
    """A real `pkvm-sim serve` on ports the kernel picks (as unknown to the check as any)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert "listening on" in process.stdout.readline()
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_healthcheck_finds_the_port_a_process_really_listens_on(
    serve_process: subprocess.Popen[str],
) -> None:
    result = subprocess.run(healthcheck_command("--pid", str(serve_process.pid)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_healthcheck_follows_the_status_on_the_discovered_port(
    health_server: tuple[int, health.HealthServicer],
) -> None:
    """--pid of this very process, whose only listening port is the health server above:
    NOT_SERVING fails the check, SERVING passes it."""
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    command = healthcheck_command("--pid", str(os.getpid()))
    assert subprocess.run(command, capture_output=True, timeout=30).returncode == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
