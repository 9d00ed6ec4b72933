"""The SDK snippets of README.md and docs/sdk.md run as written against the real service."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

from pkvm_sim.service.server import ServerSettings

from tests.service.fixtures import start_service

REPO = Path(__file__).resolve().parents[1]


# What `make serve` runs: the default limits (a 256-page hyp quota per VM among them), not
# the test suite's relaxed ones, so the printed answers are the ones a reader gets.
MAKE_SERVE_SETTINGS = ServerSettings(listen="127.0.0.1:0", metrics_listen=None)


def run_first_snippet(document: Path) -> list[str]:
    """Run the document's first ```python block against a fresh server; its output lines."""
    snippet = re.search(r"```python\n(.*?)```", document.read_text(), re.DOTALL)
    assert snippet is not None, f"{document.name} lost its SDK example"
    service = start_service(settings=MAKE_SERVE_SETTINGS)
    try:
        code = snippet.group(1).replace("localhost:50051", service.target)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, document.name, "exec"), {})
    finally:
        service.stop(0)
    return out.getvalue().splitlines()


def test_readme_sdk_snippet_runs() -> None:
    lines = run_first_snippet(REPO / "README.md")
    level, _start, _recycled, outcome = lines[0].split()
    assert level == "1"  # MMIO below RAM is mapped with a level-1 block (3.4)
    assert outcome == "MAPPED"  # the first fault on a fresh machine installs a leaf
    # Each refusal where its comment says: the quota answers an order-11 hyp-pool block
    # first; the VM's own pool (max_order 2) cannot hold one at all.
    assert lines[1:3] == ["QUOTA_EXCEEDED", "POOL_EXHAUSTED"], lines
    assert any(line.startswith("hyp ") for line in lines)


def test_sdk_doc_snippet_runs() -> None:
    lines = run_first_snippet(REPO / "docs" / "sdk.md")
    assert lines[0] == "PAGE_PINNED EBUSY"  # the batch's refusal carries the kernel errno
    assert lines[1] == "IPA_MAPPED"  # another pfn at a mapped IPA: -EEXIST
    assert lines[2] == "0"  # destroy() after the with block: idempotent
    assert int(lines[3]) > 0
