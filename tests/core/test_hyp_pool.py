"""The v5.14 buddy allocator against worked examples and its BUG table
(docs/allocator.md).

Expected values are derived by hand from the kernel algorithm (page_alloc.c, v5.14), as
docs/allocator.md describes it.
"""

from __future__ import annotations

import pytest
from pkvm_sim.core.errors import FailedPrecondition, InvalidArgument, OutOfMemory, WouldPanic
from pkvm_sim.core.hyp_pool import HypPool, get_order, pool_max_order
from pkvm_sim.core.layout import LAYOUT_2, LAYOUT_4, LAYOUT_32, HypPageLayout
from pkvm_sim.core.physmem import PhysicalMemory
from pkvm_sim.core.vmemmap import Vmemmap

NO_ORDER = LAYOUT_4.no_order


def make_pool(
    base: int, nr_pages: int, reserved: int = 0, *, layout: HypPageLayout = LAYOUT_4,
    formula: str = "v5.14", cap: int = 11, physmem: PhysicalMemory | None = None,
) -> HypPool:
    vmemmap = Vmemmap(layout, [(base, nr_pages)])
    memory = physmem if physmem is not None else PhysicalMemory()
    return HypPool(vmemmap, memory, base, nr_pages, reserved,
                   max_order_formula=formula, max_order_cap=cap)


def lists(pool: HypPool) -> dict[int, list[int]]:
    return {o: blocks for o, blocks in pool.free_lists().items() if blocks}


class TestMaxOrder:
    def test_get_order_matches_the_kernel_definition(self) -> None:
        assert get_order(4096, 12) == 0
        assert get_order(4097, 12) == 1
        assert get_order(4 * 4096, 12) == 2
        assert get_order(5 * 4096, 12) == 3
        assert get_order(0, 12) == 52  # size-1 wraps: BITS_PER_LONG - PAGE_SHIFT

    @pytest.mark.parametrize(("nr_pages", "v514", "v517"),
                             [(2, 1, 2), (4, 2, 3), (5, 3, 3), (1000, 10, 10), (1024, 10, 11),
                              (4097, 11, 11), (2585, 11, 11)])
    def test_formulas(self, nr_pages: int, v514: int, v517: int) -> None:
        assert pool_max_order(nr_pages, page_shift=12, max_order_cap=11) == v514
        assert pool_max_order(nr_pages, page_shift=12, max_order_cap=11, formula="v5.17") == v517

    def test_u32_wrap_of_the_kernel_shift(self) -> None:
        # nr_pages << 12 in 32 bits: 2**20 + 5 pages look like 5 pages, 2**20 pages like 0.
        assert pool_max_order(2**20 + 5, page_shift=12, max_order_cap=11, u32_arithmetic=True) == 3
        assert pool_max_order(2**20, page_shift=12, max_order_cap=11, u32_arithmetic=True) == 11
        assert pool_max_order(2**20 + 5, page_shift=12, max_order_cap=11) == 11

    def test_one_page_pool_is_refused_with_the_v514_formula(self) -> None:
        with pytest.raises(InvalidArgument) as info:
            make_pool(0x100, 1)
        assert info.value.reason == "POOL_MAX_ORDER_ZERO"
        pool = make_pool(0x100, 1, formula="v5.17")
        assert lists(pool) == {0: [0x100]}


class TestTinyExample:
    """docs/allocator.md: pages 0..3 at an aligned base."""

    def test_init_alloc_put(self) -> None:
        pool = make_pool(0x40, 4)
        assert pool.max_order == 2
        assert lists(pool) == {1: [0x40, 0x42]}
        assert pool.try_alloc_pages(0) == 0x40
        assert lists(pool) == {0: [0x41], 1: [0x42]}
        assert pool.put_page(0x40) == 0
        assert lists(pool) == {1: [0x42, 0x40]}
        pool.check_invariants()

    def test_v517_formula_gives_one_order2_block(self) -> None:
        pool = make_pool(0x40, 4, formula="v5.17")
        assert lists(pool) == {2: [0x40]}


