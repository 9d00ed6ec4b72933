"""The two flavours of the core (issue 18): compiled with mypyc where `pip install` had a C
compiler, pure Python otherwise or with PKVM_SIM_PURE_PYTHON=1. Which one runs is chosen
once, whole, by pkvm_sim.core; a .so built from older sources must never run."""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pkvm_sim.core as core
import pytest
from pkvm_sim.core import BUILD_MANIFEST, PURE_PYTHON_ENV, choose_flavour
from pkvm_sim.core import hyp_pool as hyp_pool_module

from tests.unavailable import unavailable

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_build(tmp_path: Path, modules: tuple[str, ...] = ("alpha", "beta")) -> Path:
    """A core directory as setup.py leaves it after a successful build."""
    (tmp_path / "__init__.py").write_text("")
    for name in modules:
        (tmp_path / f"{name}.py").write_text(f"X = {name!r}\n")
        (tmp_path / f"{name}{SUFFIX}").write_bytes(b"")
    (tmp_path / f"_native__mypyc{SUFFIX}").write_bytes(b"")
    manifest = {
        "compiled": True, "reason": "", "modules": list(modules),
        "shared_library": "_native__mypyc",
        "sources_sha256": {f"{m}.py": hashlib.sha256(f"X = {m!r}\n".encode()).hexdigest()
                           for m in modules},
    }
    (tmp_path / BUILD_MANIFEST).write_text(json.dumps(manifest))
    return tmp_path


def test_a_fresh_build_runs_compiled(tmp_path: Path) -> None:
    assert choose_flavour(fake_build(tmp_path), {}).name == "compiled"


@pytest.mark.parametrize("value", ["1", "yes"])
def test_the_environment_variable_selects_pure(tmp_path: Path, value: str) -> None:
    flavour = choose_flavour(fake_build(tmp_path), {PURE_PYTHON_ENV: value})
    assert flavour.name == "pure" and PURE_PYTHON_ENV in flavour.reason
    assert choose_flavour(tmp_path, {PURE_PYTHON_ENV: "0"}).name == "compiled"


def test_an_edited_source_makes_the_build_stale(tmp_path: Path) -> None:
    core_dir = fake_build(tmp_path)
    (core_dir / "beta.py").write_text("X = 'edited'\n")
    flavour = choose_flavour(core_dir, {})
    assert flavour.name == "pure" and "beta.py changed since the build" in flavour.reason


def test_a_module_added_after_the_build_makes_it_stale(tmp_path: Path) -> None:
    core_dir = fake_build(tmp_path)
    (core_dir / "gamma.py").write_text("X = 3\n")
    assert "gamma.py added since the build" in choose_flavour(core_dir, {}).reason


def test_a_missing_extension_runs_pure(tmp_path: Path) -> None:
    core_dir = fake_build(tmp_path)
    (core_dir / f"_native__mypyc{SUFFIX}").unlink()
    flavour = choose_flavour(core_dir, {})
    assert flavour.name == "pure" and "_native__mypyc" in flavour.reason


def test_no_compiler_at_install_runs_pure(tmp_path: Path) -> None:
    (tmp_path / BUILD_MANIFEST).write_text(json.dumps(
        {"compiled": False, "reason": "the C build failed:"}))
    flavour = choose_flavour(tmp_path, {})
    assert flavour == core.Flavour("pure", "not compiled at install: the C build failed:")
    assert choose_flavour(tmp_path / "nowhere", {}).name == "pure"


def test_the_installed_core_is_compiled_where_a_compiler_is() -> None:
    if os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        pytest.skip(f"{PURE_PYTHON_ENV} selects the pure core in this run")
    if not (shutil.which("cc") or shutil.which("gcc")):
        unavailable("no C compiler here: the install kept the pure core")
    assert core.CORE_FLAVOUR == "compiled", core.CORE_FLAVOUR_REASON
    assert str(hyp_pool_module.__file__).endswith(SUFFIX)


# The same workload in this process and in a pure child: addresses, refusals and the state
# file's bytes must be identical. (Run with PKVM_SIM_PURE_PYTHON=1 both sides are pure.)
WORKLOAD = textwrap.dedent("""
    import hashlib, json, random, sys
    from pkvm_sim.core import CORE_FLAVOUR, state_file
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.errors import PkvmError
    from pkvm_sim.core.hypervisor import Hypervisor

    hv = Hypervisor.boot(SimConfig.from_mapping({"memblocks": ["0x80000000:1G"]}))
    rng = random.Random(18)
    out = []
    vms = [hv.create_vm(nr_vcpus=1, slice_pages=256).handle for _ in range(4)]
    held = []
    for _ in range(3000):
        handle = rng.choice(vms)
        try:
            if held and rng.random() < 0.45:
                h, pfn = held.pop(rng.randrange(len(held)))
                out.append(["put", hv.put_page(h, pfn)])
            elif rng.random() < 0.1:
                out.append(["fault", repr(hv.host_fault(0x80000000 + rng.randrange(1 << 30)))])
            else:
                pfn = hv.alloc_pages(handle, rng.choice([0, 0, 0, 1, 2, 5, 9, 12]))
                held.append((handle, pfn))
                out.append(["alloc", pfn])
        except PkvmError as error:
            out.append(["error", type(error).__name__, error.reason, str(error)])
    hv.audit()
    digest = hashlib.sha256(state_file.encode(hv)).hexdigest()
    print(json.dumps({"flavour": CORE_FLAVOUR, "out": out, "state": digest}))
""")


def run_workload(pure: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != PURE_PYTHON_ENV}
    if pure:
        env[PURE_PYTHON_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", WORKLOAD], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_both_flavours_give_identical_answers() -> None:
    pure = run_workload(pure=True)
    installed = run_workload(pure=False)
    assert pure["flavour"] == "pure"
    assert installed["flavour"] == core.CORE_FLAVOUR or PURE_PYTHON_ENV in os.environ
    assert installed["out"] == pure["out"]
    assert installed["state"] == pure["state"]
    kinds = {entry[0] for entry in pure["out"]}  # type: ignore[attr-defined]
    assert {"alloc", "put", "fault", "error"} <= kinds, "the workload must exercise refusals"
