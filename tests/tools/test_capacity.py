"""`pkvm-sim capacity`: how many guests a machine carries and which limit binds first.

Expected figures come from the kernel's rules, not from the tool:
- v6.2 to v6.12 keep protected VMs in a hyp VM table of KVM_MAX_PVMS = 255 slots
  (arch/arm64/include/asm/kvm_pkvm.h; find_free_vm_table_entry returns -ENOMEM when full);
- v6.1 has no VMs at EL2 at all (__pkvm_init_vm arrived in v6.2): its guests cost host RAM
  only, so host RAM outside the carve-out, divided by the guest size, is what it carries;
- a guest's memory is host RAM: RAM minus the carve-out (kvm_hyp_reserve) bounds big guests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import PageState, VmInfo
from pkvm_sim.core.reservation import compute_reservation
from pkvm_sim.tools import capacity as capacity_tool
from pkvm_sim.tools.capacity import GuestShape, Limit, add_vm, capacity, run_capacity

GIB = 1 << 30
MIB = 1 << 20
KVM_MAX_PVMS = 255  # the kernel's constant, written here independently of the registry
FOUR_GIB = "0x40000000:4G"


def config(profile: str, *memblocks: str, **knobs: object) -> SimConfig:
    return SimConfig.from_mapping({"profile": profile, "memblocks": list(memblocks or
                                                                          [FOUR_GIB]), **knobs})


def test_v6_12_with_small_guests_is_bound_by_the_255_entry_vm_table() -> None:
    # 4 GiB holds about 500 guests of 8 MiB: the table's 255 slots run out first.
    result = capacity(config("v6.12"), GuestShape(vcpus=1, memory_bytes=8 * MIB))
    assert result.vms == KVM_MAX_PVMS
    assert result.binding_limit == Limit.VM_TABLE
    assert result.reason == "VM_TABLE_FULL"
    assert result.host_ram_free_pages > 200 * (8 * MIB // 4096)  # RAM was far from the bound


def test_v6_1_has_no_vm_table_and_is_bound_by_host_ram() -> None:
    cfg = config("v6.1")
    result = capacity(cfg, GuestShape(vcpus=1, memory_bytes=8 * MIB))
    # No VM at EL2 in 6.1: nothing is donated and no table slot taken, so guests run until
    # host RAM outside the carve-out runs out (at most RAM / 8 MiB of them; the host's
    # structures shared with EL2 take a few pages more per guest, where modelled).
    host_ram = 4 * GIB - compute_reservation(cfg).reserved_bytes
    assert KVM_MAX_PVMS < result.vms <= host_ram // (8 * MIB)
    assert result.vms > 0.95 * host_ram // (8 * MIB)
    assert result.binding_limit == Limit.HOST_RAM
    assert result.first_vm_donated_pages == 0


@pytest.mark.parametrize("profile", ["v6.1", "v6.12"])
def test_big_guests_are_bound_by_host_ram(profile: str) -> None:
    # 4 GiB minus a carve-out of a few dozen MiB (minus, in 6.12, the donated VM structures
    # and PGDs) holds three 1 GiB guests and not four.
    result = capacity(config(profile), GuestShape(vcpus=2, memory_bytes=GIB))
    assert result.vms == 3
    assert result.binding_limit == Limit.HOST_RAM
    assert result.reason == "HOST_MEMORY_EXHAUSTED"


def test_a_nearly_used_hyp_pool_binds_first() -> None:
    """Each v6.12 VM's donated pages are mapped in EL2's stage-1, whose table pages come from
    the hyp pool; a pool with only a few pages left stops VM creation there."""
    pool_pages = Hypervisor.boot(config("v6.12")).hyp_pool.nr_pages
    cfg = config("v6.12", hyp_s1_early_used_pages=pool_pages - 4)
    result = capacity(cfg, GuestShape(vcpus=1, memory_bytes=8 * MIB))
    assert result.binding_limit == Limit.HYP_POOL
    assert result.reason == "HYP_POOL_EXHAUSTED"
    assert 0 < result.vms < KVM_MAX_PVMS
    assert result.hyp_pool_free_pages == 0  # every page went to the stage-1 tables


def test_without_a_kernel_vm_table_the_services_records_are_the_cap() -> None:
    """v5.14 serves VMs as an extension with no table reserved: the service keeps 4096."""
    result = capacity(config("v5.14", "0x40000000:8G"), GuestShape(vcpus=1, memory_bytes=4096))
    assert result.vms == 4096
    assert result.binding_limit == Limit.SERVICE_CAP


def test_max_vms_stops_without_a_refusal() -> None:
    result = capacity(config("v6.12"), GuestShape(vcpus=1, memory_bytes=8 * MIB), max_vms=10)
    assert (result.vms, result.binding_limit, result.reason) == (10, Limit.MAX_VMS, "")


def test_a_refused_vm_leaves_the_machine_as_it_was() -> None:
    hv = Hypervisor.boot(config("v6.12"))
    shape = GuestShape(vcpus=2, memory_bytes=GIB, host_shared_pages=3)
    result = run_capacity(hv, shape)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(PkvmError):
        add_vm(hv, shape)
    assert hv.canonical_dump(host_tables=True) == before
    assert len(hv.vms()) == result.vms
    hv.audit()


def one_vm(profile: str, shape: GuestShape) -> tuple[Hypervisor, VmInfo, int]:
    """A fresh machine with one VM of `shape`: (machine, VM, host RAM pages it took)."""
    hv = Hypervisor.boot(config(profile))
    free = hv.host_memory.free_pages
    info = add_vm(hv, shape)
    return hv, info, free - hv.host_memory.free_pages


def test_host_shares_count_against_the_vms_slice() -> None:
    plain, _, _ = one_vm("v6.12", GuestShape(vcpus=1, memory_bytes=MIB))
    hv, info, _ = one_vm("v6.12", GuestShape(vcpus=1, memory_bytes=MIB, host_shared_pages=5))
    assert hv.statistics().shared_pages - plain.statistics().shared_pages == 5
    states = {hv.page_info(info.slice_base_pfn + i).hyp_state for i in range(6)}
    assert [hv.page_info(info.slice_base_pfn + i).hyp_state for i in (0, 4, 5)] == [
        PageState.SHARED_BORROWED, PageState.SHARED_BORROWED, PageState.NOPAGE]
    assert len(states) == 2
    hv.audit()


def test_touched_memory_costs_what_the_memcache_rules_say() -> None:
    """4K pages, 40-bit IPA: the guest stage-2 starts at level 1, so the host tops its
    memcache up to 2 pages (kvm_mmu_cache_min_pages) before each guest map, and EL2 refills
    its own memcache up to the host's count (refill_memcache). Map 1 takes both pages for its
    level-2 and level-3 tables; map 2 needs no table, but the host tops up 2 more and EL2
    takes them (it held 0). So two touched pages cost 4 pages of host RAM more than none."""
    _, _, untouched = one_vm("v5.14", GuestShape(vcpus=1, memory_bytes=MIB))
    hv, _, touched = one_vm("v5.14",
                            GuestShape(vcpus=1, memory_bytes=MIB, touched_bytes=2 * 4096))
    assert touched - untouched == 4
    assert hv.statistics().guest_shared_pages == 2
    hv.audit()


def test_touch_is_ignored_where_the_profile_maps_no_guest_memory() -> None:
    _, _, untouched = one_vm("v6.12", GuestShape(vcpus=1, memory_bytes=MIB))
    hv, _, touched = one_vm("v6.12", GuestShape(vcpus=1, memory_bytes=MIB, touched_bytes=MIB))
    assert touched == untouched
    assert hv.statistics().guest_shared_pages == 0


@pytest.mark.parametrize("bad", [
    {"vcpus": 0}, {"memory_bytes": 0}, {"touched_bytes": 2 * GIB},
    {"host_shared_pages": -1},
])
def test_impossible_shapes_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        GuestShape(**bad)


# -- the command --------------------------------------------------------------------------


def invoke(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="pkvm-sim")
    sub = parser.add_subparsers(dest="command", required=True).add_parser("capacity")
    capacity_tool.add_arguments(sub)
    args = parser.parse_args(["capacity", *argv])
    code = capacity_tool.run(args)
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--memblock", FOUR_GIB, "--vcpus", "1", "--guest-memory", "8M"]


def test_json_for_two_profiles_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke([*SMALL, "--profile", "v6.1", "--profile", "v6.12", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert [r["profile"] for r in rows] == ["v6.1", "v6.12"]
    for row in rows:
        assert {"profile", "vms", "binding_limit", "hyp_pool_free_pages"} <= set(row)
    assert rows[1]["vms"] == KVM_MAX_PVMS and rows[1]["binding_limit"] == "vm-table"
    assert rows[0]["binding_limit"] == "host-ram"


def test_json_for_one_profile_is_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke([*SMALL, "--profile", "v6.12", "--json", "--max-vms", "3"], capsys)
    assert code == 0
    assert json.loads(out)["vms"] == 3


def test_table_names_each_profile_and_its_limit(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = invoke([*SMALL, "--profile", "v6.1", "--profile", "v6.12"], capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if "v6.1" in line and "v6.12" in line)
    assert header.split() == ["v6.1", "v6.12"]
    limits = next(line for line in out.splitlines() if line.startswith("binding limit"))
    assert limits.split()[-2:] == ["host-ram", "vm-table"]


@pytest.mark.parametrize("argv", [
    ["--guest-memory", "lots"], ["--vcpus", "0"], ["--max-vms", "0"],
    ["--memblock", "0x40000000"], ["--touch", "2G", "--guest-memory", "1G"],
    ["--plot", "picture.jpg"],
])
def test_bad_input_exits_2_with_a_message(argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = invoke(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("capacity: error:")


def test_plot_draws_a_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "capacity.png"
    code, _, _ = invoke([*SMALL, "--profile", "v6.1", "--profile", "v6.12", "--plot",
                         str(out)], capsys)
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_command_runs_behind_pkvm_sim() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "capacity", *SMALL, "--profile", "all",
         "--max-vms", "2", "--json"],
        capture_output=True, text=True, timeout=300, check=True)
    rows = json.loads(done.stdout)
    assert len(rows) >= 4
    # every released kernel answers: 2 guests, or no answer where its VM rules are not modelled
    assert all((r["vms"], r["binding_limit"]) in ((2, "max-vms"), (0, "not-modelled"))
               for r in rows)
    assert {r["profile"] for r in rows if r["vms"] == 2} >= {"v5.13", "v5.14", "v6.1", "v6.12"}


# -- against a running service -------------------------------------------------------------


@pytest.fixture
def v6_12_server() -> Iterator[str]:
    """`pkvm-sim serve` of 4 GiB under v6.12 whose operator caps the server at 20 VMs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--profile", "v6.12", "--memblock",
         FOUR_GIB, "--listen", "127.0.0.1:0", "--metrics-listen", "off", "--max-vms", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.split("listening on ")[1].split()[0]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_against_a_server_its_own_vm_cap_binds_and_every_vm_is_destroyed(
        v6_12_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pkvm_client import Hypervisor as Client

    code, out, err = invoke(["--target", v6_12_server, "--vcpus", "1", "--guest-memory", "8M",
                             "--host-shares", "2", "--json"], capsys)
    assert code == 0, err
    row = json.loads(out)
    # The table would hold 255; the operator's --max-vms 20 refuses the 21st (QUOTA_EXCEEDED).
    assert (row["profile"], row["vms"]) == ("v6.12", 20)
    assert (row["binding_limit"], row["reason"]) == ("service-cap", "QUOTA_EXCEEDED")
    with Client(v6_12_server) as hv:
        stats = hv.stats()
        assert stats.nr_vms == 0 and stats.shared_pages == 0


# -- one VM here is one VM of `scenario vm-lifecycle` ----------------------------------------


LIFECYCLE_MACHINE = {"ia_bits": 48, "nr_cpus": 1}  # spelt out for both commands
LIFECYCLE_VM_CAP = 1024  # vm-lifecycle's default: it reports no limit up to this many VMs


def lifecycle(profile: str) -> dict[str, Any] | None:
    """`pkvm-sim scenario vm-lifecycle --json` for 4 GiB, or None where this build has no
    such scenario (it comes with the run-time model)."""
    done = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "scenario", "vm-lifecycle", "--profile", profile,
         "--memblock", FOUR_GIB, "--ia-bits", "48", "--cpus", "1", "--json"],
        capture_output=True, text=True, timeout=600)
    if done.returncode == 2 and ("invalid choice" in done.stderr
                                 or "unrecognized arguments" in done.stderr):
        return None
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize("profile", ["v6.1", "v6.12"])
def test_one_vm_costs_what_vm_lifecycle_says(profile: str) -> None:
    """The first 1-vCPU VM of capacity and the vm1-1vcpu step of vm-lifecycle are the same VM
    (one page of guest memory, as there): the same hyp pool pages, donated and shared pages;
    and as many 1-vCPU VMs run before the first refusal."""
    report = lifecycle(profile)
    if report is None:
        pytest.skip("this build has no `scenario vm-lifecycle` (the run-time model's)")
    phases = {phase["phase"]: phase for phase in report["phases"]}
    boot, first = phases["boot"], phases["vm1-1vcpu"]
    result = capacity(config(profile, **LIFECYCLE_MACHINE),
                      GuestShape(vcpus=1, memory_bytes=4096), max_vms=LIFECYCLE_VM_CAP)
    assert result.first_vm_hyp_pool_pages == (boot["hyp_pool_free_pages"]
                                              - first["hyp_pool_free_pages"])
    assert result.first_vm_donated_pages == first["donated_pages"]
    assert result.first_vm_shared_pages == first["shared_pages"]
    if report["vm_limit"] is None:  # no refusal up to the cap, here either
        assert (result.vms, result.binding_limit) == (LIFECYCLE_VM_CAP, Limit.MAX_VMS)
    else:
        assert result.vms == report["vm_limit"]