class TestInit:
    def test_maximal_aligned_blocks_in_address_order(self) -> None:
        # 18 unreserved pages 0x80005..0x80016 at an unaligned base (the pub01 trace's pool).
        pool = make_pool(0x80003, 20, 2)
        assert pool.max_order == 5
        assert lists(pool) == {0: [0x80005, 0x80016], 1: [0x80006, 0x80014],
                               2: [0x80010], 3: [0x80008]}
        assert pool.free_pages == 18
        pool.check_invariants()

    def test_reserved_pages_are_held_with_order_0(self) -> None:
        pool = make_pool(0x1000, 16, 3)
        for pfn in range(0x1000, 0x1003):
            assert (pool.refcount(pfn), pool.page_order(pfn)) == (1, 0)
        assert pool.page_order(0x1004) == 2 and pool.page_order(0x1005) == NO_ORDER
        stats = pool.statistics()
        assert (stats.reserved_pages, stats.free_pages, stats.allocated_pages) == (3, 13, 0)

    def test_max_order_caps_block_size(self) -> None:
        pool = make_pool(0, 4096)  # max_order 11 caps at order 10 even though 4096 is aligned
        assert lists(pool) == {10: [0, 1024, 2048, 3072]}

    def test_overlapping_pool_is_refused(self) -> None:
        vmemmap = Vmemmap(LAYOUT_4, [(0, 64)])
        physmem = PhysicalMemory()
        HypPool(vmemmap, physmem, 0, 32, 1)
        with pytest.raises(WouldPanic):
            HypPool(vmemmap, physmem, 0, 8)

    def test_pool_outside_the_vmemmap_is_refused(self) -> None:
        with pytest.raises(WouldPanic) as info:
            HypPool(Vmemmap(LAYOUT_4, [(0, 64)]), PhysicalMemory(), 32, 64)
        assert info.value.reason == "VMEMMAP_NOT_COVERED"


class TestAllocPut:
    def test_split_keeps_lower_half_and_queues_upper_halves_largest_first(self) -> None:
        pool = make_pool(0x100, 16, formula="v5.17")  # one order-4 block
        assert pool.try_alloc_pages(0) == 0x100
        assert lists(pool) == {0: [0x101], 1: [0x102], 2: [0x104], 3: [0x108]}
        assert pool.try_alloc_pages(1) == 0x102
        assert pool.try_alloc_pages(1) == 0x104  # order 2 block split: 0x106 queued
        assert lists(pool) == {0: [0x101], 1: [0x106], 3: [0x108]}
        pool.check_invariants()

    def test_put_coalesces_with_free_buddies_and_appends_at_tail(self) -> None:
        pool = make_pool(0x100, 16, formula="v5.17")
        a, b = pool.alloc_pages(0), pool.alloc_pages(0)
        assert (a, b) == (0x100, 0x101)
        assert pool.put_page(a) == 0  # buddy 0x101 held: no merge
        assert lists(pool)[0] == [0x100]
        assert pool.put_page(b) == 0  # merges all the way back to order 4
        assert lists(pool) == {4: [0x100]}
        pool.check_invariants()

    def test_fifo_order(self) -> None:
        pool = make_pool(0, 8, formula="v5.17")
        pages = [pool.alloc_pages(0) for _ in range(8)]
        for pfn in (6, 0, 4, 2):  # no two are buddies
            pool.put_page(pfn)
        assert pool.free_list(0) == [6, 0, 4, 2]
        assert [pool.alloc_pages(0) for _ in range(4)] == [6, 0, 4, 2]
        assert pages == list(range(8))

    def test_get_and_put_count_references(self) -> None:
        pool = make_pool(0, 8)
        pfn = pool.alloc_pages(1)
        assert pool.get_page(pfn) == 2
        assert pool.put_page(pfn) == 1
        assert pool.put_page(pfn) == 0
        assert pool.is_free(pfn) or pool.is_free(pfn & ~3)

    def test_exhaustion_and_order_above_max_order(self) -> None:
        pool = make_pool(0, 4)  # max_order 2: order 2 never available
        with pytest.raises(OutOfMemory):
            pool.alloc_pages(2)
        assert pool.try_alloc_pages(1) == 0
        assert pool.try_alloc_pages(1) == 2
        assert pool.try_alloc_pages(0) is None
        assert pool.statistics().alloc_failures == 2

    def test_freed_blocks_are_zeroed(self) -> None:
        physmem = PhysicalMemory()
        pool = make_pool(0, 8, physmem=physmem)
        pfn = pool.alloc_pages(1)
        physmem.write(pfn + 1, {"pte": 1})
        pool.put_page(pfn)
        assert physmem.is_zero(pfn + 1)
        pool.check_invariants()


