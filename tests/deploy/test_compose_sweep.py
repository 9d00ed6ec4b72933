"""deploy/docker-compose.sweep.yml, checked statically (the image is not built here: the
sweep's Dask run itself is tested with real `dask scheduler`/`dask worker` processes in
tests/tools/test_sweep.py).

- The compose-spec JSON schema, and every bind mount exists in the repo.
- One image for all: the project's Dockerfile with the `sweep` extra; the service's own image
  (docker-compose.yml) stays without it.
- The scheduler listens on every address, the workers and the sweep use its in-network
  address, the sweep reads a grid that is mounted and writes into a volume.
- Every flag the commands use exists: `pkvm-sim sweep` parses its command, and `dask
  scheduler --help` / `dask worker --help` list theirs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.tools import sweep

from tests.deploy import dockerfile
from tests.deploy.catalog import DEPLOY_DIR, load_yaml
from tests.deploy.test_compose import bind_mounts, check_compose_schema, container_path_of
from tests.unavailable import unavailable

SWEEP_YML = DEPLOY_DIR / "docker-compose.sweep.yml"
SCHEDULER = "tcp://dask-scheduler:8786"
WORKERS = ("dask-worker-1", "dask-worker-2")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    doc: dict[str, Any] = load_yaml(SWEEP_YML)
    return doc["services"]


def test_matches_the_compose_spec_schema() -> None:
    result = check_compose_schema(SWEEP_YML)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_scheduler_two_workers_and_a_sweep(services: dict[str, Any]) -> None:
    assert set(services) == {"dask-scheduler", *WORKERS, "sweep"}


def test_all_run_the_project_image_with_the_sweep_extra(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service["image"] == "${PKVM_SIM_SWEEP_IMAGE:-pkvm-sim-sweep:local}", name
        build = service["build"]
        context = (DEPLOY_DIR / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == dockerfile.DOCKERFILE
        assert build["args"]["PKVM_SIM_EXTRAS"] == "sweep"
    # The Dockerfile adds the extras it is given to the server's install, none by default.
    [install] = [r for r in dockerfile.stages()[-1].args("RUN") if "pip install" in r]
    assert '"$1[server]"' in install and '${PKVM_SIM_EXTRAS:+"$1[$PKVM_SIM_EXTRAS]"}' in install
    assert 'ARG PKVM_SIM_EXTRAS=""' in dockerfile.DOCKERFILE.read_text()


def test_the_workers_and_the_sweep_use_the_scheduler(services: dict[str, Any]) -> None:
    scheduler = services["dask-scheduler"]
    assert scheduler["entrypoint"] == ["dask"]
    command = scheduler["command"]
    assert command[0] == "scheduler"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8786"
    for name in WORKERS:
        worker = services[name]
        assert worker["entrypoint"] == ["dask"]
        assert worker["command"][:2] == ["worker", SCHEDULER]
        assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    args = sweep_args(services["sweep"])
    assert args.scheduler == SCHEDULER and args.wait_workers == len(WORKERS)
    assert set(services["sweep"]["depends_on"]) == set(WORKERS)


def sweep_args(service: dict[str, Any]) -> argparse.Namespace:
    """The sweep service's command, parsed by `pkvm-sim sweep` itself (an unknown flag fails),
    with ${SWEEP_GRID:-...} taken at its default."""
    command = [part.replace("${SWEEP_GRID:-sweep.toml}", "sweep.toml")
               for part in service["command"]]
    assert command[0] == "sweep"
    parser = argparse.ArgumentParser(prog="pkvm-sim sweep")
    sweep.add_arguments(parser)
    return parser.parse_args(command[1:])


def test_the_sweep_reads_a_mounted_grid_and_writes_into_a_volume(
        services: dict[str, Any]) -> None:
    service = services["sweep"]
    args = sweep_args(service)
    grid = DEPLOY_DIR.parent / "examples" / "sweep.toml"
    assert container_path_of(service, grid) == args.grid
    assert sweep.load_grid(grid).points()  # the grid the stack runs is a valid one
    out_dir = str(Path(args.out).parent)
    assert f"sweep-results:{out_dir}" in service["volumes"]
    assert "sweep-results" in load_yaml(SWEEP_YML)["volumes"]


def test_every_bind_mount_exists_in_the_repo(services: dict[str, Any]) -> None:
    mounts = [source for service in services.values() for source, _ in bind_mounts(service)]
    assert mounts and all(source.exists() for source in mounts)


def test_the_image_healthcheck_is_replaced_where_no_server_runs(
        services: dict[str, Any]) -> None:
    """The image's HEALTHCHECK asks a pkvm-sim gRPC server; none runs in these containers."""
    for name in (*WORKERS, "sweep"):
        assert services[name]["healthcheck"] == {"disable": True}, name
    assert "8786" in " ".join(services["dask-scheduler"]["healthcheck"]["test"])


@pytest.mark.parametrize("role", ["scheduler", "worker"])
def test_dask_knows_every_flag_the_stack_passes(role: str, services: dict[str, Any]) -> None:
    dask = Path(sys.executable).parent / "dask"
    if not dask.exists():
        unavailable("the dask command is not installed (pip install 'pkvm-sim[sweep]')")
    command = services["dask-scheduler" if role == "scheduler" else WORKERS[0]]["command"]
    help_text = subprocess.run([str(dask), role, "--help"], capture_output=True, text=True,
                               timeout=120, check=True).stdout
    flags = [part for part in command if part.startswith("--")]
    assert flags
    for flag in flags:
        assert flag in help_text, f"dask {role} has no {flag}"


def test_the_deploy_readme_documents_the_sweep_stack() -> None:
    readme = (DEPLOY_DIR / "README.md").read_text()
    assert SWEEP_YML.name in readme and "PKVM_SIM_EXTRAS" in readme


def test_the_workers_get_the_sweeps_worker_settings(services: dict[str, Any]) -> None:
    """What a local sweep cluster sets (WORKER_CONFIG), the compose workers get through Dask's
    environment variables (DASK_ + the key's parts joined by __, upper case)."""
    expected = {"DASK_" + key.replace(".", "__").replace("-", "_").upper(): str(value)
                for key, value in sweep.WORKER_CONFIG.items()}
    for name in WORKERS:
        assert services[name]["environment"] == expected, name
