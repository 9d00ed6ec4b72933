"""The simulation core: pure Python, no gRPC and no metrics.

One module per kernel object: `vmemmap` (struct hyp_page array), `hyp_pool` (the buddy
allocator), `physmem` (sparse page contents), `reservation` (the host's carve-out
arithmetic), the stage-2 page tables and VMs, and `hypervisor` (the booted machine that ties
them together behind one lock-free API; the service serialises calls into it).

Two flavours of the same sources (docs/compiled-core.md): `pip install` compiles every module
here but this one with mypyc when a C compiler is there ("compiled"), else they run as Python
("pure"). This module chooses before any of them is imported, and keeps the choice whole: all
compiled or all pure, never a mix. It runs the pure sources when PKVM_SIM_PURE_PYTHON=1, when
the install did not compile, or when a source changed since the build (a stale .so must never
run old code: `make install` rebuilds it). CORE_FLAVOUR and CORE_FLAVOUR_REASON say which.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

PURE_PYTHON_ENV = "PKVM_SIM_PURE_PYTHON"
BUILD_MANIFEST = "_build_manifest.json"  # written by setup.py's build_ext


@dataclass(frozen=True)
class Flavour:
    name: str  # "compiled" or "pure"
    reason: str  # why: for --version, logs and the pkvm_sim_info metric's readers


def choose_flavour(core_dir: Path, environ: Mapping[str, str]) -> Flavour:
    """Which flavour of the core in `core_dir` may run, from the env and the build manifest."""
    requested = environ.get(PURE_PYTHON_ENV, "")
    if requested not in ("", "0"):
        return Flavour("pure", f"{PURE_PYTHON_ENV}={requested}")
    try:
        manifest = json.loads((core_dir / BUILD_MANIFEST).read_text())
    except (OSError, ValueError):
        return Flavour("pure", "not compiled at install (no build manifest)")
    if not manifest.get("compiled"):
        return Flavour("pure", f"not compiled at install: {manifest.get('reason') or '?'}")
    problem = _stale_or_missing(core_dir, manifest)
    if problem:
        return Flavour("pure", f"compiled core unusable: {problem}; `make install` rebuilds it")
    return Flavour("compiled", "mypyc")


def _stale_or_missing(core_dir: Path, manifest: Mapping[str, object]) -> str:
    """'' when every compiled module's .so is there and was built from today's source."""
    digests = manifest.get("sources_sha256")
    modules = manifest.get("modules")
    library = manifest.get("shared_library")
    if not isinstance(digests, dict) or not isinstance(modules, list):
        return "malformed build manifest"
    sources = {p.name for p in core_dir.glob("*.py") if p.name != "__init__.py"}
    added = sorted(sources - digests.keys())
    if added:
        return f"{', '.join(added)} added since the build"
    for name, digest in sorted(digests.items()):
        try:
            current = hashlib.sha256((core_dir / name).read_bytes()).hexdigest()
        except OSError:
            return f"{name} is missing"
        if current != digest:
            return f"{name} changed since the build"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    for module in [*modules, library]:
        if not (core_dir / f"{module}{suffix}").is_file():
            return f"{module}{suffix} is missing"
    return ""


class _PureSourceFinder(importlib.abc.MetaPathFinder):
    """Loads pkvm_sim.core.<module> from <module>.py even where a compiled .so sits beside it."""

    def __init__(self, package: str, core_dir: Path) -> None:
        self._prefix = package + "."
        self._core_dir = core_dir

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(self._prefix):
            return None
        source = self._core_dir / (fullname[len(self._prefix):] + ".py")
        if "." in fullname[len(self._prefix):] or not source.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, source)


def _select() -> Flavour:
    core_dir = Path(__file__).resolve().parent
    flavour = choose_flavour(core_dir, os.environ)
    if flavour.name == "pure":
        sys.meta_path.insert(0, _PureSourceFinder(__name__, core_dir))
        if "unusable" in flavour.reason:
            warnings.warn(f"pkvm_sim.core runs as pure Python: {flavour.reason}", stacklevel=2)
    return flavour


_FLAVOUR = _select()
CORE_FLAVOUR = _FLAVOUR.name
CORE_FLAVOUR_REASON = _FLAVOUR.reason


def describe_core() -> str:
    """One line for --version and the service's log: 'compiled (mypyc)' or 'pure (why)'."""
    return f"{CORE_FLAVOUR} ({CORE_FLAVOUR_REASON})"
