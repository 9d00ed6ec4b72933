"""Podman for the container tests: the real image, built and run on this machine.

No Docker engine and no image registry are available here, so the tests use Podman (Debian's
package) with the project's containers.conf (runc, no default ulimits) and local stand-ins for
the base images (scripts/podman-images: a debootstrap'ed Debian bookworm, built once per
machine and reused). Everything a test creates carries a name starting with `NAME_PREFIX`
and the session's id, and is removed by the fixtures, even when a test fails.

Policy for a machine where Podman cannot run (not installed, not root): outside CI the tests
skip with the reason; under CI (`CI` set) they fail, since `.ci/run` installs Podman.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from tests.deploy.catalog import REPO_ROOT
from tests.unavailable import unavailable

CONTAINERS_CONF = REPO_ROOT / "deploy" / "podman" / "containers.conf"
PODMAN_IMAGES = REPO_ROOT / "scripts" / "podman-images"
NAME_PREFIX = "pkvm-sim-test"
SESSION_ID = uuid.uuid4().hex[:8]
PROJECT_IMAGE = f"localhost/pkvm-sim:test-{SESSION_ID}"


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


@cache
def _podman_problem() -> str | None:
    """Why podman cannot run containers here, or None when it can."""
    if shutil.which("podman") is None:
        return "podman is not installed (make test installs it as root; see .ci/run)"
    if os.geteuid() != 0:
        return "the container tests run podman as root (chroot builds, bridge networks)"
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"],
        capture_output=True, text=True, env=podman_env(), timeout=120,
    )
    if info.returncode != 0:
        return f"podman info failed: {info.stderr.strip()}"
    return None


def require_podman() -> None:
    """Skip the test when podman cannot run here, or fail under CI."""
    problem = _podman_problem()
    if problem is None:
        return
    unavailable(problem)


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
    return result


def unique_name(what: str) -> str:
    return f"{NAME_PREFIX}-{SESSION_ID}-{what}"


# --- images ---------------------------------------------------------------------------------


@dataclass
class BuildReport:
    """What the session built, printed at the end of the run (tests/deploy/conftest.py)."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


REPORT = BuildReport()


def _run_podman_images(*args: str, timeout: float) -> str:
    result = subprocess.run(
        ["bash", str(PODMAN_IMAGES), *args],
        capture_output=True, text=True, env=podman_env(), timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"scripts/podman-images {' '.join(args)}: exit {result.returncode}\n"
            f"{result.stderr[-4000:]}"
        )
    return result.stdout.strip().splitlines()[-1]


def standin_image(which: str) -> str:
    """The tag of a stand-in base image (`python` or `prometheus`), built if missing."""
    start = time.monotonic()
    tag = _run_podman_images(which, timeout=1200)
    REPORT.add(f"stand-in {tag}: ready in {time.monotonic() - start:.1f} s "
               f"({image_size_mb(tag):.0f} MB)")
    return tag


def build_project_image() -> str:
    """Build the repo's Dockerfile on the python stand-in; return its tag."""
    start = time.monotonic()
    _run_podman_images("python", timeout=1200)
    base_seconds = time.monotonic() - start
    start = time.monotonic()
    tag = _run_podman_images("project", PROJECT_IMAGE, timeout=1200)
    REPORT.add(f"stand-in base ready in {base_seconds:.1f} s; project image {tag} built in "
               f"{time.monotonic() - start:.1f} s, {image_size_mb(tag):.0f} MB")
    return tag


def image_size_mb(tag: str) -> float:
    size = podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    return int(size) / 1e6


def remove_image(tag: str) -> None:
    podman("rmi", "--force", tag, check=False)


# --- containers -----------------------------------------------------------------------------


def inspect(name: str) -> dict[str, Any]:
    [data] = json.loads(podman("inspect", "--type", "container", name).stdout)
    result: dict[str, Any] = data
    return result


def published_port(name: str, container_port: int) -> int:
    """The host port (on 127.0.0.1) that container_port is published on."""
    out = podman("port", name, f"{container_port}/tcp").stdout.strip().splitlines()[0]
    host, _, port = out.rpartition(":")
    assert host in ("127.0.0.1", "0.0.0.0"), out
    return int(port)


def run_container(name: str, image: str, *args: str, publish: Sequence[int] = (),
                  entrypoint: str | None = None) -> None:
    """`podman run -d` with each `publish` port on a random 127.0.0.1 port."""
    options = ["--name", name, "--label", f"org.pkvm-sim.test={SESSION_ID}"]
    for port in publish:
        options += ["-p", f"127.0.0.1::{port}"]
    if entrypoint is not None:
        options += ["--entrypoint", entrypoint]
    podman("run", "-d", *options, image, *args)


def remove_container(name: str) -> None:
    podman("rm", "--force", "--time", "0", name, check=False)


def healthcheck(name: str) -> subprocess.CompletedProcess[str]:
    """Run the container's HEALTHCHECK once (its exit code is what counts; podman also logs a
    harmless error about systemd timers, which do not exist here)."""
    return podman("healthcheck", "run", name, check=False, timeout=60)


def wait_healthy(name: str, timeout: float = 60) -> None:
    """Run the HEALTHCHECK until it passes: without systemd, podman runs it only on demand."""
    deadline = time.monotonic() + timeout
    while True:
        result = healthcheck(name)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = podman("logs", name, check=False)
            output = logs.stdout + logs.stderr
            raise AssertionError(f"{name} not healthy after {timeout} s: {result.stderr}\n{output}")
        time.sleep(1)


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def sweep_session_leftovers() -> None:
    """Remove whatever this session's containers, pods, networks and volumes left behind."""
    for kind in ("container", "pod", "network", "volume"):
        listed = podman(kind, "ls", "--format", "{{.Name}}", check=False).stdout.split()
        if kind == "container":
            listed = podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split()
        mine = [n for n in listed if SESSION_ID in n]
        if mine:
            podman(kind, "rm", "--force", *mine, check=False)
