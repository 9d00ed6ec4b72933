"""Stage-2 page-table walks (docs/stage2.md), on a small pool of our own.

Expected values come from the geometry table of 3.1 and from counting entries by hand:
the rule of 3.2 says a table page's refcount is 1 + its non-zero entries.
"""

from __future__ import annotations

import pytest
from pkvm_sim.core.hyp_pool import HypPool
from pkvm_sim.core.layout import KIB, LAYOUT_2, LAYOUT_4, HypPageLayout, PageGeometry
from pkvm_sim.core.pgtable import (
    EAGAIN,
    ENOMEM,
    LEAF,
    OK,
    PROT_RW,
    PROT_RWX,
    STATE_SHARED_OWNED,
    TABLE,
    RefcountLimit,
    Stage2PageTable,
    annotation_pte,
    leaf_pte,
    pgd_geometry,
)
from pkvm_sim.core.physmem import PhysicalMemory
from pkvm_sim.core.vmemmap import Vmemmap

G4K = PageGeometry(4 * KIB)
GIB = 1 << 30
MIB = 1 << 20


@pytest.mark.parametrize(
    ("page_size", "ia_bits", "start_level", "pgd_pages"),
    [
        (4 * KIB, 32, 2, 4), (4 * KIB, 36, 1, 1), (4 * KIB, 40, 1, 2), (4 * KIB, 42, 1, 8),
        (4 * KIB, 44, 0, 1), (4 * KIB, 48, 0, 1),
        (16 * KIB, 40, 2, 16), (16 * KIB, 48, 1, 2),
        (64 * KIB, 40, 2, 1), (64 * KIB, 44, 2, 4), (64 * KIB, 48, 1, 1),
    ],
)
def test_pgd_geometry_matches_3_1(page_size: int, ia_bits: int, start_level: int,
                                  pgd_pages: int) -> None:
    assert pgd_geometry(PageGeometry(page_size), ia_bits) == (start_level, pgd_pages)


class PoolOps:
    def __init__(self, pool: HypPool, refcount_max: int) -> None:
        self.pool = pool
        self._max = refcount_max

    @property
    def refcount_max(self) -> int:
        return self._max

    def zalloc_page(self) -> int | None:
        return self.pool.try_alloc_pages(0)

    def get_page(self, pfn: int) -> int:
        return int(self.pool.get_page(pfn))

    def put_page(self, pfn: int) -> int:
        return int(self.pool.put_page(pfn))

    def page_count(self, pfn: int) -> int:
        return self.pool.refcount(pfn)


def make_table(nr_pages: int = 64, geometry: PageGeometry = G4K, ia_bits: int = 40,
               layout: HypPageLayout = LAYOUT_4) -> tuple[Stage2PageTable, HypPool, PhysicalMemory]:
    base = 0x1000
    vmemmap = Vmemmap(layout, [(base, nr_pages)])
    physmem = PhysicalMemory()
    pool = HypPool(vmemmap, physmem, base, nr_pages, page_shift=geometry.page_shift,
                   max_order_cap=7, max_order_formula="v5.17")
    _start, nr_pgd = pgd_geometry(geometry, ia_bits)
    order = (nr_pgd - 1).bit_length()
    pgd = pool.alloc_pages(order)
    pool.split_page(pgd)
    ops = PoolOps(pool, vmemmap.layout.refcount_max)
    pgt = Stage2PageTable(geometry, ia_bits, physmem, ops, [pgd + i for i in range(nr_pgd)])
    return pgt, pool, physmem


def test_page_map_allocates_one_table_per_missing_level() -> None:
    pgt, pool, _ = make_table()
    free = pool.free_pages
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RWX)) == OK
    assert pool.free_pages == free - 2  # level 2 and level 3 tables (start level is 1)
    tables = list(pgt.table_pages())
    assert [(lvl, n) for _pfn, lvl, n in tables] == [(1, 1), (2, 1), (3, 1), (1, 0)]
    assert pgt.check_refcounts() == []
    assert [pool.refcount(pfn) for pfn, _l, _n in tables] == [2, 2, 2, 1]
    pte, level, _ = pgt.lookup(0x4000_1000)
    assert level == 3 and pte == (LEAF, 0x4000_1, PROT_RWX, 0)
    assert pgt.lookup(0x4000_2000)[0] is None


def test_identical_map_is_eagain_and_permission_change_too() -> None:
    pgt, _pool, _ = make_table()
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RWX)) == OK
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RWX)) == EAGAIN
    # Only permission bits differ: stage2_pte_needs_update says no -> -EAGAIN.
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RW)) == EAGAIN
    # A page state change is an update (SW bits are not permissions).
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RWX, STATE_SHARED_OWNED)) == OK
    assert pgt.check_refcounts() == []


