"""v6.x host stage-2 range search (host_stage2_adjust_range, v6.1 and v6.12 mem_protect.c).

The walk stops at the first empty entry, at level L. The kernel takes L's granule around the
address and goes one level down while the NEXT level cannot hold a block or the granule does
not fit the address's memory region or MMIO gap. So a granule whose own level holds no block
(level 0; level 1 with 16K pages) is chosen when the level below holds blocks, and the whole
granule is mapped at once with that level's blocks. v5.14's search maps one block per fault.
"""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome

GIB = 1 << 30
TIB = 1 << 40


def boot(**values: Any) -> Hypervisor:
    return Hypervisor.boot(SimConfig.from_mapping(values))


def test_4k_four_levels_maps_a_whole_512g_window_in_one_fault() -> None:
    # ia_bits 48, 4K: the stage-2 starts at level 0 (512 GiB entries, no blocks). MMIO at
    # 1 TiB lies in the gap [6 GiB, 2**48): level 0's granule [1T, 1.5T) fits and level 1
    # holds 1 GiB blocks, so v6.12 maps all 512 GiB with 512 level-1 blocks, in one new
    # level-1 table page; v5.14 maps the 1 GiB block around the address.
    for profile, mapped, second in (("v6.12", 512 * GIB, FaultOutcome.SPURIOUS),
                                    ("v5.14", GIB, FaultOutcome.MAPPED)):
        hv = boot(profile=profile, ia_bits=48)
        r = hv.host_fault(TIB)
        assert r.outcome is FaultOutcome.MAPPED, profile
        assert (r.range_start, r.range_end - r.range_start) == (TIB, mapped), profile
        assert (r.level, r.tables_allocated) == (1, 1), profile
        assert hv.host_fault(TIB + 100 * GIB).outcome is second, profile
        hv.audit()


def test_16k_level_1_granule_is_mapped_with_level_2_blocks() -> None:
    # 16K, ia_bits 44: three levels from level 1, whose 64 GiB entries hold no block with 16K
    # pages; level 2 holds 32 MiB blocks. MMIO at 1 TiB: v6.12 maps [1T, 1T + 64G) with 2048
    # level-2 blocks in one new table page; v5.14 maps one 32 MiB block.
    for profile, mapped in (("v6.12", 64 * GIB), ("v5.14", 32 << 20)):
        hv = boot(profile=profile, ia_bits=44, page_size="16K")
        r = hv.host_fault(TIB)
        assert r.outcome is FaultOutcome.MAPPED, profile
        assert (r.range_start, r.range_end - r.range_start) == (TIB, mapped), profile
        assert (r.level, r.tables_allocated) == (2, 1), profile
        hv.audit()


@pytest.mark.parametrize("profile", ["v6.1", "v6.12"])
def test_memory_and_small_gaps_map_as_before(profile: str) -> None:
    """Where the region is smaller than the empty entry's granule, both searches end on the
    same block: RAM [2G, 6G) takes 1 GiB blocks; the gap below 2 GiB takes 1 GiB blocks."""
    hv = boot(profile=profile)
    r = hv.host_fault(0x8000_0000)
    assert (r.range_start, r.range_end, r.level) == (0x8000_0000, 0xC000_0000, 1)
    r = hv.host_fault(0x0900_0000)
    assert (r.range_start, r.range_end, r.level) == (0, GIB, 1)
    hv.audit()


def test_hyp_owned_memory_is_eperm_in_v6() -> None:
    """A fault on an annotated (hyp-owned) entry: v6.x's adjust_range returns -EPERM."""
    hv = boot(profile="v6.12")
    r = hv.host_fault(hv.reservation.carveout_base)
    assert (r.outcome, r.errno_name) == (FaultOutcome.FATAL, "EPERM")
    old = boot(profile="v5.14")
    assert old.host_fault(old.reservation.carveout_base).errno_name == "EEXIST"
