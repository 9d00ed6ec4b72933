"""`pkvm-sim state inspect FILE`: what a state file holds, without a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor

INSPECT = [sys.executable, "-m", "pkvm_sim.cli", "state", "inspect"]
TOKEN = "tok-never-printed"


def make_file(tmp_path: Path) -> Path:
    hv = Hypervisor.boot(SimConfig())  # the quick-start machine: worked example A
    vm = hv.create_vm(nr_vcpus=2, slice_pages=64, name="studied")
    hv.alloc_pages(vm.handle, 2)
    hv.host_share(vm.handle, vm.slice_base_pfn, 3)
    hv.topup_memcache(vm.handle, 5)
    path = tmp_path / "m.pkvm"
    state_file.save(path, hv, {"tokens": [[vm.handle, TOKEN]],
                               "leases": [[vm.handle, 600.0, 421.5]]})
    return path


def test_inspect_prints_configuration_vms_and_pools(tmp_path: Path) -> None:
    path = make_file(tmp_path)
    result = subprocess.run([*INSPECT, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert TOKEN not in out
    assert f"format version {state_file.FORMAT_VERSION}, checksum ok, audit passed" in out
    assert "profile v5.14, page size 4K, hyp_page layout 4" in out
    assert "memblocks 0x80000000:4096M" in out
    # docs/reservation.md worked example A: hyp 2569 pages, host_s2 2585; the VM's order-2
    # block is 4 of the hyp pages in use (a model where EL2 maps shared pages in its own
    # stage-1 adds the tables for that)
    hyp = next(line.split() for line in out.splitlines() if line.startswith("hyp "))
    assert hyp[:2] == ["hyp", "2569"] and int(hyp[2]) + int(hyp[3]) == 2569
    assert int(hyp[3]) >= 4
    assert any(line.startswith("host_s2 ") and " 2585 " in line for line in out.splitlines())
    # metadata ceil((1024 + 2*8) / 4096) + 2 vCPU pages + a 2-page PGD = 5 donated pages
    row = next(line.split() for line in out.splitlines() if line.startswith("0x1000"))
    assert row == ["0x1000", "1", "studied", "2", "64", "5", "5", "3", "0", "422", "s"]


def test_inspect_json(tmp_path: Path) -> None:
    path = make_file(tmp_path)
    result = subprocess.run([*INSPECT, str(path), "--json"], capture_output=True, text=True,
                            timeout=60)
    summary = json.loads(result.stdout)
    assert summary["next_handle"] == 0x1001 and summary["shared_pages"] == 3
    assert summary["vms"][0]["hyp_blocks"] == 1 and summary["vms"][0]["memcache_pages"] == 5
    assert [p["name"] for p in summary["pools"]] == ["hyp", "host_s2", "vm/4096"]
    assert summary["file"]["size_bytes"] == path.stat().st_size


def test_inspect_of_a_bad_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.pkvm"
    path.write_bytes(b"PKVMSTAT\x01")
    result = subprocess.run([*INSPECT, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "truncated" in result.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_inspect_reads_every_format_version(version: int) -> None:
    """The committed small machine (tests/core/test_state_file.py), as each version wrote it."""
    path = Path(__file__).resolve().parents[1] / "data" / "state" / f"v{version}-small.pkvm"
    result = subprocess.run([*INSPECT, str(path), "--json"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["file"]["format_version"] == version
    assert [vm["handle"] for vm in summary["vms"]] == [0x1000, 0x1002]
    assert summary["vms"][0]["name"] == "kept"
    assert [vm["slice_nr_pages"] for vm in summary["vms"]] == [64, 16]
    assert summary["next_handle"] == 0x1003
