"""deploy/docker-compose.yml and docker-compose.compare.yml, checked statically.

- The compose-spec JSON schema (vendored by check-jsonschema as `vendor.compose-spec`).
- Everything they bind-mount or build from exists in the repo.
- They agree with the Dockerfile (ports), prometheus.yml (scrape target, rules path) and the
  Grafana provisioning (datasource URL, dashboards path).
- Image overrides, healthy-service dependencies and explicit listen addresses.
They are also started for real (Grafana excepted) by test_compose_stack.py.
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
COMPARE_YML = DEPLOY_DIR / "docker-compose.compare.yml"
COMPOSE_FILES = [COMPOSE_YML, COMPARE_YML]
SIMULATORS = {"pkvm-sim", "pkvm-sim-v513", "pkvm-sim-v514"}
REAL_IMAGES = {
    "PROMETHEUS_IMAGE": "prom/prometheus:v2.53.0",
    "GRAFANA_IMAGE": "grafana/grafana:11.6.0",
}


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


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    result = check_compose_schema(path)
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


def test_services_are_the_expected_ones(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"pkvm-sim", "prometheus", "grafana", "load"}
    assert compose["services"]["load"]["profiles"] == ["load"]
    compare = load_yaml(COMPARE_YML)
    assert set(compare["services"]) == {"pkvm-sim-v513", "pkvm-sim-v514", "prometheus", "grafana"}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_bind_mount_exists_in_the_repo(path: Path) -> None:
    missing = [
        f"{name}: {source}"
        for name, service in load_yaml(path)["services"].items()
        for source, _ in bind_mounts(service)
        if not source.exists()
    ]
    assert missing == []


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_images_can_be_overridden_and_default_to_the_real_ones(path: Path) -> None:
    services = load_yaml(path)["services"]
    for variable, real in REAL_IMAGES.items():
        service = "prometheus" if variable == "PROMETHEUS_IMAGE" else "grafana"
        assert services[service]["image"] == f"${{{variable}:-{real}}}"
    for name in SIMULATORS & set(services):
        assert services[name]["image"] == "${PKVM_SIM_IMAGE:-pkvm-sim:local}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_simulators_listen_on_every_address_explicitly(path: Path) -> None:
    """The server's own default is loopback: other services could not reach it."""
    services = load_yaml(path)["services"]
    for name in SIMULATORS & set(services):
        command = services[name]["command"]
        assert command[0] == "serve"
        assert command[command.index("--listen") + 1] == "0.0.0.0:50051"
        assert command[command.index("--metrics-listen") + 1] == "0.0.0.0:9100"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_simulators_get_more_than_the_servers_grace_period_to_stop(path: Path) -> None:
    """serve's grace period is 10 s (--grace-seconds); Compose's default SIGKILL comes at 10 s."""
    services = load_yaml(path)["services"]
    for name in SIMULATORS & set(services):
        assert services[name]["stop_grace_period"] == "15s"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_clients_of_a_simulator_wait_until_it_is_healthy(path: Path) -> None:
    services = load_yaml(path)["services"]
    for name in ("prometheus", "load"):
        if name not in services:
            continue
        depends = services[name]["depends_on"]
        simulators = SIMULATORS & set(services)
        assert simulators <= set(depends), name
        assert {depends[s]["condition"] for s in simulators} == {"service_healthy"}


def test_side_by_side_prometheus_labels_each_simulator_with_its_profile() -> None:
    compare = load_yaml(COMPARE_YML)
    service = compare["services"]["prometheus"]
    config_path = DEPLOY_DIR / "prometheus" / "prometheus-compare.yml"
    assert container_path_of(service, config_path) == "/etc/prometheus/prometheus.yml"
    [job] = [j for j in load_yaml(config_path)["scrape_configs"] if j["job_name"] == "pkvm-sim"]
    labelled = {
        target: static["labels"]["profile"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert labelled == {"pkvm-sim-v513:9100": "v5.13", "pkvm-sim-v514:9100": "v5.14"}
    for target, profile in labelled.items():
        command = compare["services"][target.split(":")[0]]["command"]
        assert command[command.index("--profile") + 1] == profile


def test_side_by_side_prometheus_config_passes_promtool() -> None:
    result = subprocess.run(
        [require_binary("promtool"), "check", "config", "prometheus-compare.yml"],
        capture_output=True, text=True, timeout=120, cwd=DEPLOY_DIR / "prometheus",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_readme_documents_both_stacks_and_what_cannot_run_here() -> None:
    readme = (DEPLOY_DIR / "README.md").read_text()
    for path in COMPOSE_FILES:
        assert path.name in readme
    assert "Grafana" in readme and "cannot run here" in readme


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
