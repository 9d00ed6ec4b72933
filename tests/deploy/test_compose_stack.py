"""The compose stacks, started for real with podman-compose (see tests/deploy/podman.py).

deploy/docker-compose.yml runs the project's image (built once per session) and Prometheus
from a stand-in image of Debian's package (PROMETHEUS_IMAGE), on random loopback ports.
Grafana cannot run here (no image, no registry); its files are checked by test_dashboard.py.

podman 4.3 (Debian 12) cannot wait for a `service_healthy` condition: podman-compose 1.6
logs "Ignored ... condition check" and starts the dependants at once. The fixtures therefore
do what Docker Compose does with that condition: start the service, wait until the image's
HEALTHCHECK passes, then start the rest. test_compose.py checks that the file declares it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import podman
from tests.deploy.catalog import DEPLOY_DIR, load_yaml
from tests.prometheus_harness import PrometheusHandle, free_loopback_port, require_binary

# Image builds and container start-ups: longer than the suite's default per-test timeout.
pytestmark = pytest.mark.timeout(900)

COMPOSE_YML = DEPLOY_DIR / "docker-compose.yml"
COMPARE_YML = DEPLOY_DIR / "docker-compose.compare.yml"
LOAD_SECONDS = 3


class Stack:
    """One podman-compose project: its environment, its services, its Prometheus."""

    def __init__(self, compose_file: Path, project: str, env: dict[str, str]) -> None:
        self.compose_file = compose_file
        self.project = project
        self.env = {**podman.podman_env(), **env}
        self.podman_compose = require_binary("podman-compose")

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.podman_compose, "-p", self.project, "-f", str(self.compose_file), *args],
            capture_output=True, text=True, env=self.env, timeout=timeout,
        )
        assert result.returncode == 0, f"podman-compose {args}:\n{result.stdout}{result.stderr}"
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # podman-compose's naming

    def up(self, *services: str, profile: str | None = None) -> None:
        options = ["--profile", profile] if profile else []
        self.compose(*options, "up", "-d", "--no-build", *services)

    def down(self) -> None:
        subprocess.run(
            [self.podman_compose, "-p", self.project, "-f", str(self.compose_file),
             "--profile", "load", "down", "-v", "--timeout", "5"],
            capture_output=True, text=True, env=self.env, timeout=300,
        )

    def prometheus(self) -> StackPrometheus:
        return StackPrometheus(self, podman.published_port(self.container("prometheus"), 9090))


class StackPrometheus(PrometheusHandle):
    """The stack's Prometheus, reached on its published port."""

    def __init__(self, stack: Stack, port: int) -> None:
        self.stack = stack
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self, lines: int = 10) -> str:
        logs = podman.podman("logs", self.stack.container("prometheus"), check=False)
        return "\n".join((logs.stdout + logs.stderr).splitlines()[-lines:])

    def rules(self) -> list[dict[str, Any]]:
        groups = self.api_get("rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]


def loopback_port() -> str:
    return f"127.0.0.1:{free_loopback_port()}"


@pytest.fixture
def stack_env(project_image: str, prometheus_standin_image: str) -> dict[str, str]:
    return {
        "PKVM_SIM_IMAGE": project_image,
        "PROMETHEUS_IMAGE": prometheus_standin_image,
        "GRAFANA_IMAGE": "grafana-cannot-run-here:none",  # never started by these tests
        "PROMETHEUS_PORT": loopback_port(),
    }


def started(stack: Stack, services: list[str], then: list[str]) -> Iterator[Stack]:
    """Start `services`, wait for their HEALTHCHECK, start `then`; always tear it all down."""
    try:
        stack.up(*services)
        for service in services:
            podman.wait_healthy(stack.container(service), timeout=90)
        stack.up(*then)
        yield stack
    finally:
        stack.down()
        podman.sweep_session_leftovers()


@pytest.fixture
def main_stack(stack_env: dict[str, str]) -> Iterator[Stack]:
    env = {**stack_env, "PKVM_SIM_GRPC_PORT": loopback_port(),
           "PKVM_SIM_METRICS_PORT": loopback_port(), "LOAD_SECONDS": str(LOAD_SECONDS),
           "LOAD_VMS": "4"}
    stack = Stack(COMPOSE_YML, podman.unique_name("stack"), env)
    yield from started(stack, ["pkvm-sim"], then=["prometheus"])


@pytest.fixture
def compare_stack(stack_env: dict[str, str]) -> Iterator[Stack]:
    env = {**stack_env, "PKVM_SIM_V513_GRPC_PORT": loopback_port(),
           "PKVM_SIM_V514_GRPC_PORT": loopback_port()}
    stack = Stack(COMPARE_YML, podman.unique_name("compare"), env)
    yield from started(stack, ["pkvm-sim-v513", "pkvm-sim-v514"], then=["prometheus"])


def test_stack_scrapes_the_service_evaluates_the_rules_and_runs_a_load(main_stack: Stack) -> None:
    """One stack for three checks: starting it is the expensive part."""
    prometheus = main_stack.prometheus()
    # Prometheus inside the stack reaches the service by its compose name.
    [up] = prometheus.wait_for_query('up{job="pkvm-sim"} == 1', timeout=60)
    assert up.labels["instance"] == "pkvm-sim:9100"

    # Every rule of rules.yml is loaded, evaluates without error, and recordings return data.
    expected = {
        rule.get("record") or rule["alert"]
        for group in load_yaml(DEPLOY_DIR / "prometheus" / "rules.yml")["groups"]
        for rule in group["rules"]
    }

    def all_evaluated() -> bool:
        rules = prometheus.rules()
        return {r["name"] for r in rules} == expected and all(
            r["health"] == "ok" and not r["lastEvaluation"].startswith("0001") for r in rules
        )

    assert podman.poll(all_evaluated, timeout=30), prometheus.rules()
    kinds = {r["type"] for r in prometheus.rules()}
    assert kinds == {"recording", "alerting"}
    prometheus.wait_for_query('{__name__=~"pkvm:.+"}', timeout=30)

    # The load profile's service: a short load against the service, then its leak check.
    main_stack.up("load", profile="load")
    load = main_stack.container("load")
    exit_code = podman.podman("wait", load, timeout=LOAD_SECONDS + 120).stdout.strip()
    logs = podman.podman("logs", load, check=False)
    assert exit_code == "0", logs.stdout + logs.stderr
    [ops] = prometheus.wait_for_query("sum(pkvm_operations_total) > 0", timeout=30)
    assert ops.value > 0


def test_side_by_side_stack_labels_each_profile(compare_stack: Stack) -> None:
    prometheus = compare_stack.prometheus()
    up = prometheus.wait_for_query(
        'up{job="pkvm-sim"} == 1', timeout=60, predicate=lambda samples: len(samples) == 2
    )
    assert {s.labels["profile"]: s.labels["instance"] for s in up} == {
        "v5.13": "pkvm-sim-v513:9100",
        "v5.14": "pkvm-sim-v514:9100",
    }
    # The series' headline, seen through the stack: struct hyp_page shrank from 32 to 4 bytes,
    # so the same machine's vmemmap is 8 times smaller under v5.14.
    vmemmap = prometheus.wait_for_query(
        "pkvm_vmemmap_bytes", timeout=30, predicate=lambda samples: len(samples) == 2
    )
    by_profile = {s.labels["profile"]: s.value for s in vmemmap}
    assert by_profile["v5.13"] == 8 * by_profile["v5.14"]
