"""Real kernels for tests/kernel: Debian's arm64 kernels, fetched once and cached
(scripts/fetch-kernels), booted under qemu-system-aarch64. Without QEMU or the kernels the
tests skip on a developer's machine and fail under CI (CI=true), where .ci/run provides both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from pkvm_sim.tools.kernel_check import DEFAULT_CACHE, QEMU, KernelImage, load_manifest

from tests.unavailable import unavailable

REPO = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO / "scripts" / "fetch-kernels"
_REPORT: list[str] = []


@pytest.fixture(scope="session")
def real_kernels() -> list[KernelImage]:
    """The cached kernels, fetching them first when the cache is empty and apt can."""
    if shutil.which(QEMU) is None:
        unavailable(f"{QEMU} is not installed (Debian: qemu-system-arm)")
    kernels = load_manifest(DEFAULT_CACHE)
    if not kernels and shutil.which("apt-get") and _writable(DEFAULT_CACHE):
        subprocess.run(["bash", str(FETCH_SCRIPT)], check=False, timeout=900)
        kernels = load_manifest(DEFAULT_CACHE)
    if not kernels:
        unavailable(f"no kernels cached in {DEFAULT_CACHE}: run scripts/fetch-kernels")
    return kernels


def _writable(cache: Path) -> bool:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(cache, os.W_OK)


def report(line: str) -> None:
    """A line for the end of the pytest run (what was booted, what it reserved)."""
    _REPORT.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORT:
        terminalreporter.section("real kernels booted (tests/kernel)")
        for line in _REPORT:
            terminalreporter.write_line(line)
