"""Random operation sequences on HypPool; check_invariants() (docs/allocator.md) after
every step.

A tiny independent model tracks what the allocator must guarantee: handed-out blocks are
aligned, inside the pool and disjoint; refcounts follow gets and puts; every page is either
free or held; refusals change nothing.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pkvm_sim.core.errors import OutOfMemory, PkvmError
from pkvm_sim.core.hyp_pool import HypPool
from pkvm_sim.core.layout import LAYOUT_4
from pkvm_sim.core.physmem import PhysicalMemory
from pkvm_sim.core.vmemmap import Vmemmap


class PoolMachine(RuleBasedStateMachine):
    pool: HypPool

    @initialize(base=st.integers(0, 5000), nr_pages=st.integers(2, 300), data=st.data(),
                formula=st.sampled_from(["v5.14", "v5.17"]))
    def make(self, base: int, nr_pages: int, data: st.DataObject, formula: str) -> None:
        reserved = data.draw(st.integers(0, nr_pages - 1))
        self.physmem = PhysicalMemory()
        self.pool = HypPool(Vmemmap(LAYOUT_4, [(base, nr_pages)]), self.physmem, base, nr_pages,
                            reserved, max_order_formula=formula)
        self.held: dict[int, tuple[int, int]] = {}  # head -> (order, refcount)

    @rule(order=st.integers(0, 11))
    def alloc(self, order: int) -> None:
        try:
            pfn = self.pool.alloc_pages(order)
        except OutOfMemory:
            # Only legal if no free block of a sufficient order exists.
            stats = self.pool.statistics()
            assert not any(stats.free_blocks_per_order[order:])
            return
        assert pfn % (1 << order) == 0
        assert self.pool.base_pfn + self.pool.reserved_pages <= pfn
        assert pfn + (1 << order) <= self.pool.end_pfn
        for head, (o, _) in self.held.items():
            assert pfn + (1 << order) <= head or head + (1 << o) <= pfn, "overlapping blocks"
        self.held[pfn] = (order, 1)
        # The kernel's zeroing contract: what we hand out was never left dirty.
        assert all(self.physmem.is_zero(p) for p in range(pfn, pfn + (1 << order)))
        if self.held and len(self.held) % 3 == 0:
            self.physmem.write(pfn, "dirty")  # page-table code writes into its pages

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def put(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.held)))
        order, count = self.held[pfn]
        assert self.pool.put_page(pfn) == count - 1
        if count == 1:
            del self.held[pfn]
        else:
            self.held[pfn] = (order, count - 1)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def get(self, data: st.DataObject) -> None:
        pfn = data.draw(st.sampled_from(sorted(self.held)))
        order, count = self.held[pfn]
        assert self.pool.get_page(pfn) == count + 1
        self.held[pfn] = (order, count + 1)

    @rule(offset=st.integers(-3, 310), op=st.sampled_from(["put", "get"]))
    def poke_any_page(self, offset: int, op: str) -> None:
        """put/get on an arbitrary pfn: either a legal op on a held head, or refused cleanly."""
        pfn = self.pool.base_pfn + offset
        if pfn in self.held:
            return
        before = (self.pool.free_lists(), self.pool.free_pages)
        try:
            (self.pool.put_page if op == "put" else self.pool.get_page)(pfn)
        except PkvmError:
            assert (self.pool.free_lists(), self.pool.free_pages) == before
        else:
            raise AssertionError(f"{op} of {pfn:#x}, which is not a held head, was accepted")

    @invariant()
    def invariants_hold(self) -> None:
        if not hasattr(self, "pool"):
            return
        self.pool.check_invariants()
        held_pages = sum(1 << o for o, _ in self.held.values())
        stats = self.pool.statistics()
        assert stats.allocated_pages == held_pages
        assert stats.free_pages + held_pages + stats.reserved_pages == stats.nr_pages


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