class TestRefusals:
    """docs/allocator.md: what the kernel BUGs on is an error here, and nothing changes."""

    @staticmethod
    def snapshot(pool: HypPool) -> tuple[object, ...]:
        return (pool.free_lists(), list(pool.held_blocks()), pool.free_pages,
                [pool.refcount(p) for p in range(pool.base_pfn, pool.end_pfn)])

    def refused(self, pool: HypPool, exc: type[Exception], fn: object, *args: int) -> str:
        before = self.snapshot(pool)
        with pytest.raises(exc) as info:
            fn(*args)  # type: ignore[operator]
        assert self.snapshot(pool) == before
        pool.check_invariants()
        return str(getattr(info.value, "reason", ""))

    def test_put_of_free_page(self) -> None:
        pool = make_pool(0, 16)
        assert self.refused(pool, WouldPanic, pool.put_page, 0) == "PUT_OF_FREE_PAGE"

    def test_put_of_tail_page(self) -> None:
        pool = make_pool(0, 16)
        pfn = pool.alloc_pages(2)
        assert self.refused(pool, WouldPanic, pool.put_page, pfn + 1) == "PUT_OF_FREE_PAGE"

    def test_get_of_free_page(self) -> None:
        pool = make_pool(0, 16)
        assert self.refused(pool, WouldPanic, pool.get_page, 4) == "GET_OF_FREE_PAGE"

    def test_page_outside_the_pool(self) -> None:
        pool = make_pool(16, 16)
        assert self.refused(pool, WouldPanic, pool.put_page, 40) == "PAGE_OUTSIDE_POOL"
        assert self.refused(pool, WouldPanic, pool.get_page, 3) == "PAGE_OUTSIDE_POOL"

    def test_reserved_page(self) -> None:
        pool = make_pool(0, 16, 2)
        assert self.refused(pool, FailedPrecondition, pool.put_page, 1) == "RESERVED_PAGE"

    @pytest.mark.parametrize(("layout", "limit"), [(LAYOUT_4, 65535), (LAYOUT_2, 8191)])
    def test_refcount_overflow_at_the_layout_limit(self, layout: HypPageLayout, limit: int) -> None:
        pool = make_pool(0, 16, layout=layout, cap=7 if layout is LAYOUT_2 else 11)
        pfn = pool.alloc_pages(0)
        for _ in range(limit - 1):
            pool.get_page(pfn)
        assert pool.refcount(pfn) == limit
        assert self.refused(pool, WouldPanic, pool.get_page, pfn) == "REFCOUNT_OVERFLOW"

    def test_32_byte_layout_counts_past_16_bits(self) -> None:
        pool = make_pool(0, 16, layout=LAYOUT_32)
        pfn = pool.alloc_pages(0)
        pool.vmemmap.set_entry(pfn, refcount=65535)  # 65534 gets would be slow
        assert pool.get_page(pfn) == 65536
        assert pool.no_order == 2**32 - 1

    def test_32_byte_layout_splits_and_merges_with_64_bit_tails(self) -> None:
        """A tail's entry is NO_ORDER << 32 = 0xffffffff00000000: all 64 bits are kept."""
        pool = make_pool(0, 16, layout=LAYOUT_32)  # max_order 4: blocks 0 and 8 of order 3
        assert pool.alloc_pages(0) == 0  # 4 -> list 2, 2 -> list 1, 1 -> list 0
        assert lists(pool) == {0: [1], 1: [2], 2: [4], 3: [8]}
        assert [pool.page_order(p) for p in range(8)] == [0, 0, 1, 2**32 - 1, 2, *[2**32 - 1] * 3]
        assert pool.vmemmap.entry(5) == 0xFFFF_FFFF_0000_0000
        pool.check_invariants()
        assert pool.put_page(0) == 0  # merges with 1, 2 and 4 back into block 0 of order 3
        assert lists(pool) == {3: [8, 0]}
        assert pool.page_order(1) == 2**32 - 1 and pool.refcount(1) == 0
        pool.check_invariants()


