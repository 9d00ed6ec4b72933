"""Helpers of the load tests: run `pkvm-sim load` in-process, and a server in a child
process (for tests that must freeze it with SIGSTOP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.cli import main

REPO = Path(__file__).resolve().parents[2]
SERVER_SCRIPT = """
import sys
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.server import ServerSettings, start
service = start(SimConfig(), ServerSettings(listen="127.0.0.1:0", metrics_listen=None))
print(service.target, flush=True)
sys.stdin.read()  # until the test closes our stdin
service.stop(0)
"""


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
    """A real server in its own process: (target, pid)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        target = proc.stdout.readline().strip()
        assert target, "the server process did not start"
        yield target, proc.pid
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
