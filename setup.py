"""Build hook: compile the simulation core (pkvm_sim.core) with mypyc where a C compiler is.

Everything else about the project is declared in pyproject.toml; this file only adds the
compiled core (issue 18, docs/compiled-core.md):

- every `server/pkvm_sim/core/*.py` but `__init__.py` (which chooses the flavour at run time)
  and NOT_COMPILED is compiled into one extension group, so modules added later compile too;
- mypyc runs only when build_ext runs (wheel, editable install), never for metadata;
- no C compiler, no Python headers, or any mypyc failure: a warning, and the install goes on
  with the pure-Python core (the same sources, which are always installed next to the .so);
- PKVM_SIM_PURE_PYTHON=1 at build time skips the compiler altogether;
- a manifest (`_build_manifest.json`) records the SHA-256 of every compiled source, so that
  pkvm_sim.core runs the pure sources instead of a .so built from older ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import traceback
from pathlib import Path
from typing import Any

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

CORE_PACKAGE = "pkvm_sim.core"
CORE_DIR = Path("server/pkvm_sim/core")
# Modules that stay Python. __init__ picks the flavour, so it must run before any .so loads.
NOT_COMPILED = frozenset({"__init__.py"})
MANIFEST = "_build_manifest.json"
GROUP_NAME = f"{CORE_PACKAGE}._native"  # the shared library: pkvm_sim/core/_native__mypyc.*.so
PURE_PYTHON_ENV = "PKVM_SIM_PURE_PYTHON"


def core_sources() -> list[Path]:
    return sorted(p for p in CORE_DIR.glob("*.py") if p.name not in NOT_COMPILED)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pure_requested() -> bool:
    return os.environ.get(PURE_PYTHON_ENV, "") not in ("", "0")


def missing_build_tool(compiler_name: str | None) -> str:
    """Why a C build cannot even start ('' if it may): checked before mypyc's minutes."""
    from distutils.ccompiler import new_compiler
    from distutils.sysconfig import customize_compiler

    compiler: Any = new_compiler(compiler=compiler_name)
    customize_compiler(compiler)
    executable = getattr(compiler, "compiler_so", ["cc"])[0]
    if shutil.which(executable) is None:
        return f"no C compiler ({executable} is not on PATH)"
    if not Path(sysconfig.get_paths()["include"], "Python.h").is_file():
        return "no Python headers (Python.h; Debian: python3-dev)"
    return ""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


class PlatformDistribution(Distribution):
    """The wheel carries compiled code (when the compiler was there): tag it per platform."""

    def has_ext_modules(self) -> bool:
        return True


class BuildCompiledCore(build_ext):
    """build_ext whose extensions are the mypyc-compiled core, or nothing if it cannot be."""

    def finalize_options(self) -> None:
        self._failure: str | None = None
        # Hashed before mypyc reads them: a source edited during the build then looks stale
        # (runs pure), never the other way round.
        self._digests = {p.name: sha256(p) for p in core_sources()}
        self.distribution.ext_modules = self._mypyc_extensions()
        super().finalize_options()

    def _mypyc_extensions(self) -> list[Any]:
        if pure_requested():
            self._failure = f"{PURE_PYTHON_ENV} is set at build time"
            return []
        self._failure = missing_build_tool(self.compiler) or None
        if self._failure:
            return []
        try:
            from mypyc.build import mypycify

            return list(mypycify([str(CORE_DIR / name) for name in sorted(self._digests)],
                                 opt_level="3", group_name=GROUP_NAME))
        except (Exception, SystemExit) as error:  # mypy missing or a mypyc error: stay pure
            self._failure = f"mypyc failed ({_one_line(error)})\n{traceback.format_exc()}"
            return []

    def run(self) -> None:
        if self.extensions:
            try:
                super().run()
            except Exception as error:  # a compiler that fails, a link error...
                self._failure = f"the C build failed ({_one_line(error)})\n" \
                    + traceback.format_exc()
                self._remove_outputs()
                self.extensions = []
        if self._failure:
            print(f"warning: pkvm-sim installs the pure-Python core: {self._failure}")
        self._write_manifest()

    def _remove_outputs(self) -> None:
        """All or nothing: a partial set of .so files must never be imported."""
        for ext in self.extensions:
            built = Path(self.build_lib) / self.get_ext_filename(ext.name)
            built.unlink(missing_ok=True)
            if self.inplace:
                (CORE_DIR / Path(self.get_ext_filename(ext.name)).name).unlink(missing_ok=True)
        shutil.rmtree(Path(self.build_temp), ignore_errors=True)

    def _write_manifest(self) -> None:
        compiled = bool(self.extensions) and not self._failure
        manifest = {
            "compiled": compiled,
            "reason": "" if compiled else (self._failure or "").splitlines()[0],
            "modules": sorted(Path(name).stem for name in self._digests) if compiled else [],
            "shared_library": GROUP_NAME.rsplit(".", 1)[1] + "__mypyc" if compiled else "",
            "sources_sha256": self._digests if compiled else {},
        }
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        targets = [Path(self.build_lib) / "pkvm_sim" / "core"]
        if self.inplace:  # editable install: the .so files sit next to the sources
            targets.append(CORE_DIR)
        for target in targets:
            target.mkdir(parents=True, exist_ok=True)
            (target / MANIFEST).write_text(text)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), str(Path(self.build_lib) / "pkvm_sim/core" / MANIFEST)]


setup(distclass=PlatformDistribution, cmdclass={"build_ext": BuildCompiledCore})
