"""Helpers of the load tests: run `pkvm-sim load` in-process, and a server in a child
process (for tests that must freeze it with SIGSTOP, and for Locust)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.cli import main

from tests.service.attack_helpers import ServeProcess


def run_load(capsys: pytest.CaptureFixture[str], target: str, tmp_path: Path,
             *extra: str, command: str = "load") -> tuple[int, dict[str, Any], Any]:
    """Run the CLI with --json FILE; returns (exit code, report, captured stdout/stderr)."""
    report_file = tmp_path / "report.json"
    code = main([command, "--target", target, "--progress", "none", "--json",
                 str(report_file), *extra])
    captured = capsys.readouterr()
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return code, report, captured


@contextmanager
def server_process() -> Iterator[tuple[str, int]]:
    """A real `pkvm-sim serve` in its own process (tests/service/attack_helpers.ServeProcess,
    the one way the tests start one): (target, pid). A test may SIGSTOP it; it is killed at
    the end, stopped or not."""
    with ServeProcess() as server:
        yield server.target, server.process.pid
