"""Property-based sequences over the whole hypervisor: every step is followed by audit().

Operations: host faults (memory and MMIO), map_mmio, recycles, VM creation and teardown,
memcache top-ups, guest maps, shares (all or nothing and page by page), unshares, pins,
allocs, gets and puts. Refusals are fine (they must change nothing: checked with the
canonical dump); audit must always pass. Every profile runs, each with what its kernel has
(an operation it lacks is refused NOT_IN_PROFILE, changing nothing), so the audit's rules
(no page both guest-mapped and hyp-borrowed, hyp stage-1 tables counted) hold everywhere.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import OutOfMemory, PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, PoolKind
from pkvm_sim.core.profiles import Operation

# Two RAM regions with a 1 MiB hole, so MMIO is needed both in block-mappable gaps and
# page by page next to RAM.
MEMBLOCKS = ["0x80000000:64M", "0x84100000:63M"]
CONFIGS = [
    {"profile": "v5.14"},
    {"profile": "v5.13"},
    {"profile": "v5.14", "page_size": "16K"},
    {"profile": "v5.14", "vmemmap_coverage": "carveout"},
    {"profile": "v6.1", "vmemmap_coverage": "carveout"},
    {"profile": "v6.1"},
    {"profile": "v6.12"},
    {"profile": "v6.18"},  # run-time rules of v6.16+ (a modelled 4K build)
    {"profile": "v7.3"},
    {"profile": "v7.3", "page_size": "16K"},
    {"profile": "v6.18", "page_size": "64K"},  # no modelled build: NOT_MODELLED
    # 64K pages with the 2-byte hyp_page: refcount limit 8191 for 8192-entry tables
    {"profile": "v6.12", "page_size": "64K", "hyp_page_layout": "2"},
    {"profile": "v5.14", "page_size": "64K", "hyp_page_layout": "2"},
]

def _config_id(config: dict[str, Any]) -> str:
    return "-".join(str(v) for v in config.values())


op = st.one_of(
    st.tuples(st.just("fault"), st.integers(0, (0x8800_0000 >> 12) + 64)),
    st.tuples(st.just("mmio"), st.integers(0x83F0_0000 >> 12, 0x8420_0000 >> 12)),
    st.tuples(st.just("recycle")),
    st.tuples(st.just("create"), st.integers(1, 3), st.integers(1, 600)),
    # KVM_CREATE_VM + vCPUs only (the VM exists at EL1), then its first KVM_RUN
    st.tuples(st.just("create_el1"), st.integers(1, 5), st.integers(1, 64)),
    st.tuples(st.just("run"), st.integers(0, 3)),
    st.tuples(st.just("destroy"), st.integers(0, 3)),
    st.tuples(st.just("topup"), st.integers(0, 3), st.integers(0, 8)),
    st.tuples(st.just("gmap"), st.integers(0, 3), st.integers(0, 1 << 12), st.integers(0, 599)),
    st.tuples(st.sampled_from(["share", "pshare", "unshare", "pin", "unpin"]),
              st.integers(0, 3), st.integers(0, 599), st.integers(1, 3)),
    st.tuples(st.just("alloc"), st.integers(0, 3), st.integers(0, 3), st.booleans()),
    st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 3), st.integers(0, 7)),
)


def apply(hv: Hypervisor, step: tuple[Any, ...], blocks: list[tuple[int, int]]) -> None:
    vms = [v.handle for v in hv.vms()]
    kind = step[0]

    def vm_at(i: int) -> int:
        return vms[i % len(vms)] if vms else 0x1000 + i

    page = hv.page_size
    if kind == "fault":
        hv.host_fault((step[1] << 12) // page * page)
    elif kind == "mmio":
        addr = (step[1] << 12) // page * page
        if hv.host_stage2.is_memory(addr):
            return
        r = hv.map_mmio(addr)
        assert r.outcome is not FaultOutcome.FATAL or r.errno_name == "ENOMEM"
    elif kind == "recycle":
        hv.unmap_dev_all()
    elif kind == "create":
        hv.create_vm(nr_vcpus=step[1], slice_pages=step[2])
    elif kind == "create_el1":
        hv.create_vm(nr_vcpus=step[1], slice_pages=step[2], run=False)
    elif kind == "run":
        hv.run_vm(vm_at(step[1]))
    elif kind == "destroy":
        hv.destroy_vm(vm_at(step[1]))
    elif kind == "topup":
        hv.topup_memcache(vm_at(step[1]), step[2])
    elif kind == "gmap":
        h = vm_at(step[1])
        info = hv.vm(h)
        hv.guest_map(h, step[2] * page, info.slice_base_pfn + step[3] % info.slice_nr_pages)
    elif kind == "pshare":
        h = vm_at(step[1])
        info = hv.vm(h)
        pfn = info.slice_base_pfn + step[2] % info.slice_nr_pages
        hv.host_share(h, pfn, step[3], page_by_page=True)
    elif kind in ("share", "unshare", "pin", "unpin"):
        h = vm_at(step[1])
        info = hv.vm(h)
        pfn = info.slice_base_pfn + step[2] % info.slice_nr_pages
        call = {"share": hv.host_share, "unshare": hv.host_unshare,
                "pin": hv.pin_shared, "unpin": hv.unpin_shared}[kind]
        call(h, pfn, step[3])
    elif kind == "alloc":
        pfn = hv.alloc_pages(vm_at(step[1]), step[2], PoolKind.VM if step[3] else PoolKind.HYP)
        blocks.append((vm_at(step[1]), pfn))
    elif kind in ("get", "put") and blocks:
        h, pfn = blocks[step[2] % len(blocks)]
        (hv.get_page if kind == "get" else hv.put_page)(h, pfn)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(op, min_size=1, max_size=30))
def test_random_sequences_keep_every_invariant(config: dict[str, Any],
                                               steps: list[tuple[Any, ...]]) -> None:
    hv = Hypervisor.boot(SimConfig.from_mapping({**config, "memblocks": MEMBLOCKS}))
    hv.audit()
    blocks: list[tuple[int, int]] = []
    for step in [("create", 1, 64), ("topup", 0, 3), *steps]:
        before = hv.canonical_dump(host_tables=True)
        try:
            apply(hv, step, blocks)
        except PkvmError as error:
            # A refusal changes nothing at all (pools, tables, memory, VMs).
            assert hv.canonical_dump(host_tables=True) == before, step
            if error.reason == "NOT_IN_PROFILE":
                assert not hv.operations >= _NEEDS.get(step[0], set()), step
            if error.reason == "NOT_MODELLED":  # the kernel has it; the core lacks its rules
                assert hv.unmodelled_operations & (
                    _NEEDS.get(step[0], set()) | {Operation.VMS}), step
        hv.audit()


_NEEDS = {  # what each step needs from the profile (a NOT_IN_PROFILE must be right)
    "topup": {Operation.GUEST_SHARE}, "gmap": {Operation.GUEST_SHARE},
    "share": {Operation.SHARE_HYP}, "pshare": {Operation.SHARE_HYP},
    "unshare": {Operation.UNSHARE_HYP}, "pin": {Operation.PIN_SHARED},
    "unpin": {Operation.PIN_SHARED}, "alloc": {Operation.VMS},
}


vm_op = st.one_of(
    st.tuples(st.just("topup"), st.integers(0, 3), st.integers(0, 8)),
    st.tuples(st.just("gmap"), st.integers(0, 3), st.integers(0, 1 << 12), st.integers(0, 599)),
    st.tuples(st.sampled_from(["share", "pshare", "unshare", "pin", "unpin"]),
              st.integers(0, 3), st.integers(0, 599), st.integers(1, 3)),
    st.tuples(st.just("alloc"), st.integers(0, 3), st.integers(0, 3), st.booleans()),
    st.tuples(st.sampled_from(["get", "put"]), st.integers(0, 3), st.integers(0, 7)),
)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vms=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 600)), min_size=1, max_size=4),
       steps=st.lists(vm_op, max_size=30))
def test_create_all_destroy_all_returns_to_the_boot_state(
        config: dict[str, Any], vms: list[tuple[int, int]], steps: list[tuple[Any, ...]]) -> None:
    hv = Hypervisor.boot(SimConfig.from_mapping({**config, "memblocks": MEMBLOCKS}))
    if Operation.VMS in hv.unmodelled_operations:
        with pytest.raises(PkvmError, match="does not implement for this machine"):
            hv.create_vm(nr_vcpus=1, slice_pages=1)
        return
    boot_dump = hv.canonical_dump()
    for nr_vcpus, slice_pages in vms:
        # Small machines (64K pages) may run out of host RAM: a refused creation must
        # change nothing, which the final comparison checks too.
        with contextlib.suppress(OutOfMemory):
            hv.create_vm(nr_vcpus=nr_vcpus, slice_pages=slice_pages)
    blocks: list[tuple[int, int]] = []
    for step in steps:
        with contextlib.suppress(PkvmError):
            apply(hv, step, blocks)
    hv.audit()
    for info in hv.vms():
        hv.destroy_vm(info.handle)
        hv.audit()
    assert hv.canonical_dump() == boot_dump
