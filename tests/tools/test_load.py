"""`pkvm-sim load` against the real service over a real socket: each flag, each workload,
the report files, the exit codes and the leak check (also with a second client running)."""

from __future__ import annotations

import argparse
import base64
import contextlib
import csv
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pkvm_client
import pytest
from pkvm_client import Hypervisor, OutOfMemoryError
from pkvm_sim.cli import build_parser, main
from pkvm_sim.service.server import RunningService
from pkvm_sim.tools.load import shape_from_args
from pkvm_sim.tools.load.runner import run_load as run_shape
from pkvm_sim.tools.load.workloads import BUILTIN, Call, VmState, Workload

from tests.service.fixtures import start_service
from tests.tools.load_helpers import run_load, server_process

LATENCY_KEYS = ("min", "mean", "p50", "p90", "p99", "p99_9", "max")
SHORT = ("--vms", "3", "--duration", "0.8", "--sample-interval", "0.2")
# A count, not a time, where a test needs operations to have happened: on a loaded machine
# a short duration can pass in creating the VMs.
COUNTED = ("--vms", "3", "--total", "300", "--sample-interval", "0.2")


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    running = start_service()
    yield running
    running.stop(0)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser(["load", *argv]).parse_args(["load", *argv])


# -- flags -----------------------------------------------------------------------------------


