"""`pkvm-sim loadgen` against the real service over a real socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from pkvm_sim.cli import main
from pkvm_sim.service.server import RunningService
from pkvm_sim.tools.loadgen import VmTally, summarise

from tests.service.fixtures import start_service


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    running = start_service()
    yield running
    running.stop(0)


def run_loadgen(
    capsys: pytest.CaptureFixture[str], target: str, *extra: str
) -> tuple[int, dict[str, Any]]:
    code = main(["loadgen", "--target", target, "--vms", "6", "--duration", "1.5",
                 "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_unary_mix_runs_every_operation_and_leaks_nothing(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_loadgen(capsys, service.target)
    assert code == 0 and report["ok"], report
    assert report["vms"] == 6 and report["vms_left"] == 0
    done = {key.split(":")[0] for key, n in report["outcomes"].items()
            if key.endswith(":ok") and n}
    assert {"alloc", "put", "getput", "share", "guest", "mmio"} <= done
    assert report["leaked_pages"] == {} and report["failures"] == {}


def test_batch_mode_balances_allocs_and_puts(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = run_loadgen(capsys, service.target, "--batch", "64", "--max-ops", "2048")
    assert code == 0, report
    outcomes = report["outcomes"]
    assert outcomes["alloc:ok"] == outcomes["put:ok"] == 6 * 1024
    assert report["operations"] == 6 * 2048


def test_leaks_leftover_vms_and_unexpected_refusals_fail_the_run() -> None:
    tally = VmTally()
    tally.record("alloc", 0.001)
    tally.record("alloc", 0.002, "OutOfMemoryError")  # a full pool: an outcome, not a failure
    clean = summarise([tally], 1.0, {"hyp": 100}, {"hyp": 100}, 0)
    assert clean["ok"] and clean["operations"] == 2
    assert not summarise([tally], 1.0, {"hyp": 100}, {"hyp": 96}, 0)["ok"]
    assert summarise([tally], 1.0, {"hyp": 100}, {"hyp": 96}, 0)["leaked_pages"] == {"hyp": 4}
    assert not summarise([tally], 1.0, {"hyp": 100}, {"hyp": 100}, 1)["ok"]
    tally.record("put", 0.001, "WouldPanicError")
    report = summarise([tally], 1.0, {"hyp": 100}, {"hyp": 100}, 0)
    assert report["failures"] == {"put:WouldPanicError": 1} and not report["ok"]
