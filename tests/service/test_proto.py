"""The generated code is committed: fail when it is stale, and keep the proto buf-lint clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
PROTOS = sorted((PROTO_ROOT / "pkvm" / "v1").glob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
         f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
         *map(str, PROTOS)],
        check=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "protoc generated nothing"
    for relative in fresh:
        committed = PROTO_ROOT / relative
        assert committed.exists(), f"{relative} is not committed: run `make proto`"
        assert committed.read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale: run `make proto` and commit the result"
        )
    committed_generated = sorted(
        p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / "pkvm" / "v1").iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    )
    assert committed_generated == fresh, "generated files without a .proto: delete them"


def _buf() -> str | None:
    local = Path(sys.executable).parent / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_standard() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf is not installed (pip install buf-bin)")
    result = subprocess.run([buf, "lint"], cwd=PROTO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
