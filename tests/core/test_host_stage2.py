"""Host stage-2: boot golden vector (1.6), the worked fault trace (3.9), MMIO recycling (3.8).

Expected figures are taken from the kernel's walkers (pgtable.c, mem_protect.c) or reasoned
by hand in the comments; none is copied
from the implementation's output.
"""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.layout import KIB, Profile
from pkvm_sim.core.model import FaultOutcome

MIB = 1 << 20
GIB = 1 << 30


def boot(**values: Any) -> Hypervisor:
    return Hypervisor.boot(SimConfig.from_mapping(values))


def heads(hv: Hypervisor, pool_index: int = 0) -> dict[int, list[int]]:
    pool = hv.host_pools[pool_index]
    return {o: [pfn << 12 for pfn in pool.free_list(o)] for o in range(pool.max_order)}


def test_example_a_host_s2_pool_golden_vector_after_boot() -> None:
    """1.6: host_s2_pool 2585 pages at 0x1_7F40_F000; the PGD is the order-1 split of the
    order-3 block at 0x1_7FE2_0000 (buddies 0x1_7FE2_4000 (o2) and 0x1_7FE2_2000 (o1)
    appended); the first table page later allocated is 0x1_7F40_F000 (head of list 0): at
    boot that is the table holding the carve-out's annotations (3.7, 3.9 step 3).

    The spec lists o5 as 0x1_7F42_0000 and 0x1_7F43_0000, but 0x1_7F43_0000 is not 32-page
    aligned; by hand the pool [0x17f40f, 0x17fe28) decomposes into 0x17f40f(o0) 0x17f410(o4)
    0x17f420(o5) 0x17f440(o6) 0x17f480(o7) 0x17f500(o8) 0x17f600(o9) 0x17f800(o10)
    0x17fc00(o9) 0x17fe00(o5) 0x17fe20(o3): the second o5 block is 0x1_7FE0_0000.
    """
    hv = boot()
    assert hv.reservation.carveout_base == 0x1_7EA0_0000
    assert hv.host_stage2.pgt.pgd_pfns == [0x1_7FE2_0, 0x1_7FE2_1]
    assert heads(hv) == {
        0: [], 1: [0x1_7FE2_2000], 2: [0x1_7FE2_4000], 3: [], 4: [0x1_7F41_0000],
        5: [0x1_7F42_0000, 0x1_7FE0_0000], 6: [0x1_7F44_0000], 7: [0x1_7F48_0000],
        8: [0x1_7F50_0000], 9: [0x1_7F60_0000, 0x1_7FC0_0000], 10: [0x1_7F80_0000],
    }
    pool = hv.host_pools[0]
    assert pool.free_pages == 2583 - 1  # 3.9: 2583 after the PGD, minus the annotation table
    # Each PGD page is its own order-0 page (v5.15 fix): refcount 1 + entries.
    assert pool.refcount(0x1_7FE2_0) == 2  # the TABLE entry for [0x1_4000_0000, +1 GiB)
    assert pool.refcount(0x1_7FE2_1) == 1
    assert pool.refcount(0x1_7F40_F) == 12  # 11 annotated 2 MiB blocks (22 MiB)
    hv.audit()


def test_worked_fault_trace_3_9() -> None:
    """3.9 counts PGD page 0 as if the carve-out annotation came later ("Suppose hyp owns");
    here it is made at boot, so PGD page 0 starts at 2 and each step adds one."""
    hv = boot()
    pgd0, table = 0x1_7FE2_0, 0x1_7F40_F
    pool = hv.host_pools[0]
    r = hv.host_fault(0x8000_1000)
    assert (r.outcome, r.is_memory, r.level) == (FaultOutcome.MAPPED, True, 1)
    assert (r.range_start, r.range_end, r.tables_allocated) == (0x8000_0000, 0xC000_0000, 0)
    assert pool.refcount(pgd0) == 3
    r = hv.host_fault(0x0900_0000)
    assert (r.outcome, r.is_memory, r.level) == (FaultOutcome.MAPPED, False, 1)
    assert (r.range_start, r.range_end) == (0, GIB)
    assert pool.refcount(pgd0) == 4
    r = hv.host_fault(0x1_7E00_0000)
    assert (r.outcome, r.level, r.range_start, r.range_end) == (
        FaultOutcome.MAPPED, 2, 0x1_7E00_0000, 0x1_7E20_0000)
    assert pool.refcount(table) == 13
    before = hv.canonical_dump(host_tables=True)
    r = hv.host_fault(0x1_7EA0_0000)
    assert r.outcome is FaultOutcome.FATAL and r.errno_name == "EEXIST"
    assert hv.canonical_dump(host_tables=True) == before  # reported, not executed
    assert pool.free_pages == 2582  # no table page was needed by any step
    stats = hv.statistics().host_stage2
    assert (stats.faults_memory, stats.faults_mmio, stats.fatal_faults) == (3, 1, 1)
    hv.audit()


