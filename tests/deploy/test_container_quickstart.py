"""The README's quick start on a stock Debian with Python 3.11, and the SDK installed alone.

A container of the `stock` stand-in (Debian bookworm with python3 and make, no python3-venv;
scripts/podman-images) gets a copy of the repository's files and runs `make serve` as root,
as a user would. `make serve` must install python3-venv itself, then only the runtime
dependencies, then serve. In the same container the SDK is installed without the server's
dependencies (`pip install .`) and drives the running service.

pip inside the container reaches PyPI through this machine's TLS setup, so the host's CA
bundle is mounted and named by PIP_CERT, as on the host. (pip caches nothing here: the index's
answers are not cacheable on these machines, so there is no pip cache to keep between runs.)
"""

from __future__ import annotations

import subprocess
import tarfile
from collections.abc import Iterator

import pytest

from tests.deploy import podman
from tests.deploy.catalog import REPO_ROOT

# Image builds and container start-ups: longer than the suite's default per-test timeout.
pytestmark = pytest.mark.timeout(900)

DEV_ONLY = ("grpcio-tools", "pytest", "hypothesis", "mypy", "ruff", "buf-bin")
SERVER_ONLY_MODULES = ("prometheus_client", "grpc_health", "grpc_reflection", "grpc_status")
SDK_SCRIPT = f"""
import importlib.util
present = [m for m in {SERVER_ONLY_MODULES + ("grpc_tools",)!r} if importlib.util.find_spec(m)]
assert not present, f"the SDK install pulled in {{present}}"
from pkvm_client import Hypervisor
with Hypervisor("127.0.0.1:50051") as hv:
    hv.wait_ready(timeout=30)
    with hv.create_vm(nr_vcpus=1, slice_pages=16, name="sdk-only") as vm:
        vm.put_page(vm.alloc_pages(order=1))
print("SDK OK")
"""


def repo_files() -> list[str]:
    """What a clone holds: tracked files, plus new ones not ignored (a working tree)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [f for f in out.split("\0") if f and (REPO_ROOT / f).is_file()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    podman.require_podman()
    image = podman.standin_image("stock")
    inbox = tmp_path_factory.mktemp("quickstart")
    with tarfile.open(inbox / "src.tar", "w") as tar:
        for name in repo_files():
            tar.add(REPO_ROOT / name, arcname=name)
    name = podman.unique_name("quickstart")
    script = "mkdir /work && tar -C /work -xf /in/src.tar && cd /work && exec make serve"
    try:
        podman.podman(
            "run", "-d", "--name", name, "--label", f"org.pkvm-sim.test={podman.SESSION_ID}",
            "-v", f"{inbox}:/in:ro", "-v", "/etc/ssl/certs:/etc/ssl/certs:ro",
            "-e", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", image, "bash", "-c", script,
        )
        listening = podman.poll(
            lambda: "pkvm-sim listening on" in logs(name), timeout=400, interval=2
        )
        assert listening, logs(name)[-3000:]
        yield name
    finally:
        podman.remove_container(name)


def logs(name: str) -> str:
    result = podman.podman("logs", name, check=False)
    return result.stdout + result.stderr


def test_make_serve_on_stock_debian_installs_what_it_needs_and_serves(quickstart: str) -> None:
    assert "installing: python3-venv" in logs(quickstart)
    check = podman.podman("exec", quickstart, "/work/.venv/bin/pkvm-sim", "healthcheck")
    assert check.returncode == 0


def test_make_serve_installs_only_the_runtime_dependencies(quickstart: str) -> None:
    freeze = podman.podman("exec", quickstart, "/work/.venv/bin/pip", "freeze").stdout.lower()
    installed = {line.split("==")[0].replace("_", "-") for line in freeze.split() if "==" in line}
    assert installed.isdisjoint(DEV_ONLY), installed
    assert {"grpcio", "grpcio-health-checking", "prometheus-client"} <= installed
    size = podman.podman("exec", quickstart, "du", "-sm", "/work/.venv").stdout.split()[0]
    podman.REPORT.add(f"make serve on stock Debian: .venv of {size} MB")


@pytest.fixture(scope="module")
def sdk_venv(quickstart: str) -> str:
    """/sdk: a venv holding `pip install .`, the project without the server extra."""
    install = (
        "python3 -m venv /sdk && /sdk/bin/pip install --quiet --disable-pip-version-check "
        "--constraint /work/constraints.txt /work"
    )
    podman.podman("exec", quickstart, "bash", "-c", install, timeout=300)
    return "/sdk"


def test_sdk_installs_and_works_without_the_server_dependencies(
    quickstart: str, sdk_venv: str
) -> None:
    result = podman.podman("exec", quickstart, f"{sdk_venv}/bin/python", "-c", SDK_SCRIPT,
                           check=False)
    assert result.returncode == 0 and "SDK OK" in result.stdout, result.stdout + result.stderr


def test_serve_without_the_server_extra_says_what_to_install(
    quickstart: str, sdk_venv: str
) -> None:
    result = podman.podman("exec", quickstart, f"{sdk_venv}/bin/pkvm-sim", "serve", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pkvm-sim[server]" in result.stderr


def test_repo_files_are_what_a_clone_holds() -> None:
    files = repo_files()
    assert {"Makefile", "constraints.txt", "scripts/install-system-packages"} <= set(files)
    assert not any(f.startswith(".venv/") for f in files)
