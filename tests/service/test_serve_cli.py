"""`pkvm-sim serve` as a user meets it: `make serve ARGS=...`, `--help` naming the PKVM_SIM_*
variables, an unknown variable refused like an unknown config key, and a port in use named
in one line of ours. Real processes throughout."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkvm_client import Hypervisor
from pkvm_sim.knobs import ALL_KNOBS

REPO = Path(__file__).resolve().parents[2]
SERVE = [sys.executable, "-m", "pkvm_sim.cli", "serve"]
READY = re.compile(r"^pkvm-sim listening on (\S+)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without PKVM_SIM_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKVM_SIM_")}
    return {**env, **extra}


def serve_once(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A serve that must refuse to start (a serve that starts is killed by the timeout)."""
    return subprocess.run([*SERVE, *flags], capture_output=True, text=True, timeout=60,
                          env=env or clean_env())


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_make_serve_passes_args() -> None:
    """`make serve` took no flags on main."""
    process = subprocess.Popen(
        ["make", "--no-print-directory", "serve",
         "ARGS=--profile v5.13 --listen 127.0.0.1:0 --metrics-listen off --log-level WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env=clean_env())
    try:
        assert process.stdout is not None
        line = ""
        while not READY.match(line):
            line = process.stdout.readline()
            assert line, "make serve ended before serving"
        target = READY.match(line).group(1)  # type: ignore[union-attr]
        with Hypervisor(target) as hv:
            assert hv.reserve().profile == "v5.13"  # the flag reached the server
    finally:
        # SIGTERM to the server alone; make ends with it. (make forwards a SIGTERM of its own
        # to the server: two at once can deadlock serve's handler, which sets a
        # threading.Event from the signal handler; serve.py's signal handling is not ours.)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        if not children:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def test_help_names_every_pkvm_sim_variable() -> None:
    result = subprocess.run([*SERVE, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for knob in ALL_KNOBS:
        assert f"PKVM_SIM_{knob.name.upper()}" in text, knob.name
    assert "PKVM_SIM_CONFIG" in text


def test_an_unknown_pkvm_sim_variable_is_an_error() -> None:
    """A misspelt variable was silently ignored on main, while a misspelt TOML key is an
    error: the server started on the default profile."""
    result = serve_once("--listen", "127.0.0.1:0", "--metrics-listen", "off",
                        env=clean_env(PKVM_SIM_PROFLE="v5.13"))
    assert result.returncode == 2
    assert result.stderr == (
        "pkvm-sim serve: unknown environment variable: PKVM_SIM_PROFLE (did you mean"
        " PKVM_SIM_PROFILE?); `pkvm-sim serve --help` names every PKVM_SIM_* variable\n")


def test_the_projects_other_variables_do_not_stop_serve() -> None:
    """PKVM_SIM_IMAGE and friends belong to compose files and scripts of the project: a
    shell that exported them still serves."""
    process = subprocess.Popen(
        [*SERVE, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, text=True,
        env=clean_env(PKVM_SIM_IMAGE="pkvm-sim:local", PKVM_SIM_GRPC_PORT="50051",
                      PKVM_SIM_KERNEL_CACHE="/tmp", PKVM_SIM_PROFILE="v6.1"))
    try:
        assert process.stdout is not None
        match = READY.match(process.stdout.readline())
        assert match
        with Hypervisor(match.group(1)) as hv:
            assert hv.reserve().profile == "v6.1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_grpc_port_in_use_is_one_line_naming_the_address(busy_port: int) -> None:
    """Main printed gRPC's C-core log line and advice about GRPC_VERBOSITY."""
    result = serve_once("--listen", f"127.0.0.1:{busy_port}", "--metrics-listen", "off")
    assert result.returncode == 2
    assert "GRPC_VERBOSITY" not in result.stderr and "add_port" not in result.stderr
    assert result.stderr.splitlines()[-1] == \
        f"pkvm-sim serve: cannot listen on 127.0.0.1:{busy_port} (gRPC): address already in use"


def test_metrics_port_in_use_is_one_line_naming_the_address(busy_port: int) -> None:
    """Main said `[Errno 98] Address already in use` without the address."""
    result = serve_once("--listen", "127.0.0.1:0", "--metrics-listen",
                        f"127.0.0.1:{busy_port}", "--log-level", "WARNING")
    assert result.returncode == 2
    assert result.stderr == (f"pkvm-sim serve: cannot listen on 127.0.0.1:{busy_port}"
                             " (metrics): address already in use\n")