def test_fault_on_a_mapped_page_is_spurious() -> None:
    hv = boot()
    hv.host_fault(0x8000_1000)
    r = hv.host_fault(0x9000_0000)
    assert r.outcome is FaultOutcome.SPURIOUS and r.level == 1
    assert hv.statistics().host_stage2.spurious_faults == 1


def test_map_mmio_refuses_memory_and_addresses_beyond_the_ipa_space() -> None:
    from pkvm_sim.core.errors import InvalidArgument, OutOfRange

    hv = boot()
    with pytest.raises(InvalidArgument):
        hv.map_mmio(0x8000_0000)
    with pytest.raises(OutOfRange):
        hv.host_fault(1 << 40)


# A 64K machine where MMIO must be page-mapped: RAM is the lower half of each 512 MiB window,
# so the upper half (MMIO) shares the window with RAM and needs a level-3 table (3.3, 3.4).
WINDOW = 512 * MIB
HALF_RAM = [f"{0x8000_0000 + i * WINDOW:#x}:256M" for i in range(8)]


def half_ram(profile: str) -> Hypervisor:
    return boot(profile=profile, page_size="64K", memblocks=HALF_RAM)


def mmio_in_window(i: int) -> int:
    return 0x8000_0000 + i * WINDOW + 256 * MIB + 0x1_0000


def test_v5_13_recycles_its_mmio_pool_after_g_tables() -> None:
    """v5.13 DEV = G = M(1 GiB / 64K) = 5 pages (1.4); each MMIO fault in a new window needs
    one level-3 table (64K, ia 40: levels 2..3, one PGD page). The 6th window finds the dev
    pool empty: unmap_dev_all frees the 5 MMIO-only tables and the retry maps."""
    hv = half_ram("v5.13")
    dev = hv.host_pools[1]
    assert dev.nr_pages == 5
    for i in range(5):
        r = hv.map_mmio(mmio_in_window(i))
        assert r.outcome is FaultOutcome.MAPPED and r.level == 3 and r.tables_allocated == 1
        assert not r.recycled
    assert dev.free_pages == 0
    r = hv.map_mmio(mmio_in_window(5))
    assert r.outcome is FaultOutcome.MAPPED and r.recycled and r.recycled_pages == 5
    stats = hv.statistics().host_stage2
    assert (stats.mmio_recycles, stats.mmio_recycled_pages, stats.map_failures) == (1, 5, 0)
    hv.audit()


def test_v5_14_maps_the_same_mmio_without_recycling() -> None:
    """v5.14: one pool of T + 16 + G = 8 * M(4096) + 16 + 5 = 8 * 4 + 21 = 53 pages."""
    hv = half_ram("v5.14")
    assert hv.host_pools[0].nr_pages == 53
    for i in range(6):
        r = hv.map_mmio(mmio_in_window(i))
        assert r.outcome is FaultOutcome.MAPPED and not r.recycled
    assert hv.statistics().host_stage2.mmio_recycles == 0
    hv.audit()


def test_v5_13_mmio_table_holding_memory_is_never_recycled() -> None:
    """3.8 accounting problem: a dev-pool table that also maps memory survives recycling."""
    hv = half_ram("v5.13")
    dev = hv.host_pools[1]
    hv.map_mmio(mmio_in_window(0))  # table from the dev pool
    hv.host_fault(0x8000_0000)  # memory page in the same table
    freed = hv.unmap_dev_all()
    assert freed == 0 and dev.statistics().allocated_pages == 1
    hv.audit()


