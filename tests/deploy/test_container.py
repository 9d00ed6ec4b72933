"""The project's image, built with Podman and run for real (see tests/deploy/podman.py).

One image per session (the `project_image` fixture); one long-running container for the
checks that only look at it, and short-lived ones for what changes its state (ports, SIGTERM).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pkvm_client import Hypervisor

from tests.deploy import podman
from tests.deploy.catalog import REPO_ROOT

# Image builds and container start-ups: longer than the suite's default per-test timeout.
pytestmark = pytest.mark.timeout(900)

GRPC_PORT, METRICS_PORT = 50051, 9100
GRACE_SECONDS = 10  # `serve`'s default grace period (--grace-seconds)
NOT_IN_THE_RUNTIME = ("grpcio-tools", "pytest", "hypothesis", "mypy", "ruff", "buf-bin")


@dataclass(frozen=True)
class Running:
    name: str
    grpc_port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text: str = response.read().decode()
            return text


@pytest.fixture(scope="module")
def service(project_image: str) -> Iterator[Running]:
    """The image as users run it: default command, both ports published on loopback."""
    name = podman.unique_name("service")
    try:
        podman.run_container(name, project_image, publish=(GRPC_PORT, METRICS_PORT))
        podman.wait_healthy(name)
        yield Running(name, podman.published_port(name, GRPC_PORT),
                      podman.published_port(name, METRICS_PORT))
    finally:
        podman.remove_container(name)


def gauge(metrics_text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", metrics_text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_image_healthcheck_passes(service: Running) -> None:
    assert podman.healthcheck(service.name).returncode == 0
    state = podman.inspect(service.name)["State"]
    assert state["Health"]["Status"] == "healthy"


def test_process_runs_as_the_non_root_user(service: Running) -> None:
    assert podman.inspect(service.name)["Config"]["User"] == "10001:10001"
    [header, row] = podman.podman("top", service.name, "user", "args").stdout.splitlines()[:2]
    user, args = row.split(None, 1)
    assert user == "pkvm" and "pkvm-sim serve" in args
    assert podman.podman("exec", service.name, "id", "-u").stdout.strip() == "10001"


def test_a_vm_is_driven_through_the_published_grpc_port(service: Running) -> None:
    with Hypervisor(service.target) as hv:
        hv.wait_ready(timeout=30)
        free_before = {p.name: p.free_pages for p in hv.stats().pools}["hyp"]
        with hv.create_vm(nr_vcpus=1, slice_pages=16, name="container-test") as vm:
            pfn = vm.alloc_pages(order=2)  # 4 pages out of the hyp pool, owned by the VM
            in_use = {p.name: p.free_pages for p in hv.stats().pools}["hyp"]
            assert in_use <= free_before - 4
            assert gauge(service.metrics(), "pkvm_vms") == 1
            vm.put_page(pfn)
        assert {p.name: p.free_pages for p in hv.stats().pools}["hyp"] == free_before
    assert gauge(service.metrics(), "pkvm_vms") == 0


def test_metrics_answer_on_the_published_port(service: Running) -> None:
    text = service.metrics()
    assert "# TYPE pkvm_pool_free_pages gauge" in text
    assert gauge(text, "pkvm_vmemmap_bytes") > 0


def test_runtime_holds_only_the_pinned_server_dependencies(project_image: str) -> None:
    """No build, test or lint tools; every installed distribution at its constraints.txt pin."""
    freeze = podman.podman("run", "--rm", "--entrypoint", "pip", project_image, "freeze",
                           "--exclude", "pkvm-sim", "--exclude", "pip", "--exclude", "setuptools")
    installed = dict(line.split("==") for line in freeze.stdout.split())
    names = {canonical(name) for name in installed}
    assert names.isdisjoint(NOT_IN_THE_RUNTIME), names
    pins = constraints()
    assert {canonical(n): v for n, v in installed.items()} == {
        n: pins[n] for n in names
    }, "image differs from constraints.txt (make lock)"
    assert {"grpcio", "grpcio-health-checking", "prometheus-client"} <= names


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version.strip()
    return pins


def test_healthcheck_follows_the_port_the_server_really_uses(project_image: str) -> None:
    name = podman.unique_name("other-port")
    try:
        podman.run_container(name, project_image, "serve", "--listen", "0.0.0.0:6000",
                             "--metrics-listen", "0.0.0.0:6001", publish=(6000,))
        podman.wait_healthy(name, timeout=60)
        with Hypervisor(f"127.0.0.1:{podman.published_port(name, 6000)}") as hv:
            hv.wait_ready(timeout=10)
    finally:
        podman.remove_container(name)


def test_healthcheck_fails_when_no_service_listens(project_image: str) -> None:
    name = podman.unique_name("idle")
    try:
        podman.run_container(name, project_image, "-c", "import time; time.sleep(120)",
                             entrypoint="python")
        assert podman.healthcheck(name).returncode != 0
    finally:
        podman.remove_container(name)


def test_sigterm_exits_0_within_the_grace_period(project_image: str) -> None:
    name = podman.unique_name("sigterm")
    try:
        podman.run_container(name, project_image, publish=(GRPC_PORT,))
        podman.wait_healthy(name)
        # podman stop: SIGTERM, then SIGKILL (exit 137) if still running after the timeout.
        # Exit code 0 means the server ended by itself, inside the grace period it was given.
        podman.podman("stop", "--time", str(GRACE_SECONDS), name)
        state = podman.inspect(name)["State"]
        assert state["ExitCode"] == 0, podman.podman("logs", name).stderr
    finally:
        podman.remove_container(name)


def test_an_unusable_podman_fails_under_ci_and_skips_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(podman, "_podman_problem", lambda: "podman is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run every test"):
        podman.require_podman()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="podman is not installed"):
        podman.require_podman()
