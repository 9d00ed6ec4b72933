"""The README's SDK snippet runs as written against the real service."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from tests.service.fixtures import start_service

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_sdk_snippet_runs() -> None:
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert snippet is not None, "README.md lost its SDK example"
    service = start_service()
    try:
        code = snippet.group(1).replace("localhost:50051", service.target)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        service.stop(0)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[0] == "1"  # MMIO below RAM is mapped with a level-1 block (3.4)
    assert "POOL_EXHAUSTED" in lines
    assert any(line.startswith("hyp ") for line in lines)