def test_help_shows_every_default_and_no_hidden_cap(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["load", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--vms", "--connections", "--rps", "--warmup", "--seed", "--batch",
                 "--slice-pages", "--max-ops", "--timeout", "--connect-timeout",
                 "--sample-interval", "--progress-interval", "--workload", "--target"):
        assert re.search(re.escape(flag) + r" [A-Z_]+ .*?\(default: [^)]+\)", text), flag
    assert "default 10 unless --total" in text
    # The old loadgen cut --duration to 600 s: here a long run is taken as asked.
    assert shape_from_args(parse("--duration", "1000")).duration == 1000
    shape = shape_from_args(parse("--total", "5"))
    assert shape.duration is None and shape.total == 5


@pytest.mark.parametrize("argv", [
    ("--vms", "0"), ("--connections", "0"), ("--batch", "4097"), ("--duration", "0"),
    ("--rps", "-1"), ("--warmup", "-1"), ("--workload", "no-such-workload"),
])
def test_bad_usage_is_one_line_and_exit_2(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", "--target", "127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pkvm-sim load: ") and "Traceback" not in err


def test_duration_and_total_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["load", "--duration", "1", "--total", "10"])
    assert exit_info.value.code == 2


def test_unreachable_target_is_one_clear_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = main(["load", "--target", f"127.0.0.1:{port}", "--connect-timeout", "1"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"pkvm-sim load: cannot reach 127.0.0.1:{port}: no connection" \
        " within 1 s\n"
    assert captured.out == ""


def test_total_stops_after_that_many_measured_operations(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "4", "--total",
                                  "400", "--workload", "churn")
    assert code == 0, report
    # Each VM may have one call in flight when the total is reached, then the put still due
    # after a get (churn's getput), then its destroy.
    assert 400 <= report["operations_total"] <= 400 + 4 * 3
    assert report["shape"]["duration"] is None


def test_max_ops_bounds_each_vm_and_the_seed_makes_runs_repeatable(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def counts(seed: str) -> dict[str, int]:
        code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "2",
                                      "--max-ops", "150", "--duration", "60", "--seed", seed,
                                      "--workload", "churn")
        assert code == 0, report
        return {op: fig["count"] for op, fig in report["operations"].items()}

    first = counts("7")
    # 150 calls per VM, plus its create and destroy.
    assert sum(first.values()) == 2 * 150 + 2 * 2
    assert counts("7") == first
    assert counts("8") != first


def test_open_loop_holds_the_asked_rate(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "4", "--rps",
                                  "150", "--duration", "2", "--workload", "churn")
    assert code == 0 and report["loop"] == "open"
    churn = sum(report["operations"][op]["count"] for op in ("alloc", "put", "get"))
    assert 0.8 * 300 <= churn <= 1.05 * 300 + 4


def test_open_loop_charges_a_stalled_server_for_the_whole_stall(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Latency from the intended send time: while the server is frozen for 0.8 s the calls
    that should have gone out queue up, and each is charged its wait. A closed-loop tool
    would see one slow call per VM and a clean p90 (coordinated omission)."""
    with server_process() as (target, pid):
        import os
        import signal

        freeze = threading.Timer(0.6, os.kill, (pid, signal.SIGSTOP))
        thaw = threading.Timer(1.4, os.kill, (pid, signal.SIGCONT))
        freeze.start()
        thaw.start()
        code, report, _out = run_load(capsys, target, tmp_path, "--vms", "2", "--rps", "100",
                                      "--duration", "2.5", "--workload", "churn")
        freeze.join()
        thaw.join()
    assert code == 0, report["unexpected"]
    alloc = report["operations"]["alloc"]["latency_ms"]
    # About 80 of the ~250 calls were due during the stall, waiting 0..800 ms: well over
    # 10% of all calls waited more than 200 ms.
    assert alloc["p90"] >= 200, alloc
    assert alloc["max"] >= 600, alloc


def test_warmup_is_left_out_of_the_results(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    start = time.monotonic()
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "2", "--warmup",
                                  "1", "--duration", "0.8", "--workload", "churn")
    elapsed = time.monotonic() - start
    assert code == 0 and elapsed >= 1.8
    # The measured run is the duration asked for, and the warm-up second is not part of it.
    assert 0.8 <= report["duration_s"] <= elapsed - 1.0
    assert all(sample["t"] >= 0 for sample in report["pools"])
    # Only the VMs' create (before the warm-up ends) and destroy are recorded regardless.
    assert report["operations"]["create_vm"]["count"] == 2


def test_connections_and_sample_interval(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "6",
                                  "--connections", "3", "--duration", "1",
                                  "--sample-interval", "0.1", "--workload", "churn")
    assert code == 0 and report["shape"]["connections"] == 3
    assert report["vms_started"] == 6
    # ~10 samples in 1 s, plus the first and the final one; a loaded machine may take fewer
    # (never more: the interval is a floor)
    assert 2 <= len(report["pools"]) <= 13
    assert {"hyp", "host_s2"} <= set(report["pools"][0]["pools"])


def test_batch_sends_execute_batches(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes: list[int] = []
    original = pkvm_client.AsyncBatchStream.execute

    async def counting(self: Any, batch: Any) -> Any:
        sizes.append(len(batch))
        return await original(self, batch)

    monkeypatch.setattr(pkvm_client.AsyncBatchStream, "execute", counting)
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "2", "--batch",
                                  "32", "--max-ops", "320", "--duration", "60",
                                  "--workload", "churn")
    assert code == 0, report
    calls = sum(fig["count"] for op, fig in report["operations"].items()
                if op not in ("create_vm", "destroy_vm"))
    assert sum(sizes) == 2 * 320  # churn has no call without a BatchOp: all went in batches
    assert 0 <= calls - sum(sizes) <= 2 * 32  # the puts still due after a get, sent unary
    assert max(sizes) == 32 and len(sizes) == 2 * 10


def test_progress_lines_and_terminal_progress(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ("--target", service.target, "--vms", "2", "--duration", "1", "--workload", "churn")
    assert main(["load", *args, "--progress", "lines", "--progress-interval", "0.3"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(lines) >= 2 and all("ops/s" in line and "hyp free" in line for line in lines)
    # A line that counts operations shows their rate, the first line included.
    counted = [re.search(r"\] (\d+) ops +([\d,]+) ops/s", line) for line in lines]
    assert all(m and (m[1] == "0" or m[2] != "0") for m in counted), lines
    assert main(["load", *args, "--progress", "tty", "--sample-interval", "0.2"]) == 0
    err = capsys.readouterr().err
    assert err.count("\r") >= 3 and err.endswith("\n")


# -- workloads -------------------------------------------------------------------------------

WORKLOAD_OPS = {
    "churn": {"alloc", "put", "get"},
    "share": {"share", "unshare", "pin"},
    "mmio": {"mmio"},
    "guest": {"guest_map", "topup"},
    "vm-lifecycle": {"alloc", "share", "guest_map"},
    "mixed": {"alloc", "put", "get", "share", "pin", "guest_map", "mmio"},
}


@pytest.mark.parametrize("workload", sorted(BUILTIN))
def test_each_workload_runs_its_operations_and_leaks_nothing(
    workload: str, service: RunningService, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    code, report, _out = run_load(capsys, service.target, tmp_path, *COUNTED,
                                  "--workload", workload)
    assert code == 0, (report["unexpected"], report["leak_check"])
    ran = {op for op, fig in report["operations"].items() if fig["ok"]}
    assert WORKLOAD_OPS[workload] <= ran, ran
    leak = report["leak_check"]
    assert leak["ok"] and leak["vms_created"] == leak["vms_destroyed"] >= 3
    if workload == "vm-lifecycle":  # a VM is recycled every 32 calls
        assert leak["vms_created"] > 3
    if workload == "guest":  # a fresh VM's memcache is empty: guest maps ask for top-ups
        assert report["expected_refusals"]


def test_custom_toml_workload(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    spec = tmp_path / "puts.toml"
    spec.write_text("weights = { alloc = 3, put = 2 }\norders = [2]\nlifecycle_calls = 40\n")
    code, report, _out = run_load(capsys, service.target, tmp_path, *SHORT,
                                  "--workload", str(spec))
    assert code == 0, report
    assert set(report["operations"]) == {"alloc", "put", "create_vm", "destroy_vm"}
    assert report["workload"] == {"name": "puts", "weights": {"alloc": 3.0, "put": 2.0},
                                  "orders": [2], "lifecycle_calls": 40}
    bad = tmp_path / "bad.toml"
    bad.write_text("weights = { alloc = 1, reboot = 1 }\n")
    assert main(["load", "--target", service.target, "--workload", str(bad)]) == 2
    assert "weights" in capsys.readouterr().err


def test_mmio_over_fragmented_ram_puts_the_host_stage2_pool_under_pressure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """docs/stage2.md's fragmented machine: v5.13, 16K pages, 4 GiB of RAM in 64 fragments
    with 1 MiB MMIO holes. MMIO pages share block windows with RAM and need level-3 tables
    from the host stage-2 pool, so its free pages fall during the run (recycles, when the
    pool runs dry, are counted in every sample). The span covers RAM too, so some draws are
    NOT_MMIO (expected refusals)."""
    from pkvm_sim.core.config import Memblock, SimConfig
    from pkvm_sim.core.layout import PAGE_SIZES, Profile

    n, hole = 64, 1 << 20
    size = ((4 << 30) - (n - 1) * hole) // n // PAGE_SIZES["16K"] * PAGE_SIZES["16K"]
    blocks = tuple(Memblock(0x8000_0000 + i * (size + hole), size) for i in range(n))
    running = start_service(SimConfig(profile=Profile.V5_13, page_size=PAGE_SIZES["16K"],
                                      memblocks=blocks))
    try:
        with Hypervisor(running.target) as hv:  # the pools before any MMIO fault
            free_before = {pool.name: pool.free_pages for pool in hv.stats().pools}
        code, report, _out = run_load(
            capsys, running.target, tmp_path, "--vms", "4", "--total", "400",
            "--sample-interval", "0.2", "--workload", "mmio", "--mmio-base", "0x80000000",
            "--mmio-span", hex(n * (size + hole)), "--slice-pages", "16")
    finally:
        running.stop(0)
    assert code == 0, report["unexpected"]
    samples = report["pools"]
    host_pools = [name for name in samples[0]["pools"] if name.startswith("host_s2")]
    assert any(min(s["pools"][name]["free_pages"] for s in samples)
               < free_before[name] for name in host_pools), samples[-1]
    assert all("mmio_recycles" in s for s in samples)
    assert any(key.startswith("mmio: INVALID_ARGUMENT/NOT_MMIO")
               for key in report["expected_refusals"])


# -- reports ---------------------------------------------------------------------------------


def test_json_csv_and_html_reports(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, report, captured = run_load(capsys, service.target, tmp_path, *SHORT,
                                      "--csv", str(tmp_path / "r.csv"),
                                      "--html", str(tmp_path / "r.html"))
    assert code == 0
    out = captured.out
    assert "p99.9" in out and "leak check" in out and "result: ok (exit 0)" in out
    # JSON: the keys the issue names, and figures that agree with each other.
    for key in ("achieved_rps", "duration_s", "codes", "operations"):
        assert key in report
    total = report["operations_total"]
    assert sum(fig["count"] for fig in report["operations"].values()) == total
    assert sum(report["codes"].values()) == total
    assert report["achieved_rps"] == pytest.approx(total / report["duration_s"], rel=0.01)
    for op, fig in report["operations"].items():
        lat = fig["latency_ms"]
        assert list(lat) == list(LATENCY_KEYS), op
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] \
            <= lat["max"], (op, lat)
        assert lat["min"] <= lat["mean"] <= lat["max"]
        assert fig["count"] == fig["ok"] + fig["expected_refusals"] + fig["unexpected"]
    # CSV: one row per operation, with a p99 column equal to the JSON's.
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert "p99" in rows[0]
    assert {row["operation"]: float(row["p99"]) for row in rows} == \
        {op: fig["latency_ms"]["p99"] for op, fig in report["operations"].items()}
    # HTML: self-contained, with its pictures as embedded PNGs.
    html = (tmp_path / "r.html").read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    pictures = re.findall(r"src='data:image/png;base64,([^']+)'", html)
    assert len(pictures) >= 5  # latency, throughput, pool pages, free blocks x2 pools
    for picture in pictures:
        png = base64.b64decode(picture)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    for caption in ("Latency distribution", "Throughput and errors", "Pool free pages",
                    "hyp: free blocks per order"):
        assert f"<figcaption>{caption}</figcaption>" in html


def test_json_to_stdout_keeps_the_table_on_stderr(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert main(["load", "--target", service.target, *SHORT, "--progress", "none",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["result"] == "ok"
    assert "result: ok" in captured.err


# -- exit codes and the leak check -------------------------------------------------------------


def test_unexpected_errors_exit_1(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # A deadline no VM call can meet (Reserve and GetStats keep --connect-timeout): every
    # call ends DEADLINE_EXCEEDED (the odd one may still beat it), which is no answer a
    # loaded hypervisor gives.
    code, report, _out = run_load(capsys, service.target, tmp_path, "--vms", "2",
                                  "--duration", "0.5", "--timeout", "0.000001")
    assert code == 1 and report["result"] == "failed"
    assert report["codes"]["DEADLINE_EXCEEDED"] > 0
    assert report["unexpected"] and all(key.endswith(": DEADLINE_EXCEEDED")
                                        for key in report["unexpected"])


class ForgetfulChurn(Workload):
    """Allocates without recording the blocks in the ledger: a leak as the check sees it."""

    def next_call(self, state: VmState, rnd: Any) -> Call:
        return Call("alloc", "alloc_pages", (0,))


def test_the_leak_check_catches_pages_the_ledger_does_not_know(
    service: RunningService,
) -> None:
    from pkvm_sim.tools.load.report import build_report

    shape = shape_from_args(parse("--target", service.target, "--vms", "2", "--max-ops", "5",
                                  "--duration", "30", "--progress", "none"))
    workload = ForgetfulChurn("forgetful", {"alloc": 1})
    report = build_report(shape, workload, run_shape(shape, workload))
    assert report["exit_code"] == 1 and not report["leak_check"]["ok"]
    problems = report["leak_check"]["problems"]
    assert len(problems) == 2
    assert all("(0 hyp + 256 slice" in p for p in problems)
    for problem in problems:  # DestroyVM gave back the 5 order-0 blocks the ledger forgot
        returned, ledger = map(int, re.findall(r"gave back (\d+) pages, its ledger says (\d+)",
                                               problem)[0])
        assert returned - ledger == 5, problem


def test_leak_check_ignores_a_second_client_on_the_same_server(
    service: RunningService, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Another client holds, allocates and frees pool pages all through the run: the old
    whole-server comparison failed here; the per-VM ledgers do not."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def other_client() -> None:
        try:
            with Hypervisor(service.target) as hv, hv.create_vm(slice_pages=64) as keeper:
                held = [keeper.alloc_pages(0) for _ in range(20)]  # held past the run's end
                while not stop.is_set():
                    with hv.create_vm(slice_pages=32) as vm:
                        for _ in range(10):
                            with contextlib.suppress(OutOfMemoryError):
                                vm.put_page(vm.alloc_pages(1))
                    held.append(keeper.alloc_pages(0))
                stop.wait()
        except BaseException as error:  # reported by the test, not lost in the thread
            errors.append(error)

    thread = threading.Thread(target=other_client)
    thread.start()
    try:
        time.sleep(0.3)
        code, report, _out = run_load(capsys, service.target, tmp_path, *SHORT,
                                      "--workload", "churn")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors
    assert code == 0, report["leak_check"]
    assert report["leak_check"]["ok"]
    assert report["leak_check"]["server_wide"].startswith("skipped: other VMs")


def test_loadgen_alias_takes_the_old_flags(
    service: RunningService, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    code = main(["loadgen", "--target", service.target, "--vms", "2", "--duration", "0.5",
                 "--max-ops", "50", "--slice-pages", "128", "--mmio-base", "0x9000000",
                 "--mmio-window", "0x1000000", "--seed", "3", "--batch", "0", "--json",
                 "--progress", "none"])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 0 and report["result"] == "ok"
    assert report["shape"]["slice_pages"] == 128 and report["shape"]["max_ops"] == 50
    assert "pkvm-sim loadgen" not in captured.err


def test_the_readme_toml_workload_is_valid() -> None:
    from pkvm_sim.tools.load.workloads import workload_from_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert block is not None, "README.md lost its workload example"
    import tomllib

    workload = workload_from_table("readme", tomllib.loads(block.group(1)), 0, 1 << 20)
    assert workload.weights["alloc"] == 5 and workload.orders == (0, 0, 0, 1, 3)


def test_quota_refusals_are_expected_and_kept_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The service's quotas (RESOURCE_EXHAUSTED, QUOTA_EXCEEDED) are answers, not failures:
    two VMs allowed in all, 16 hyp pages held per VM. But a run that could not create the
    VMs it was asked for did not do what it was asked: it fails, saying why."""
    from dataclasses import replace

    from pkvm_sim.service.limits import Limits

    from tests.service.fixtures import TEST_SETTINGS

    running = start_service(settings=replace(TEST_SETTINGS, limits=Limits(
        max_vms=2, quota_hyp_pages=16)))
    try:
        code, report, _out = run_load(capsys, running.target, tmp_path, "--vms", "2",
                                      "--duration", "1", "--workload", "churn")
        assert code == 0, report["reasons"]
        assert report["expected_refusals"]["alloc: RESOURCE_EXHAUSTED/QUOTA_EXCEEDED"] > 0
        assert report["unexpected"] == {} and report["leak_check"]["ok"]
        code, report, _out = run_load(capsys, running.target, tmp_path, "--vms", "4",
                                      "--duration", "1", "--workload", "churn")
    finally:
        running.stop(0)
    assert code == 1 and report["result"] == "failed"
    assert report["vms_started"] == 2
    assert report["expected_refusals"]["create_vm: RESOURCE_EXHAUSTED/QUOTA_EXCEEDED"] == 2
    assert report["unexpected"] == {} and report["leak_check"]["ok"]
    assert report["reasons"][0].startswith(
        "created 2 of 4 VMs (first refusal: RESOURCE_EXHAUSTED/QUOTA_EXCEEDED"), report["reasons"]
