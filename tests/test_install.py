"""Install hygiene, checked statically (the real installs run in containers:
tests/deploy/test_container_quickstart.py and test_container.py).

- constraints.txt pins every runtime dependency at a version its requirement accepts;
- the SDK's dependencies (`pip install pkvm-sim`) hold none of the server's;
- `make serve` installs the `server` extra only, `make test` the `test` extra.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
SERVER_ONLY = {"grpcio-health-checking", "grpcio-reflection", "grpcio-status", "prometheus-client"}


def requirements(group: str | None) -> list[Requirement]:
    raw = PYPROJECT["dependencies"] if group is None else PYPROJECT["optional-dependencies"][group]
    return [Requirement(r) for r in raw]


def pins() -> dict[str, str]:
    result = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            result[canonicalize_name(name)] = version
    return result


def test_constraints_pin_every_runtime_dependency_at_an_accepted_version() -> None:
    pinned = pins()
    for requirement in requirements(None) + requirements("server"):
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} is not in constraints.txt: run `make lock`"
        assert requirement.specifier.contains(pinned[name]), (
            f"constraints.txt pins {name}=={pinned[name]}, outside {requirement}: `make lock`"
        )


def test_sdk_dependencies_hold_none_of_the_servers() -> None:
    sdk = {canonicalize_name(r.name) for r in requirements(None)}
    assert sdk.isdisjoint(SERVER_ONLY)
    assert {"grpcio", "protobuf"} <= sdk
    assert {canonicalize_name(r.name) for r in requirements("server")} >= SERVER_ONLY
    assert "grpcio-tools" not in sdk | {canonicalize_name(r.name) for r in requirements("server")}


def make_dry_run(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run from scratch (a venv that does not exist yet)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    result = subprocess.run(
        [make, "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True, env=env,
    )
    return result.stdout


def test_make_serve_installs_the_server_extra_only(tmp_path: Path) -> None:
    commands = make_dry_run("serve", tmp_path)
    assert "install-system-packages --runtime" in commands
    installs = re.findall(r"pip install .*", commands)
    assert any("--constraint constraints.txt" in c and "'.[server]'" in c for c in installs)
    assert not any("[test]" in c or "hadolint" in c for c in installs), installs
    assert commands.rstrip().endswith("pkvm-sim serve")


def test_make_test_installs_the_test_extra_and_the_tools(tmp_path: Path) -> None:
    commands = make_dry_run("test", tmp_path)
    assert "'.[test]'" in commands and "podman-compose" in commands
    assert "scripts/install-system-packages\n" in commands  # all of them, not --runtime
