"""Session fixtures shared by the container and compose tests: the project's image is built
once per run (on the cached stand-in base) and removed at the end, with anything else the
session created."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy import podman


@pytest.fixture(scope="session")
def project_image() -> Iterator[str]:
    podman.require_podman()
    tag = podman.build_project_image()
    try:
        yield tag
    finally:
        podman.sweep_session_leftovers()
        podman.remove_image(tag)


@pytest.fixture(scope="session")
def prometheus_standin_image() -> str:
    podman.require_podman()
    return podman.standin_image("prometheus")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if podman.REPORT.lines:
        terminalreporter.write_sep("-", "container images")
        for line in podman.REPORT.lines:
            terminalreporter.write_line(line)
