"""The host stage-2: an identity map built lazily from host faults (docs/stage2.md).

The host runs with a stage-2 that starts empty (except the annotations of what EL2 owns) and
is filled by faults: each fault maps a block around the address that lies inside the address's
memory region or MMIO gap. v5.13/v5.14 take the largest block compatible with what is already
mapped there (`find_range`, 3.4); v6.x starts from the level where the walk met the empty
entry (`adjust_range`, host_stage2_adjust_range). The profile's record says which.

Pools, per profile (3.8; the records of profiles.py say which pool a fault uses):

    v5.14  host_s2      PGD, memory, MMIO, annotations; any -ENOMEM -> unmap_dev_all, retry once
    v5.13  host_s2_mem  PGD, memory, annotations;        -ENOMEM is fatal
           host_s2_dev  MMIO faults only;                -ENOMEM -> unmap_dev_all, retry once

In v5.13 a table page goes back to the pool it came from (the hyp_page pool pointer), so an
MMIO-allocated table that later also holds memory entries is never given back to the MMIO
pool by a recycle: that is the accounting problem patch 4/7 removed.

Outcomes of a fault: MAPPED; SPURIOUS (-EAGAIN: already mapped); FATAL (what the real
hypervisor would panic on: -EEXIST when the host touches memory EL2 owns, -ENOMEM after the
retry, a table page at the hyp_page refcount limit). FATAL faults are reported, not executed:
EEXIST and the refcount limit change nothing; an -ENOMEM map keeps its partial edits (3.5),
and so does a refcount limit met on the retry after an -ENOMEM (the reason then says so).

Multi-page operations (donation annotations, page-state remaps) are planned first: every
table page they need and every new entry per table page is counted before the first write,
MMIO is recycled only if that makes the plan fit, and a refusal changes nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from .config import Memblock, SimConfig
from .errors import InvalidArgument, OutOfMemory, PermissionDenied, WouldPanic
from .hyp_pool import HypPool, PoolStatistics, get_order
from .model import FaultOutcome, FaultResult, HostStage2Statistics, PageState
from .pgtable import (
    ANNOTATED,
    EAGAIN,
    ENOMEM,
    LEAF,
    OK,
    OWNER_HYP,
    PROT_RW,
    PROT_RWX,
    PTE_KIND,
    PTE_PROT,
    PTE_STATE,
    STATE_OWNED,
    STATE_SHARED_BORROWED,
    STATE_SHARED_OWNED,
    Pte,
    RefcountLimit,
    Stage2PageTable,
    annotation_pte,
    leaf_pte,
)
from .physmem import PhysicalMemory
from .profiles import HostRangeSearch
from .vmemmap import Vmemmap

_STATE_NAMES = {
    STATE_OWNED: PageState.OWNED,
    STATE_SHARED_OWNED: PageState.SHARED_OWNED,
    STATE_SHARED_BORROWED: PageState.SHARED_BORROWED,
}


class HostMmOps:
    """mm_ops of the host stage-2: allocate from the pool chosen for the current operation,
    get/put on the pool a page belongs to (v5.13: its pool pointer; v5.14: the one pool)."""

    def __init__(self, pools: list[HypPool], refcount_max: int) -> None:
        self.pools = pools
        self.alloc_pool = pools[0]
        self._refcount_max = refcount_max
        self.allocated = 0  # running counters; callers take differences
        self.freed = 0
        self.log: list[int] | None = None  # when a list: every table page allocated

    @property
    def refcount_max(self) -> int:
        return self._refcount_max

    def pool_of(self, pfn: int) -> HypPool:
        for pool in self.pools:
            if pool.contains(pfn):
                return pool
        raise WouldPanic(f"table page {pfn:#x} is in no host stage-2 pool",
                         reason="PAGE_OUTSIDE_POOL")

    def zalloc_page(self) -> int | None:
        pfn = self.alloc_pool.try_alloc_pages(0)
        if pfn is not None:
            self.allocated += 1
            if self.log is not None:
                self.log.append(pfn)
        return pfn

    def get_page(self, pfn: int) -> int:
        return self.pool_of(pfn).get_page(pfn)

    def put_page(self, pfn: int) -> int:
        count = self.pool_of(pfn).put_page(pfn)
        if count == 0:
            self.freed += 1
        return count

    def page_count(self, pfn: int) -> int:
        return self.pool_of(pfn).refcount(pfn)


@dataclass
class _Counters:
    faults_memory: int = 0
    faults_mmio: int = 0
    spurious_faults: int = 0
    fatal_faults: int = 0
    mmio_recycles: int = 0
    mmio_recycled_pages: int = 0
    map_failures: int = 0
    refcount_limit_hits: int = 0


class HostStage2:
    """host_kvm.arch.mmu + host_s2 pool(s): the host's identity-mapped stage-2."""

    def __init__(
        self,
        config: SimConfig,
        physmem: PhysicalMemory,
        vmemmap: Vmemmap,
        pools: Sequence[HypPool],
    ) -> None:
        """kvm_host_prepare_stage2: the PGD is allocated from the (memory) pool at once.

        `pools` are the profile's host stage-2 pools, in the order of
        `config.kernel.host_s2_pools` (each record says which faults use it, and whether its
        -ENOMEM recycles MMIO).

        The PGD block is split (hyp_split_page, the v5.15 fix) so every PGD page is an order-0
        page with its own refcount.
        """
        self.config = config
        self.geometry = config.geometry
        self.page_size = self.geometry.page_size
        self.page_shift = self.geometry.page_shift
        specs = config.kernel.host_s2_pools
        if [p.name for p in pools] != [spec.name for spec in specs]:
            raise ValueError(f"host stage-2 pools must be {[spec.name for spec in specs]}")
        by_name = {p.name: p for p in pools}
        # is_memory -> (pool the fault's tables come from, does its -ENOMEM recycle MMIO)
        self._fault_pools: dict[bool, tuple[HypPool, bool]] = {}
        for is_memory in (True, False):
            spec = config.kernel.host_s2_pool_for(is_memory=is_memory)
            self._fault_pools[is_memory] = (by_name[spec.name], spec.recycles_mmio)
        self._range_search = config.kernel.host_s2_range_search
        self._from_empty_entry = self._range_search is not HostRangeSearch.LARGEST_COMPATIBLE
        mem_pool = self._fault_pools[True][0]
        self.mem_pool = mem_pool  # PGD, memory faults, annotations and donations
        self.mm = HostMmOps(list(pools), vmemmap.layout.refcount_max)
        self.memblocks: tuple[Memblock, ...] = config.memblocks
        self._bases = [block.base for block in self.memblocks]
        self._ends = [block.end for block in self.memblocks]  # each fault reads them
        from .pgtable import pgd_geometry

        _start, nr_pgd = pgd_geometry(self.geometry, config.ia_bits)
        order = get_order(nr_pgd * self.page_size, self.page_shift)
        pgd = mem_pool.alloc_pages(order)
        if order:
            mem_pool.split_page(pgd)
        self.counters = _Counters()
        self.pgt = Stage2PageTable(
            self.geometry, config.ia_bits, physmem, self.mm, [pgd + i for i in range(nr_pgd)],
            on_refcount_limit=self.count_refcount_limit,
        )

    def count_refcount_limit(self) -> None:
        """Every RefcountLimit refusal, host or guest stage-2, is counted here once."""
        self.counters.refcount_limit_hits += 1

    # -- memory map (3.3) ----------------------------------------------------------------

    def find_mem_range(self, addr: int) -> tuple[bool, int, int]:
        """(is memory, range start, range end): the memblock holding addr, else the gap."""
        bases = self._bases
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0 and addr < self._ends[i]:
            return True, bases[i], self._ends[i]
        start = self._ends[i] if i >= 0 else 0
        end = bases[i + 1] if i + 1 < len(bases) else 1 << 64
        return False, start, end

    def is_memory(self, addr: int) -> bool:
        return self.find_mem_range(addr)[0]

    def mmio_gaps(self) -> list[tuple[int, int]]:
        """The gaps unmap_dev_all walks: below, between and above the memblocks."""
        gaps: list[tuple[int, int]] = []
        prev = 0
        for block in self.memblocks:
            if block.base > prev:
                gaps.append((prev, block.base))
            prev = block.end
        gaps.append((prev, self.pgt.ia_size))
        return gaps

    # -- faults (3.4) ----------------------------------------------------------------------

    def handle_fault(self, addr: int) -> FaultResult:
        """handle_host_mem_abort -> host_stage2_idmap(addr), v5.13/v5.14 flavour."""
        if addr < 0:
            raise InvalidArgument(f"address {addr:#x} is negative", reason="BAD_ADDRESS")
        if addr >= self.pgt.ia_size:
            from .errors import OutOfRange

            raise OutOfRange(
                f"address {addr:#x} is beyond the {self.config.ia_bits}-bit IPA space",
                reason="BEYOND_IPA_SPACE",
            )
        addr &= ~(self.page_size - 1)
        is_mem, rstart, rend = self.find_mem_range(addr)
        counters = self.counters
        if is_mem:
            counters.faults_memory += 1
        else:
            counters.faults_mmio += 1
        prot = PROT_RWX if is_mem else PROT_RW
        page_end = addr + self.page_size

        current, cur_level, _table = self.pgt.lookup(addr)
        if current is not None and current[PTE_KIND] == LEAF:
            # A fault on a valid mapping: another CPU won the race (stale TLB): -EAGAIN.
            counters.spurious_faults += 1
            g = self.pgt.granule(cur_level)
            start = addr & ~(g - 1)
            return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.SPURIOUS,
                               range_start=start, range_end=start + g, level=cur_level)

        if self._from_empty_entry:
            found = self.adjust_range(addr, current, cur_level, rstart, rend)
            errno_name = "EPERM"
        else:
            found = self.find_range(addr, prot, rstart, rend)
            errno_name = "EEXIST"
        annotated = current is not None and current[PTE_KIND] == ANNOTATED
        if found is None and annotated and self.config.kernel.annotated_fault_injects_abort:
            # 7.x handle_host_mem_abort: -EPERM -> host_inject_mem_abort; EL2 survives and
            # nothing changes (the host kernel takes the abort).
            raise PermissionDenied(
                f"host access to {addr:#x}: annotated as not the host's; EL2 injects a data"
                " abort into the host (host_inject_mem_abort)", reason="HOST_ABORT_INJECTED")
        if found is None:
            counters.fatal_faults += 1
            owner = ("annotated as owned by hyp" if annotated
                     else "incompatible mappings at every level")
            return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.FATAL,
                               range_start=addr, range_end=page_end, level=3,
                               errno_name=errno_name,
                               reason=f"host access to {addr:#x}: {owner}; the real hypervisor"
                               " would panic (host touched hyp-owned memory)")
        level, start, end = found
        pool, may_recycle = self._fault_pools[is_mem]
        pte = leaf_pte(start >> self.page_shift, prot)
        mm = self.mm
        log: list[int] = []
        mm.log = log
        mm.alloc_pool = pool
        recycled = False
        recycled_pages = 0
        try:
            ret = self.pgt.map(start, end - start, pte)
            if ret == ENOMEM and may_recycle:
                recycled_pages = self.unmap_dev_all()
                recycled = True
                ret = self.pgt.map(start, end - start, pte)
        except RefcountLimit as err:
            # Counted by count_refcount_limit. On a first attempt nothing was written (the
            # check precedes the first write); on the retry the first attempt's edits stay.
            counters.fatal_faults += 1
            tables = self._live(log)
            partial = ""
            if recycled:
                partial = (f"; after -ENOMEM MMIO was recycled ({recycled_pages} table pages"
                           f" freed) and {tables} table page(s) this fault added remain")
            return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.FATAL,
                               range_start=addr, range_end=page_end, level=level,
                               recycled=recycled, recycled_pages=recycled_pages,
                               tables_allocated=tables, errno_name=None,
                               reason=f"{err.reason}: {err.message}{partial}")
        finally:
            mm.alloc_pool = self.mem_pool
            mm.log = None
        tables = self._live(log)
        if ret == OK:
            return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.MAPPED,
                               range_start=start, range_end=end, level=level,
                               recycled=recycled, recycled_pages=recycled_pages,
                               tables_allocated=tables)
        if ret == EAGAIN:
            counters.spurious_faults += 1
            return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.SPURIOUS,
                               range_start=start, range_end=end, level=level,
                               recycled=recycled, recycled_pages=recycled_pages,
                               tables_allocated=tables)
        assert ret == ENOMEM
        counters.map_failures += 1
        counters.fatal_faults += 1
        pool_name = pool.name
        return FaultResult(addr=addr, is_memory=is_mem, outcome=FaultOutcome.FATAL,
                           range_start=addr, range_end=page_end, level=level,
                           recycled=recycled, recycled_pages=recycled_pages,
                           tables_allocated=tables, errno_name="ENOMEM",
                           reason=f"pool {pool_name} has no page for a table"
                           + (" even after unmapping all MMIO" if recycled else "")
                           + f"; {tables} new table page(s) stay (3.5)"
                           + "; the real hypervisor would panic")

    def _live(self, log: list[int]) -> int:
        """Table pages allocated during a fault that are still in use (a page the recycle
        freed is not counted; one freed and allocated again counts once)."""
        return sum(1 for pfn in set(log) if self.mm.page_count(pfn) > 0)

    def find_range(
        self, addr: int, prot: int, rstart: int, rend: int
    ) -> tuple[int, int, int] | None:
        """The v5.13/v5.14 range search: (level, start, end) of the largest compatible block."""
        pgt = self.pgt

        def compatible(pte: Pte) -> bool:
            return pte[PTE_KIND] == LEAF and pte[PTE_PROT] == prot and pte[PTE_STATE] == STATE_OWNED

        for level in range(pgt.start_level, 4):
            if level < 3 and not pgt.block_allowed(level):
                continue
            g = pgt.granule(level)
            start = addr & ~(g - 1)
            end = start + g
            if start < rstart or end > rend:
                continue
            if pgt.range_compatible(start, end, compatible):
                return level, start, end
        return None

    def adjust_range(
        self, addr: int, current: Pte | None, level: int, rstart: int, rend: int
    ) -> tuple[int, int, int] | None:
        """The v6.x range search (host_stage2_adjust_range): (leaf level, start, end), or None
        for an annotated entry (-EPERM).

        From the level where the walk met the empty entry, take that level's granule around
        addr; stop when the next level supports blocks and the granule lies in the region, or
        at level 3. The kernel checks the NEXT level's block support against this level's
        granule, so a granule whose own level has no blocks (level 0; level 1 with 16K or
        64K pages) can be chosen: it is mapped with the next level's blocks.

        FIRST_FITTING_BLOCK (v6.16+, profiles.py) fixed that: the first level from there
        that supports blocks and whose granule lies in the region, else the page; the
        range is one block or page at that level."""
        if current is not None:
            return None
        pgt = self.pgt
        if self._range_search is HostRangeSearch.FIRST_FITTING_BLOCK:
            for lvl in range(level, 4):
                if not pgt.block_allowed(lvl):
                    continue
                g = pgt.granule(lvl)
                start = addr & ~(g - 1)
                if lvl == 3 or (rstart <= start and start + g <= rend):
                    return lvl, start, start + g
            raise AssertionError("level 3 always supports a (page) mapping")
        while True:
            g = pgt.granule(level)
            start = addr & ~(g - 1)
            end = start + g
            level += 1
            if level > 3 or (pgt.block_allowed(level) and rstart <= start and end <= rend):
                break
        chosen = level - 1
        leaf_level = chosen if chosen == 3 or pgt.block_allowed(chosen) else chosen + 1
        return leaf_level, start, end

    def unmap_dev_all(self) -> int:
        """host_stage2_unmap_dev_all: unmap every MMIO gap; returns table pages freed."""
        freed_before = self.mm.freed
        for start, end in self.mmio_gaps():
            self.pgt.unmap(start, end - start)
        freed = self.mm.freed - freed_before
        self.counters.mmio_recycles += 1
        self.counters.mmio_recycled_pages += freed
        return freed

    # -- ownership annotations (3.7, 4.4 donations) ------------------------------------------

    def mark_hyp(self, start: int, end: int) -> None:
        """__pkvm_mark_hyp at finalisation: [start, end) must lie in one memblock region.

        The kernel checks end - 1. With config.faithful_bugs, a profile whose record has
        `range_is_memory_off_by_one` (v5.13 before 5.13.12) tests the exclusive `end`, which
        refuses a range ending exactly at a region's end (3.7, open point 9). The fix was
        merged for v5.14 itself, so v5.14 and later never reproduce it.
        """
        off_by_one = self.config.faithful_bugs and self.config.kernel.range_is_memory_off_by_one
        last = end if off_by_one else end - 1
        mem_a, a_start, _ = self.find_mem_range(start)
        mem_b, b_start, _ = self.find_mem_range(last)
        if not (mem_a and mem_b and a_start == b_start):
            raise InvalidArgument(
                f"__pkvm_mark_hyp [{start:#x}, {end:#x}) is not inside one memblock region"
                + (" (v5.13 range_is_memory tests the exclusive end: faithful_bugs)"
                   if off_by_one else ""),
                reason="NOT_MEMORY",
            )
        self.mm.alloc_pool = self.mem_pool
        ret = self.pgt.map(start, end - start, annotation_pte(OWNER_HYP))  # no retry in v5.14
        if ret == ENOMEM:
            raise OutOfMemory("no host stage-2 page to annotate hyp memory",
                              reason="POOL_EXHAUSTED")

    def set_owner_pages(self, pfns: Sequence[int], owner_id: int) -> None:
        """host_stage2_set_owner_locked for donations (owner hyp) and their return (owner 0),
        page by page, all or nothing: planned first (`_prepare_page_maps`), so a refusal
        (RefcountLimit, or OutOfMemory even after an MMIO recycle) changes nothing. Callers
        check the page states first."""
        self._prepare_page_maps(pfns, leaf=owner_id != 0, what="annotate donated pages")
        pte = annotation_pte(owner_id)
        for q in pfns:
            ret = self.pgt.map(q << self.page_shift, self.page_size, pte)
            assert ret in (OK, EAGAIN), "planned annotation failed"

    def set_page_state(self, pfns: list[int], state: int) -> None:
        """Re-map host pages at page level as RWX with `state` (4.4 host_stage2_set_page_state).

        Planned first (`_prepare_page_maps`): the remaps cannot fail half-way (the kernel
        treats that as a BUG) and a refusal changes nothing.
        """
        self._prepare_page_maps(pfns, leaf=True, what="re-map pages")
        for q in pfns:
            ret = self.pgt.map(q << self.page_shift, self.page_size, leaf_pte(q, PROT_RWX, state))
            assert ret in (OK, EAGAIN), "pre-checked remap failed"

    def _prepare_page_maps(self, pfns: Sequence[int], *, leaf: bool, what: str) -> None:
        """Make sure page-level maps of `pfns` (pool host_s2 / host_s2_mem) cannot fail.

        Counts the table pages the maps need and the new entries per table page (existing
        and new ones) against the refcount limit. If the pool is short, host_stage2_try's
        remedy is evaluated first without writing (unmap_plan): MMIO is recycled only when
        the maps then fit, and the refcount check applies to the post-recycle tables. Raises
        RefcountLimit or OutOfMemory(POOL_EXHAUSTED) with nothing changed (in particular the
        MMIO mappings stay: a recycle that would not help is not done).
        """
        pgt = self.pgt
        self.mm.alloc_pool = self.mem_pool
        addrs = [q << self.page_shift for q in pfns]
        plan = pgt.plan_page_maps(addrs, leaf=leaf)
        free = self.mem_pool.free_pages
        if plan.tables <= free:
            pgt.check_plan(plan)
            return
        removed, freed = pgt.unmap_plan(self.mmio_gaps())
        gained = sum(1 for pfn in freed if self.mem_pool.contains(pfn))
        after = pgt.plan_page_maps(addrs, leaf=leaf, removed=removed)
        if after.tables > free + gained:
            raise OutOfMemory(
                f"cannot {what}: the host stage-2 pool has {free} free pages, the page-level"
                f" maps need {plan.tables} ({after.tables} after an MMIO recycle, which would"
                f" free {gained}); MMIO left mapped", reason="POOL_EXHAUSTED")
        pgt.check_plan(after, removed)
        self.unmap_dev_all()

    # -- states ------------------------------------------------------------------------------

    def host_state(self, pfn: int) -> PageState:
        """The host's state of a page (4.2): ZERO = OWNED (lazy idmap), annotated = NOPAGE."""
        pte, _level, _table = self.pgt.lookup(pfn << self.page_shift)
        if pte is None:
            return PageState.OWNED
        if pte[PTE_KIND] == ANNOTATED:
            return PageState.NOPAGE
        return _STATE_NAMES[pte[PTE_STATE]]

    def host_leaf(self, pfn: int) -> tuple[Pte | None, int]:
        pte, level, _table = self.pgt.lookup(pfn << self.page_shift)
        return pte, level

    # -- state (core/state_file.py) ------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """What a restore needs beyond the table pages themselves (simulated memory) and
        the pools: the PGD (a check: boot decides it), the counters, the mm_ops counts."""
        return {
            "pgd_pfns": list(self.pgt.pgd_pfns),
            "counters": asdict(self.counters),
            "tables_allocated": self.mm.allocated,
            "tables_freed": self.mm.freed,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take `state()`'s values over a freshly booted host stage-2; ValueError, with
        nothing changed, if the PGD or the set of counters is not this machine's."""
        if list(state["pgd_pfns"]) != self.pgt.pgd_pfns:
            raise ValueError("the host stage-2 PGD differs from the one this configuration"
                             " boots")
        counters = state["counters"]
        known = {f.name for f in fields(_Counters)}
        if set(counters) != known:
            raise ValueError(f"host stage-2 counters {sorted(counters)}, expected"
                             f" {sorted(known)}")
        self.counters = _Counters(**{name: int(value) for name, value in counters.items()})
        self.mm.allocated = int(state["tables_allocated"])
        self.mm.freed = int(state["tables_freed"])

    def statistics(self, pool_stats: list[PoolStatistics]) -> HostStage2Statistics:
        c = self.counters
        return HostStage2Statistics(
            faults_memory=c.faults_memory,
            faults_mmio=c.faults_mmio,
            spurious_faults=c.spurious_faults,
            fatal_faults=c.fatal_faults,
            mmio_recycles=c.mmio_recycles,
            mmio_recycled_pages=c.mmio_recycled_pages,
            map_failures=c.map_failures,
            table_pages=sum(s.allocated_pages for s in pool_stats),
            refcount_limit_hits=c.refcount_limit_hits,
        )

