"""The verdict of `pkvm-sim load` is a contract (README, "The load tool's verdict"): exit 0
only when the run made what it was asked and every report was written; a signal stops the
run, tears its VMs down and still writes every report, marked interrupted.

Everything here runs the real CLI as a subprocess against a real `pkvm-sim serve` process,
as a user (or CI, `timeout`, `compose down`) would."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkvm_client import Hypervisor

LOAD = [sys.executable, "-m", "pkvm_sim.cli", "load", "--progress", "none"]
READY = re.compile(r"^pkvm-sim listening on (\S+)")
DEADLINE_S = 120  # generous: the machine may be loaded


def start_serve(*flags: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--log-level", "WARNING", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    match = READY.match(process.stdout.readline().strip())
    assert match, "pkvm-sim serve did not start"
    return process, match.group(1)


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    process, address = start_serve("--max-vms", "4")
    try:
        yield address
    finally:
        process.terminate()
        process.wait(timeout=60)


def load(target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LOAD, "--target", target, *flags], capture_output=True, text=True,
                          timeout=DEADLINE_S)


def vms_on(target: str) -> int:
    with Hypervisor(target) as hv:
        return hv.stats().nr_vms


def wait_for_no_vm(target: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while vms_on(target) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- 1. output paths ---------------------------------------------------------------------------


def test_report_directories_are_made_before_the_run(target: str, tmp_path: Path) -> None:
    """`--html no-such-dir/r.html` ran the whole load, printed `result: ok`, then a
    FileNotFoundError traceback and exit 1: the report was lost."""
    out = tmp_path / "no-such-dir"
    result = load(target, "--vms", "2", "--duration", "0.5", "--workload", "churn",
                  "--json", str(out / "a" / "r.json"), "--csv", str(out / "b" / "r.csv"),
                  "--html", str(out / "c" / "r.html"))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads((out / "a" / "r.json").read_text())["result"] == "ok"
    assert (out / "b" / "r.csv").read_text().startswith("operation,")
    assert "<html" in (out / "c" / "r.html").read_text()


@pytest.mark.parametrize("flag", ["--json", "--csv", "--html"])
def test_an_unwritable_report_path_is_refused_before_the_run(
    flag: str, target: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    result = load(target, "--vms", "2", "--duration", "30", flag, str(blocker / "r.out"))
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"pkvm-sim load: {flag} {blocker / 'r.out'}: ")
    assert result.stderr.count("\n") == 1 and result.stdout == ""  # nothing ran


# -- 2. a run that did not make what it was asked -----------------------------------------------


def test_a_run_that_created_none_of_its_vms_fails(target: str, tmp_path: Path) -> None:
    """--slice-pages beyond host RAM: 0 of 2 VMs, which main reported `result: ok`."""
    report_file = tmp_path / "r.json"
    result = load(target, "--vms", "2", "--duration", "0.5", "--slice-pages", "999999999",
                  "--json", str(report_file))
    assert result.returncode == 1, result.stdout
    report = json.loads(report_file.read_text())
    assert report["result"] == "failed" and report["vms_started"] == 0
    assert report["reasons"][0].startswith("created 0 of 2 VMs (first refusal: "
                                           "RESOURCE_EXHAUSTED/"), report["reasons"]
    assert "result: failed (exit 1)\n  created 0 of 2 VMs" in result.stdout


def test_a_run_above_the_servers_max_vms_fails(target: str, tmp_path: Path) -> None:
    """The server holds at most 4 VMs: `--vms 8` ran 4/8 and exited 0 on main."""
    report_file = tmp_path / "r.json"
    result = load(target, "--vms", "8", "--duration", "1", "--workload", "churn",
                  "--json", str(report_file))
    assert result.returncode == 1, result.stdout
    report = json.loads(report_file.read_text())
    assert report["vms_started"] == 4 and report["unexpected"] == {}
    assert report["reasons"] == [
        "created 4 of 8 VMs (first refusal: RESOURCE_EXHAUSTED/QUOTA_EXCEEDED the server"
        " holds its maximum of 4 VMs)"]
    assert report["leak_check"]["ok"]


# -- 3, 4. SIGTERM and SIGINT ---------------------------------------------------------------------


def start_long_run(target: str, tmp_path: Path) -> subprocess.Popen[str]:
    """A 10-minute run; returns once its 4 VMs exist on the server."""
    process = subprocess.Popen(
        [*LOAD, "--target", target, "--vms", "4", "--duration", "600", "--workload", "churn",
         "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
         "--html", str(tmp_path / "r.html")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + DEADLINE_S
    while vms_on(target) < 4:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # some measured operations
    return process


def reports(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, str]], str]:
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    return (json.loads((tmp_path / "r.json").read_text()), rows,
            (tmp_path / "r.html").read_text())


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGTERM, "SIGTERM"),
                                              (signal.SIGINT, "SIGINT")])
def test_a_signal_tears_the_vms_down_and_every_report_says_interrupted(
    signum: int, name: str, target: str, tmp_path: Path
) -> None:
    """SIGTERM killed the run at once (no report, the VMs left to their leases); SIGINT
    exited 0 with no mark of the interruption."""
    process = start_long_run(target, tmp_path)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert vms_on(target) == 0  # destroyed by the tool, not by a lease
    report, rows, html = reports(tmp_path)
    assert report["result"] == "interrupted" and report["interrupted"] == name
    assert report["exit_code"] == 128 + signum
    assert report["reasons"][0].startswith(f"interrupted by {name} after ")
    assert report["leak_check"]["ok"] and report["leak_check"]["vms_destroyed"] == 4
    assert report["operations_total"] > 0  # what was measured is kept
    assert {row["result"] for row in rows} == {"interrupted"}
    assert "INTERRUPTED" in html and f"interrupted by {name}" in html
    assert f"result: interrupted (exit {128 + signum})" in stdout


def test_a_second_ctrl_c_ends_quietly(target: str, tmp_path: Path) -> None:
    """The second Ctrl-C (here while the HTML is drawn) gave a traceback on main."""
    process = start_long_run(target, tmp_path)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    deadline = time.monotonic() + DEADLINE_S
    seen = ""
    while "drawing" not in seen:  # the run is over: the reports are being written
        assert time.monotonic() < deadline and process.poll() is None, seen
        seen += process.stderr.readline()
    process.send_signal(signal.SIGINT)
    _stdout, stderr = process.communicate(timeout=DEADLINE_S)
    assert process.returncode == 130
    stderr = seen + stderr
    assert "Traceback" not in stderr and "stopped at once by a second SIGINT" in stderr
    wait_for_no_vm(target)
    assert vms_on(target) == 0


# -- 6. reports a person can archive ------------------------------------------------------------


def test_every_report_names_when_what_and_which_server(target: str, tmp_path: Path) -> None:
    """No timestamp, tool version or server identity in the HTML or JSON on main; free
    blocks drawn as zig-zag lines, no latency over time."""
    from pkvm_sim import __version__

    with Hypervisor(target) as hv:  # the server's identity, asked independently
        instance_id, profile = hv.instance_id(), hv.reserve().profile
    before = time.time()
    result = load(target, "--vms", "2", "--duration", "1.2", "--sample-interval", "0.2",
                  "--workload", "churn", "--json", str(tmp_path / "r.json"),
                  "--csv", str(tmp_path / "r.csv"), "--html", str(tmp_path / "r.html"))
    assert result.returncode == 0, result.stdout + result.stderr
    report, rows, html = reports(tmp_path)
    from datetime import datetime

    stamp = datetime.fromisoformat(report["generated_at"]).timestamp()
    assert before - 1 <= stamp <= time.time() + 1
    assert report["tool_version"] == __version__ and report["target"] == target
    assert report["server"]["instance_id"] == instance_id
    assert report["server"]["profile"] == profile == "v5.14"
    for row in rows:
        assert (row["generated_at"], row["tool_version"], row["target"],
                row["server_profile"], row["server_instance_id"], row["result"]) == \
            (report["generated_at"], __version__, target, profile, instance_id, "ok")
    first_line = result.stdout.splitlines()[0]
    for fact in (report["generated_at"], __version__, target, profile, instance_id):
        assert fact in first_line, (fact, first_line)
        assert fact in html, fact
    # Latency over time: a row per second, p50 <= p99 <= max.
    assert len(report["latency_timeline"]) >= 1
    for row in report["latency_timeline"]:
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert set(row["mean_ms"]) <= set(report["operations"])
    for caption in ("Latency over time", "hyp: free blocks per order"):
        assert f"<figcaption>{caption}</figcaption>" in html


def test_no_two_operations_share_a_colour() -> None:
    """alloc/unpin and create_vm/unshare were drawn in one colour each on main."""
    from pkvm_sim.tools.load.html import operation_style

    ops = ("alloc", "put", "get", "share", "unshare", "pin", "unpin", "guest_map", "topup",
           "mmio", "create_vm", "destroy_vm")
    colours = [operation_style(op, index)["color"] for index, op in enumerate(ops)]
    assert len(set(colours)) == len(ops), dict(zip(ops, colours, strict=True))