class TestOverlap:
    @pytest.mark.parametrize("overlap_pfn", [0x4000 + 40, 0x4000 + 63, 0x8000 + 5])
    def test_a_pool_over_pages_with_a_refcount_is_refused(self, overlap_pfn: int) -> None:
        """hyp_pool_init BUGs on a page whose refcount is not 0: the second pool's range
        holds one referenced page (in the chunk of the first pool, or in another chunk)."""
        vmemmap = Vmemmap(LAYOUT_4, [(0x4000, 0x8000)])
        memory = PhysicalMemory()
        HypPool(vmemmap, memory, 0x4000, 64, 64)  # 64 reserved pages: refcount 1 each
        vmemmap.set_entry(0x8000 + 5, refcount=1)
        with pytest.raises(WouldPanic) as info:
            HypPool(vmemmap, memory, overlap_pfn, 64, 0)
        assert info.value.reason == "POOL_PAGES_IN_USE"
        assert vmemmap.refcount(overlap_pfn) == 1  # nothing written
        HypPool(vmemmap, memory, 0x4000 + 64, 64, 0)  # the free pages next to it are fine


class TestSplitAndAdmitted:
    def test_split_page_makes_independent_order0_pages(self) -> None:
        pool = make_pool(0, 16)
        pfn = pool.alloc_pages(2)
        pool.split_page(pfn)
        assert [(pool.refcount(p), pool.page_order(p)) for p in range(pfn, pfn + 4)] == [(1, 0)] * 4
        pool.check_invariants()
        for p in (pfn + 3, pfn + 1, pfn, pfn + 2):
            pool.put_page(p)
        pool.check_invariants()
        assert pool.free_pages == 16

    def test_admitted_pages_are_never_coalesced(self) -> None:
        vmemmap = Vmemmap(LAYOUT_4, [(0, 64)])
        pool = HypPool(vmemmap, PhysicalMemory(), 0, 4)
        pool.admit_page(33)
        pool.admit_page(32)
        assert pool.put_page(33) == 0 and pool.put_page(32) == 0
        assert pool.free_list(0) == [33, 32]  # buddies, yet both stay order 0
        pool.check_invariants()
        assert pool.try_alloc_pages(0) == 33
        assert pool.statistics().admitted_pages == 2
        pool.put_page(33)
        pool.release_admitted(33)
        assert vmemmap.refcount(33) == 0 and not pool.contains(33)
        pool.check_invariants()


@pytest.mark.parametrize("other_written_pages", [0, 64])
def test_check_invariants_finds_a_written_free_page(other_written_pages: int) -> None:
    """A free block must read as zeros (the memset of __hyp_attach_page). Other pools' pages
    in the shared physmem, few or many, change nothing; both ways of finding the pool's
    written pages (its range or physmem, whichever is smaller) are exercised."""
    pool = make_pool(0x100, 16)
    for q in range(other_written_pages):
        pool.physmem.write(0x10_000 + q, "another pool's table")
    pool.check_invariants()
    held = pool.alloc_pages(0)
    pool.physmem.write(held, "data")
    pool.check_invariants()  # a held page may hold anything
    free_tail = held + 1  # the buddy split off by the alloc: free
    pool.physmem.write(free_tail, "stale")
    with pytest.raises(AssertionError, match=f"free page {free_tail:#x} is not zero"):
        pool.check_invariants()
