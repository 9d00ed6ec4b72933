"""What `pkvm-sim --version` prints: the package version and which core runs (issue 18)."""

from __future__ import annotations


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pkvm-sim")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def version_line() -> str:
    """'pkvm-sim 0.1.0 (core: compiled (mypyc))' or '... (core: pure (why))'."""
    from pkvm_sim.core import describe_core

    return f"pkvm-sim {package_version()} (core: {describe_core()})"
