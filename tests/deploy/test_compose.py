"""deploy/docker-compose.yml, checked without a Docker engine.

- The compose-spec JSON schema (vendored by check-jsonschema as `vendor.compose-spec`).
- Everything it bind-mounts or builds from exists in the repo.
- It agrees with the Dockerfile (ports), prometheus.yml (scrape target, rules path) and the
  Grafana provisioning (datasource URL, dashboards path).
"""

from __future__ import annotations

import posixpath
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import dockerfile
from tests.deploy.catalog import DEPLOY_DIR, load_yaml
from tests.prometheus_harness import require_binary

COMPOSE_YML = DEPLOY_DIR / "docker-compose.yml"


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(COMPOSE_YML)
    return doc


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path resolved against deploy/, container path) of a service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            source, target = volume["source"], volume["target"]
        else:
            source, target = volume.split(":")[:2]
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        mounts.append(((DEPLOY_DIR / source).resolve(), target))
    return mounts


def container_path_of(service: dict[str, Any], host_path: Path) -> str:
    """Where `host_path` appears inside the service's container, via its bind mounts."""
    host_path = host_path.resolve()
    for source, target in bind_mounts(service):
        if host_path == source:
            return target
        if source in host_path.parents:
            return posixpath.join(target, host_path.relative_to(source).as_posix())
    raise AssertionError(f"{host_path} is not mounted into the container")


def published_container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).split(":")[-1].split("/")[0]))
    return ports


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = check_compose_schema(COMPOSE_YML)
    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path: Path) -> None:
    """The schema check can fail: a misspelt key and a malformed port are rejected."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n"
        "  pkvm-sim:\n"
        "    image: pkvm-sim:local\n"
        "    restart: sometimes\n"
        "    portz: ['9100:9100']\n"
    )
    result = check_compose_schema(broken)
    assert result.returncode != 0
    assert "portz" in result.stdout + result.stderr


def test_services_are_the_expected_three(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"pkvm-sim", "prometheus", "grafana"}


def test_every_bind_mount_exists_in_the_repo(compose: dict[str, Any]) -> None:
    missing = [
        f"{name}: {source}"
        for name, service in compose["services"].items()
        for source, _ in bind_mounts(service)
        if not source.exists()
    ]
    assert missing == []


def test_pkvm_sim_is_built_from_the_repo_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["pkvm-sim"]["build"]
    context = (DEPLOY_DIR / build["context"]).resolve()
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == dockerfile.DOCKERFILE
    assert (context / "pyproject.toml").is_file()


def test_pkvm_sim_publishes_exactly_the_dockerfile_exposed_ports(compose: dict[str, Any]) -> None:
    exposed = dockerfile.exposed_ports()
    assert exposed == {50051, 9100}
    assert published_container_ports(compose["services"]["pkvm-sim"]) == exposed


def test_prometheus_scrapes_the_compose_service_on_its_metrics_port(
    compose: dict[str, Any],
) -> None:
    config = load_yaml(DEPLOY_DIR / "prometheus" / "prometheus.yml")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "pkvm-sim"]
    for target in (t for sc in job["static_configs"] for t in sc["targets"]):
        host, _, port = target.rpartition(":")
        assert host in compose["services"], f"{target}: no compose service {host!r}"
        assert int(port) in dockerfile.exposed_ports()


def test_prometheus_finds_its_config_and_rules_in_the_container(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    config_in_container = container_path_of(service, DEPLOY_DIR / "prometheus" / "prometheus.yml")
    assert f"--config.file={config_in_container}" in service["command"]
    config = load_yaml(DEPLOY_DIR / "prometheus" / "prometheus.yml")
    rules_in_container = container_path_of(service, DEPLOY_DIR / "prometheus" / "rules.yml")
    expected = {
        posixpath.normpath(posixpath.join(posixpath.dirname(config_in_container), f))
        for f in config["rule_files"]
    }
    assert expected == {rules_in_container}


def test_grafana_datasource_points_at_the_prometheus_service(compose: dict[str, Any]) -> None:
    provisioning = load_yaml(DEPLOY_DIR / "grafana/provisioning/datasources/prometheus.yml")
    [datasource] = provisioning["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert 9090 in published_container_ports(compose["services"]["prometheus"])
    grafana = compose["services"]["grafana"]
    assert container_path_of(grafana, DEPLOY_DIR / "grafana/provisioning") == (
        "/etc/grafana/provisioning"
    )


def test_grafana_loads_dashboards_from_the_mounted_folder(compose: dict[str, Any]) -> None:
    provisioning = load_yaml(DEPLOY_DIR / "grafana/provisioning/dashboards/dashboards.yml")
    [provider] = provisioning["providers"]
    grafana = compose["services"]["grafana"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == container_path_of(
        grafana, DEPLOY_DIR / "grafana/dashboards"
    )
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == container_path_of(grafana, DEPLOY_DIR / "grafana/dashboards/pkvm-sim.json")