def test_memory_fault_enomem_is_fatal_in_v5_13_but_recycles_in_v5_14() -> None:
    """3.8: MMIO tables in windows 0..5, the memory pool exhausted (by hand, standing for
    other users), then a memory fault in window 6 needs a level-3 table."""
    for profile in ("v5.13", "v5.14"):
        hv = half_ram(profile)
        for i in range(6):
            assert hv.map_mmio(mmio_in_window(i)).outcome is FaultOutcome.MAPPED
        mem_pool = hv.host_pools[0]
        while mem_pool.try_alloc_pages(0) is not None:
            pass
        r = hv.host_fault(0x8000_0000 + 6 * WINDOW)
        if profile == "v5.13":
            assert r.outcome is FaultOutcome.FATAL and r.errno_name == "ENOMEM"
            assert not r.recycled
            assert hv.statistics().host_stage2.map_failures == 1
        else:
            assert r.outcome is FaultOutcome.MAPPED and r.recycled
            assert r.recycled_pages == 6 and r.tables_allocated == 1


def test_faithful_bugs_reproduce_the_mark_hyp_off_by_one_in_v5_13_only() -> None:
    """3.7 (corrected): v5.13 tests the exclusive end, so a carve-out ending at its region's
    end (top placement) is refused with -EINVAL and KVM cannot initialise. "KVM: arm64: Fix
    off-by-one in range_is_memory" (end - 1) was merged for v5.14 (and 5.13.12): the default
    v5.14 machine, and every later profile, boots with faithful_bugs."""
    with pytest.raises(ValueError, match="NOT_MEMORY"):
        boot(profile="v5.13", faithful_bugs=True)
    boot(profile="v5.13", faithful_bugs=True, carveout_base=0x1_0000_0000)  # not at the end
    for profile in ("v5.14", "v6.1", "v6.12"):
        boot(profile=profile, faithful_bugs=True)


def test_refcount_limit_of_layout_2_with_64k_pages_is_a_clean_failure() -> None:
    """A.1: 16-bit hyp_page, 64K pages. RAM [0x8000_0000, +256 MiB) shares the 512 MiB
    window with MMIO, so every page of the window lands in one 8192-entry table page."""
    hv = boot(page_size="64K", hyp_page_layout="2", memblocks=["0x80000000:256M"])
    assert hv.config.layout.refcount_max == 8191
    fatal = []
    for addr in range(0x8000_0000, 0xA000_0000, 64 * KIB):
        before = hv.statistics().host_stage2.refcount_limit_hits
        r = hv.host_fault(addr)
        if r.outcome is FaultOutcome.FATAL and r.errno_name is None:
            assert r.reason is not None and r.reason.startswith("REFCOUNT_OVERFLOW")
            assert hv.statistics().host_stage2.refcount_limit_hits == before + 1
            fatal.append(addr)
    _pte, level, table = hv.host_stage2.pgt.lookup(0x8000_0000)
    assert level == 3 and hv.host_pools[0].refcount(table) == 8191  # 8190 entries
    # 8192 slots - 8190 filled = 2 pages refused (annotated carve-out pages are entries too).
    assert len(fatal) == 2
    hv.audit()


def test_boot_profiles_create_their_pools() -> None:
    assert [p.name for p in boot(profile="v5.13").pools()] == ["hyp", "host_s2_mem", "host_s2_dev"]
    assert [p.name for p in boot().pools()] == ["hyp", "host_s2"]
    assert boot(profile=Profile.V5_13).host_pools[1].nr_pages == 515  # DEV = G (1.6)


def test_memblock_config_with_two_regions_sees_the_gap_as_mmio() -> None:
    hv = boot(memblocks=[Memblock(0x8000_0000, 2 * GIB), Memblock(0x8_8000_0000, 6 * GIB)])
    assert hv.host_stage2.find_mem_range(0x2_0000_0000) == (False, 0x1_0000_0000, 0x8_8000_0000)
    r = hv.map_mmio(0x2_0000_0000)
    assert r.outcome is FaultOutcome.MAPPED and r.level == 1
    hv.audit()
