"""Habits of the `pkvm-sim` command a user expects of any CLI: `--version`, a closed pipe
ends quietly, and `healthcheck` with no arguments asks only this user's servers. Each runs
the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from tests.tools.test_state_cli import make_file

PKVM_SIM = [sys.executable, "-m", "pkvm_sim.cli"]
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cat` gives in the same place


def shell(command: str) -> subprocess.CompletedProcess[str]:
    """A shell pipeline, with `pkvm-sim` the module this test suite imports."""
    pkvm_sim = " ".join(PKVM_SIM)
    return subprocess.run(["bash", "-c", "set -o pipefail; " + command.replace(
        "pkvm-sim", pkvm_sim)], capture_output=True, text=True, timeout=120)


def test_version() -> None:
    from pkvm_sim import __version__

    result = subprocess.run([*PKVM_SIM, "--version"], capture_output=True, text=True,
                            timeout=60)
    # The version, then which core runs (compiled or pure, and why).
    assert result.returncode == 0 and result.stdout.startswith(f"pkvm-sim {__version__} (core: ")
    assert result.stdout.count("\n") == 1


@pytest.mark.parametrize("reader", ["head -1", "true"])
def test_reserve_into_a_closed_pipe_ends_quietly(reader: str) -> None:
    """BrokenPipeError tracebacks on main."""
    result = shell(f"pkvm-sim reserve --compare | {reader}")
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, \
        result.stderr
    assert result.stderr == ""
    assert result.returncode in (0, EXIT_BROKEN_PIPE)  # 0: the reader took it all in time


def test_state_inspect_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = make_file(tmp_path)
    result = shell(f"pkvm-sim state inspect {path} | true")
    assert result.stderr == "", result.stderr
    assert result.returncode in (0, EXIT_BROKEN_PIPE)
    result = shell(f"pkvm-sim state inspect --json {path} | true")
    assert result.stderr == "", result.stderr


# -- healthcheck -------------------------------------------------------------------------------


@pytest.fixture
def other_program_serving() -> Iterator[int]:
    """A program that is not `pkvm-sim serve` (this test process) answering SERVING on the
    standard health service: what another user's server looks like to a port scan."""
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_healthcheck_without_arguments_asks_no_other_program(
    other_program_serving: int,
) -> None:
    """On main it probed every listening port on the host and reported this one."""
    from pkvm_sim.tools.healthcheck import discover_targets

    port = other_program_serving
    assert f"127.0.0.1:{port}" not in discover_targets(None)
    result = subprocess.run([*PKVM_SIM, "healthcheck", "--timeout", "2"], capture_output=True,
                            text=True, timeout=120)
    assert f":{port}" not in result.stdout + result.stderr
    # --pid still asks exactly the process it names, whatever it runs.
    assert f"127.0.0.1:{port}" in discover_targets(os.getpid())


def test_healthcheck_without_arguments_finds_this_users_server() -> None:
    serve = subprocess.Popen([*PKVM_SIM, "serve", "--listen", "127.0.0.1:0",
                              "--metrics-listen", "off", "--log-level", "WARNING"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        ready = serve.stdout.readline().split()
        assert ready[:3] == ["pkvm-sim", "listening", "on"], ready
        from pkvm_sim.tools.healthcheck import discover_targets

        assert ready[3] in discover_targets(None)
        result = subprocess.run([*PKVM_SIM, "healthcheck", "--timeout", "5"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("SERVING on "), result
    finally:
        serve.terminate()
        serve.wait(timeout=60)
