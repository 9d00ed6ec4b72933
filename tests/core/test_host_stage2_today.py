"""Host stage-2 faults of v6.18 and v7.3 against v6.12: the range a fault maps, and what a
fault on memory the host does not own does.

Expected values come from the kernels' host_stage2_adjust_range and handle_host_mem_abort
(arch/arm64/kvm/hyp/nvhe/mem_protect.c), reasoned here, not read from the simulator:

- 6.12: from the level where the walk met the empty entry, the kernel keeps a level's granule
  once the NEXT level supports blocks, so with 16K pages an empty level-1 entry (64 GiB
  granule; level 1 has no blocks with 16K) maps the whole 64 GiB with 32 MiB blocks;
- 6.16+ (6.18, 7.3): the first level that supports blocks and fits the region, so the same
  fault maps one 32 MiB block at level 2;
- a fault on an annotated (hyp-owned) page: 6.12 and 6.18 panic (BUG_ON), 7.3 injects an abort
  into the host (host_inject_mem_abort) and changes nothing.
"""

from __future__ import annotations

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import PermissionDenied
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome

GIB = 1 << 30
MIB = 1 << 20
BASE = 64 * GIB  # 64 GiB aligned: one level-1 entry of a 16K-page table covers the region
# The carve-out goes to the top of RAM, the second region, so the first one's level-1 entry
# is still empty when the host first touches it.
MEMBLOCKS = [f"{BASE:#x}:64G", f"{2 * BASE + GIB:#x}:1G"]  # a hole between them


def boot(profile: str) -> Hypervisor:
    return Hypervisor.boot(SimConfig.from_mapping({
        # 44-bit IPA: the root is at level 1 (40 bits would concatenate level-2 roots)
        "profile": profile, "page_size": "16K", "ia_bits": 44,
        "memblocks": MEMBLOCKS,
    }))


@pytest.mark.parametrize(("profile", "range_bytes", "level"), [
    ("v6.12", 64 * GIB, 1),  # granule of the level the walk stopped at (mapped by blocks)
    ("v6.18", 32 * MIB, 2),  # one block of the first level that has blocks
    ("v7.3", 32 * MIB, 2),
])
def test_a_memory_fault_maps_what_the_kernel_of_the_profile_maps(
        profile: str, range_bytes: int, level: int) -> None:
    hv = boot(profile)
    fault = hv.host_fault(BASE + 5 * MIB)
    assert fault.outcome is FaultOutcome.MAPPED
    assert (fault.range_start, fault.range_end - fault.range_start) == (BASE, range_bytes)
    if profile != "v6.12":  # 6.12 reports the granule's level; its leaves are level 2
        assert fault.level == level
    hv.audit()


def test_a_fault_on_hyp_memory_panics_up_to_6_18_and_is_injected_back_in_7_3() -> None:
    for profile in ("v6.12", "v6.18"):
        hv = boot(profile)
        fault = hv.host_fault(hv.reservation.carveout_base)
        assert fault.outcome is FaultOutcome.FATAL and fault.errno_name == "EPERM", profile
    hv = boot("v7.3")
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(PermissionDenied) as err:
        hv.host_fault(hv.reservation.carveout_base)
    assert err.value.reason == "HOST_ABORT_INJECTED"
    assert hv.canonical_dump(host_tables=True) == before
    assert hv.statistics().host_stage2.fatal_faults == 0
