"""The five public oracle traces replay address for address, and divergences are caught."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from pkvm_sim.cli import main
from pkvm_sim.tools.replay_trace import replay

ORACLE = Path(__file__).resolve().parents[1] / "data" / "oracle"  # copied from the kernel runs
TRACES = sorted(ORACLE.glob("*.jsonl"))


def test_the_public_traces_are_present() -> None:
    assert len(TRACES) == 5, f"expected the five public traces in {ORACLE}"


@pytest.mark.parametrize("trace", TRACES, ids=lambda p: p.stem)
def test_public_trace_replays_clean(trace: Path) -> None:
    result = replay(trace)
    assert result.ok, result.summary()
    assert result.operations > 300


def _rewrite(trace: Path, out: Path, line_no: int, change: dict[str, object]) -> None:
    lines = trace.read_text().splitlines()
    record = json.loads(lines[line_no - 1])
    record.update(change)
    lines[line_no - 1] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")


def test_a_wrong_alloc_result_is_reported_at_its_line(tmp_path: Path) -> None:
    trace = ORACLE / "pub02_1000_drain_refill.jsonl"
    lines = trace.read_text().splitlines()
    line_no = next(i for i, line in enumerate(lines, 1)
                   if '"op":"alloc"' in line and '"result":null' not in line and i > 100)
    recorded = json.loads(lines[line_no - 1])["result"]
    bad = tmp_path / "bad.jsonl"
    _rewrite(trace, bad, line_no, {"result": recorded + 1})
    result = replay(bad)
    assert not result.ok and result.divergence is not None
    assert result.divergence.line == line_no
    assert str(recorded + 1) in result.divergence.message


def test_a_swapped_free_list_order_is_caught(tmp_path: Path) -> None:
    trace = ORACLE / "pub01_tiny_unaligned_random.jsonl"
    lines = trace.read_text().splitlines()
    check = json.loads(lines[1])
    check["free_lists"]["0"].reverse()  # same blocks, wrong FIFO order
    lines[1] = json.dumps(check)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    result = replay(bad)
    assert result.divergence is not None and result.divergence.line == 2


def test_gzip_traces_and_the_cli_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.jsonl.gz"
    with gzip.open(good, "wt") as stream:
        stream.write((ORACLE / "pub01_tiny_unaligned_random.jsonl").read_text())
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("\n".join((ORACLE / "pub01_tiny_unaligned_random.jsonl")
                                   .read_text().splitlines()[:50]) + "\n")
    assert main(["replay-trace", str(good)]) == 0
    assert main(["replay-trace", str(good), str(truncated)]) == 1
    out = capsys.readouterr().out
    assert "PASS pub01" in out and "FAIL" in out and "no final record" in out
    assert "1 passed, 1 failed" in out


def test_header_constants_choose_the_hyp_page_layout(tmp_path: Path) -> None:
    """A trace recorded with 32-bit hyp_page fields (HYP_NO_ORDER = UINT_MAX) replays the
    same allocator with that layout; an unknown HYP_NO_ORDER is reported, not guessed."""
    lines = (ORACLE / "pub01_tiny_unaligned_random.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    header["constants"]["HYP_NO_ORDER"] = 2**32 - 1
    wide = tmp_path / "wide.jsonl"
    wide.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    assert replay(wide).ok
    header["constants"]["HYP_NO_ORDER"] = 12345
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    result = replay(odd)
    assert result.divergence is not None and result.divergence.line == 1
    assert "HYP_NO_ORDER" in result.divergence.message