def test_block_over_tables_frees_the_subtree_and_keeps_the_parent_count() -> None:
    pgt, pool, physmem = make_table()
    free0 = pool.free_pages
    for addr in (0x4000_1000, 0x4020_0000, 0x4060_3000):
        assert pgt.map(addr, 4 * KIB, leaf_pte(addr >> 12, PROT_RWX)) == OK
    assert pool.free_pages == free0 - 4  # one level-2 table, three level-3 tables
    pgd0 = pgt.pgd_pfns[0]
    assert pool.refcount(pgd0) == 2
    assert pgt.map(0x4000_0000, GIB, leaf_pte(0x4000_0, PROT_RWX)) == OK  # the anchor
    assert pool.free_pages == free0
    assert pool.refcount(pgd0) == 2
    pte, level, _ = pgt.lookup(0x4060_3000)
    assert level == 1 and pte is not None and pte[0] == LEAF
    assert set(physmem.written_pfns()) == {pgd0}  # freed tables were zeroed
    pool.check_invariants()


def test_page_inside_a_block_replaces_the_block_by_a_table() -> None:
    pgt, pool, _ = make_table()
    assert pgt.map(0x4000_0000, GIB, leaf_pte(0x4000_0, PROT_RWX)) == OK
    assert pgt.map(0x4000_5000, 4 * KIB, leaf_pte(0x4000_5, PROT_RWX, STATE_SHARED_OWNED)) == OK
    # The rest of the old block is lost (re-faulted lazily): only the new page is mapped.
    assert [(m.start, m.level) for m in pgt.mappings()] == [(0x4000_5000, 3)]
    assert pgt.check_refcounts() == []
    assert pool.refcount(pgt.pgd_pfns[0]) == 2


def test_unmap_removes_partial_blocks_and_frees_empty_tables() -> None:
    pgt, pool, _ = make_table()
    free0 = pool.free_pages
    assert pgt.map(0x4000_0000, 2 * MIB, leaf_pte(0x4000_0, PROT_RWX)) == OK  # level-2 block
    assert pgt.map(0x4040_1000, 4 * KIB, leaf_pte(0x4040_1, PROT_RWX)) == OK
    pgt.unmap(0x4010_0000, 4 * KIB)  # touches the block only partly: it goes entirely
    assert [m.start for m in pgt.mappings()] == [0x4040_1000]
    pgt.unmap(0, 1 << 40)
    assert list(pgt.mappings()) == []
    assert pool.free_pages == free0
    assert [pool.refcount(p) for p in pgt.pgd_pfns] == [1, 1]


def test_annotations_are_counted_and_owner_zero_clears() -> None:
    pgt, pool, _ = make_table()
    assert pgt.map(0x4000_0000, 4 * MIB, annotation_pte(1)) == OK  # two level-2 blocks
    assert [(m.start, m.level) for m in pgt.mappings()] == [(0x4000_0000, 2), (0x4020_0000, 2)]
    assert pgt.check_refcounts() == []
    assert pgt.map(0x4000_0000, 4 * MIB, annotation_pte(0)) == OK
    assert list(pgt.mappings()) == []
    assert pgt.check_refcounts() == []  # the empty level-2 table stays (refcount 1)
    assert sum(1 for _ in pgt.table_pages()) == 3
    del pool


def test_enomem_half_way_keeps_partial_edits_consistent() -> None:
    pgt, pool, _ = make_table(nr_pages=4)  # 2 PGD pages + 2 free pages
    assert pgt.map(0x4000_1000, 4 * KIB, leaf_pte(0x4000_1, PROT_RWX)) == OK
    assert pool.free_pages == 0
    assert pgt.map(0x8000_1000, 4 * KIB, leaf_pte(0x8000_1, PROT_RWX)) == ENOMEM
    assert pgt.check_refcounts() == []


def test_refcount_limit_of_the_16_bit_layout_with_64k_pages() -> None:
    """A.1: a 64K table page has 8192 entries; full, it needs refcount 8193 > 8191."""
    g64 = PageGeometry(64 * KIB)
    pgt, pool, _ = make_table(nr_pages=8, geometry=g64, ia_bits=40, layout=LAYOUT_2)
    page = 64 * KIB
    base = 0x8000_0000
    for i in range(8190):  # refcount 1 + 8190 = 8191, the limit
        assert pgt.map(base + i * page, page, leaf_pte((base >> 16) + i, PROT_RWX)) == OK
    _pte, level, table = pgt.lookup(base)
    assert level == 3 and pool.refcount(table) == 8191
    before = dict(pgt.entries(table))
    with pytest.raises(RefcountLimit) as err:
        pgt.map(base + 8190 * page, page, leaf_pte((base >> 16) + 8190, PROT_RWX))
    assert err.value.reason == "REFCOUNT_OVERFLOW" and err.value.would_panic
    assert pgt.entries(table) == before and pool.refcount(table) == 8191
    # Replacing an existing entry is fine (put before get).
    assert pgt.map(base, page, leaf_pte(base >> 16, PROT_RWX, STATE_SHARED_OWNED)) == OK
    assert pgt.check_refcounts() == []


def test_tables_needed_for_page_counts_shared_tables_once() -> None:
    pgt, _pool, _ = make_table()
    planned: set[tuple[int, int]] = set()
    assert pgt.tables_needed_for_page(0x4000_1000, planned) == 2
    assert pgt.tables_needed_for_page(0x4000_2000, planned) == 0  # same level-3 table
    assert pgt.tables_needed_for_page(0x4020_0000, planned) == 1  # new level-3 table
    assert TABLE == 0
