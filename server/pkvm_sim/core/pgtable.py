"""A stage-2 page table whose table pages are pool pages (docs/stage2.md).

One instance is one `struct kvm_pgtable`: the host's (identity map, owner annotations) or a
guest's. Table pages live in simulated physical memory: each page's non-zero entries are a
dict {index: pte} stored with `PhysicalMemory.write`, so when the allocator zeroes a freed
page (HypPool._attach) its entries really disappear. A pte is a small tuple:

    (TABLE, child_pfn)                        valid, points to the next level's table page
    (LEAF, out_pfn, prot, state)              valid block/page mapping at out_pfn
    (ANNOTATED, owner_id)                     invalid but non-zero: "owned by owner_id"
    absent                                    ZERO: invalid, unowned

Refcount rule (3.2), true after every public call: for every table page, PGD pages included,

    refcount == 1 (the parent's / the allocation's reference) + number of non-zero entries

Installing a non-zero entry in a zero slot takes a reference on the page holding it; clearing
one drops it; a child table whose count is back to 1 during an unmap is unhooked and freed.

Geometry (4K pages, ia_bits 40: start level 1, two concatenated PGD pages):

    PGD page 0 [0, 512 GiB)   PGD page 1 [512 GiB, 1 TiB)      level 1: 1 GiB per entry
        entry 2 -> table (level 2, 2 MiB per entry) -> table (level 3, 4 KiB per entry)

The walkers here follow v5.13/v5.14 pgtable.c: a map stops at the first error and keeps what it
already did (-ENOMEM half-way leaves new, partly filled tables, which is harmless: mapping is
idempotent); a map over an identical leaf is -EAGAIN. The one condition the kernel would BUG
on, a table page's refcount at the hyp_page limit, is detected before anything changes
(`RefcountLimit`): with a single-range map that can only happen at the first zero slot filled
in an existing page, before any other write (the argument is spelled out in docs/stage2.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol, final

from . import preempt
from .errors import WouldPanic
from .layout import PageGeometry
from .physmem import PhysicalMemory

TABLE = 0
LEAF = 1
ANNOTATED = 2

Pte = tuple[int, ...]

# The fields of a pte tuple, by index. Named indices rather than a NamedTuple: on the walks
# (host faults read several ptes per level) `pte[PTE_KIND]` costs about 10% more than
# `pte[0]`, a NamedTuple attribute about 55% more (python 3.11, docs/stage2.md).
PTE_KIND = 0  # TABLE, LEAF or ANNOTATED
PTE_PFN = 1  # TABLE: the child table page; LEAF: the output pfn
PTE_OWNER = 1  # ANNOTATED: the owner id
PTE_PROT = 2  # LEAF: PROT_* bits
PTE_STATE = 3  # LEAF: STATE_* (the page state in the software bits)

# Stage-2 permissions (KVM_PGTABLE_PROT_*), and the page states (SW bits; docs/stage2.md).
PROT_R = 1
PROT_W = 2
PROT_X = 4
PROT_RW = PROT_R | PROT_W
PROT_RWX = PROT_R | PROT_W | PROT_X

STATE_OWNED = 0
STATE_SHARED_OWNED = 1
STATE_SHARED_BORROWED = 2

OWNER_HOST = 0  # owner id 0 = the host: the annotation is the ZERO pte
OWNER_HYP = 1

# Walk results (kernel errnos as negative ints, 0 = success).
OK = 0
EAGAIN = -11
ENOMEM = -12
_E2BIG = -7  # internal: "granule does not fit, go one level down"


class RefcountLimit(WouldPanic):
    """A table page's refcount would pass the hyp_page limit (A.1: layout 2 with 64K pages)."""

    default_reason = "REFCOUNT_OVERFLOW"


class MmOps(Protocol):
    """struct kvm_pgtable_mm_ops: where table pages come from and how they are counted."""

    def zalloc_page(self) -> int | None: ...

    def get_page(self, pfn: int) -> int: ...

    def put_page(self, pfn: int) -> int: ...

    def page_count(self, pfn: int) -> int: ...

    @property
    def refcount_max(self) -> int: ...


def pgd_geometry(geometry: PageGeometry, ia_bits: int) -> tuple[int, int]:
    """(start_level, concatenated PGD pages) for an IPA size (3.1)."""
    levels = min(4, max(2, (ia_bits - 8) // (geometry.page_shift - 3)))
    start_level = 4 - levels
    pgd_pages = ((1 << ia_bits) - 1 >> geometry.level_shift(start_level - 1)) + 1
    return start_level, pgd_pages


def leaf_pte(out_pfn: int, prot: int, state: int = STATE_OWNED) -> Pte:
    return (LEAF, out_pfn, prot, state)


def annotation_pte(owner_id: int) -> Pte | None:
    """kvm_init_invalid_leaf_owner: owner 0 (the host) is the ZERO pte."""
    return (ANNOTATED, owner_id) if owner_id else None


@final
class Mapping:
    """One non-table pte as seen by a walk: covers [start, end) at `level`; read-only.

    A plain class, not a frozen dataclass: walks (audit, teardown, dumps) build one per
    leaf, and a frozen dataclass's __init__ costs microseconds in the compiled core."""

    __slots__ = ("start", "end", "level", "pte")

    def __init__(self, start: int, end: int, level: int, pte: Pte) -> None:
        self.start: Final = start
        self.end: Final = end
        self.level: Final = level
        self.pte: Final = pte

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return (self.start, self.end, self.level, self.pte) == (
            other.start, other.end, other.level, other.pte)

    def __hash__(self) -> int:
        return hash((self.start, self.end, self.level, self.pte))

    def __repr__(self) -> str:
        return (f"Mapping(start={self.start!r}, end={self.end!r}, level={self.level!r},"
                f" pte={self.pte!r})")


@final
class LeafColumns:
    """The leaves of a walk (Stage2PageTable.leaf_columns), one list per field: leaf i maps
    [starts[i], starts[i] + granule(levels[i])) with ptes[i]."""

    __slots__ = ("starts", "levels", "ptes")

    def __init__(self) -> None:
        self.starts: Final[list[int]] = []
        self.levels: Final[list[int]] = []
        self.ptes: Final[list[Pte]] = []


@dataclass
class PageMapPlan:
    """What page-level maps of a set of pages would do (`Stage2PageTable.plan_page_maps`).

    `tables`: new table pages allocated; `existing`: table pfn -> entries installed in a zero
    slot of an existing table page; `fresh`: (level, base address) of each new table ->
    entries installed in it (its count starts at 1)."""

    tables: int = 0
    existing: dict[int, int] = field(default_factory=dict)
    fresh: dict[tuple[int, int], int] = field(default_factory=dict)


class _Walk:
    __slots__ = ("addr", "end", "pte", "phys_pfn")

    def __init__(self, addr: int, end: int, pte: Pte | None) -> None:
        self.addr = addr
        self.end = end
        self.pte = pte  # the leaf to install (out_pfn of the first granule for LEAF), or None
        self.phys_pfn = pte[PTE_PFN] if pte is not None and pte[PTE_KIND] == LEAF else None


class Stage2PageTable:
    """struct kvm_pgtable for a stage-2 of `ia_bits` bits with table pages from `mm_ops`."""

    def __init__(
        self,
        geometry: PageGeometry,
        ia_bits: int,
        physmem: PhysicalMemory,
        mm_ops: MmOps,
        pgd_pfns: list[int],
        on_refcount_limit: Callable[[], None] | None = None,
    ) -> None:
        """`on_refcount_limit` is called once for every RefcountLimit refusal (statistics)."""
        self.geometry = geometry
        self.on_refcount_limit = on_refcount_limit
        self.ia_bits = ia_bits
        self.physmem = physmem
        self.mm_ops = mm_ops
        self.start_level, nr_pgd = pgd_geometry(geometry, ia_bits)
        if len(pgd_pfns) != nr_pgd:
            raise ValueError(f"need {nr_pgd} PGD pages, got {len(pgd_pfns)}")
        self.pgd_pfns = list(pgd_pfns)
        self.ptrs = geometry.ptrs_per_table
        self.page_shift = geometry.page_shift
        self._shift = {lvl: geometry.level_shift(lvl) for lvl in range(-1, 5)}
        self.pgd_span = 1 << (self._shift[self.start_level] + self.page_shift - 3)
        self.ia_size = 1 << ia_bits

    # -- geometry helpers ---------------------------------------------------------------

    def granule(self, level: int) -> int:
        return 1 << self._shift[level]

    def block_allowed(self, level: int) -> bool:
        """kvm_level_supports_block_mapping: level 2, and level 1 with 4K pages only."""
        if level == 3:
            return True
        if level == 2:
            return True
        return level == 1 and self.page_shift == 12

    def _block_ok(self, addr: int, end: int, phys_pfn: int | None, level: int) -> bool:
        """kvm_block_mapping_supported: leaf allowed here and the aligned granule fits."""
        if not self.block_allowed(level):
            return False
        g = 1 << self._shift[level]
        if g > end - addr:
            return False
        if phys_pfn is not None and (phys_pfn << self.page_shift) & (g - 1):
            return False
        return addr & (g - 1) == 0

    def _index(self, addr: int, level: int) -> int:
        return (addr >> self._shift[level]) & (self.ptrs - 1)

    # -- entries in simulated memory ----------------------------------------------------

    def entries(self, table_pfn: int) -> dict[int, Pte]:
        """The non-zero entries of a table page (a live dict: do not mutate from outside)."""
        content = self.physmem.read(table_pfn)
        return content if isinstance(content, dict) else {}

    def _set(self, table_pfn: int, idx: int, pte: Pte | None) -> None:
        content = self.physmem.read(table_pfn)
        if pte is None:
            if isinstance(content, dict):
                content.pop(idx, None)
                if not content:
                    self.physmem.zero_range(table_pfn, 1)
            return
        if not isinstance(content, dict):
            content = {}
            self.physmem.write(table_pfn, content)
        content[idx] = pte

    def _check_room(self, table_pfn: int) -> None:
        """Pre-check for a get on table_pfn (the kernel would BUG at the limit)."""
        count = self.mm_ops.page_count(table_pfn)
        if count >= self.mm_ops.refcount_max:
            self._refuse(f"table page {table_pfn:#x} has refcount {count}: one more entry"
                         f" needs {count + 1}")

    def _refuse(self, what: str) -> None:
        """The one place a RefcountLimit is raised (and counted)."""
        if self.on_refcount_limit is not None:
            self.on_refcount_limit()
        raise RefcountLimit(f"{what} > the hyp_page limit {self.mm_ops.refcount_max}"
                            " (a full table page needs 1 + entries)")

    def _pgd_pages_for(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """(pgd page pfn, base address) of the PGD pages covering [start, end)."""
        span = self.pgd_span
        for i in range(start // span, (end - 1) // span + 1):
            yield self.pgd_pfns[i], i * span

    # -- lookup -------------------------------------------------------------------------

    def lookup(
        self, addr: int, removed: set[tuple[int, int]] | None = None
    ) -> tuple[Pte | None, int, int]:
        """(pte, level, table pfn) of the first non-table entry on addr's path; with
        `removed` ((table pfn, index) pairs, see unmap_plan), as if those were cleared."""
        span = self.pgd_span
        table = self.pgd_pfns[addr // span]
        level = self.start_level
        while True:
            idx = self._index(addr, level)
            pte = self.entries(table).get(idx)
            if removed and (table, idx) in removed:
                pte = None
            if pte is None or pte[PTE_KIND] != TABLE:
                return pte, level, table
            table = pte[PTE_PFN]
            level += 1

    # -- map (kvm_pgtable_stage2_map / set_owner, v5.13/v5.14 walker) ------------------------

    def map(self, addr: int, size: int, pte: Pte | None) -> int:
        """Install `pte` over [addr, addr + size) with the largest leaves that fit.

        For a LEAF, pte[PTE_PFN] is the output pfn of addr; it advances with each granule.
        Returns
        OK, EAGAIN (an identical leaf is already there: the walk stops), or ENOMEM (no table
        page: the walk stops, earlier edits stay). Raises RefcountLimit before any change.
        """
        end = addr + size
        if end > self.ia_size:
            raise ValueError(f"range {addr:#x}+{size:#x} beyond the IPA space")
        preempt.point()
        walk = _Walk(addr, end, pte)
        for pgd_pfn, _base in self._pgd_pages_for(addr, end):
            ret = self._map_table(pgd_pfn, self.start_level, walk)
            if ret:
                return ret
        return OK

    def _new_pte(self, walk: _Walk) -> Pte | None:
        pte = walk.pte
        if pte is not None and pte[PTE_KIND] == LEAF:
            assert walk.phys_pfn is not None
            return (LEAF, walk.phys_pfn, pte[PTE_PROT], pte[PTE_STATE])
        return pte

    def _map_table(self, table: int, level: int, walk: _Walk) -> int:
        g = 1 << self._shift[level]
        idx = self._index(walk.addr, level)
        while idx < self.ptrs and walk.addr < walk.end:
            old = self.entries(table).get(idx)
            if old is not None and old[PTE_KIND] == TABLE:
                if self._block_ok(walk.addr, walk.end, walk.phys_pfn, level):
                    ret = self._map_anchor(table, idx, level, old[PTE_PFN], walk)
                else:
                    ret = self._map_table(old[PTE_PFN], level + 1, walk)
            else:
                ret = self._try_leaf(table, idx, level, old, walk)
                if ret == _E2BIG:
                    ret = self._split(table, idx, level, old, walk)
            if ret:
                return ret
            idx += 1
        del g
        return OK

    def _advance(self, walk: _Walk, level: int) -> None:
        g = 1 << self._shift[level]
        walk.addr = (walk.addr & ~(g - 1)) + g
        if walk.phys_pfn is not None:
            walk.phys_pfn += g >> self.page_shift

    def _try_leaf(self, table: int, idx: int, level: int, old: Pte | None, walk: _Walk) -> int:
        """stage2_map_walker_try_leaf."""
        if not self._block_ok(walk.addr, walk.end, walk.phys_pfn, level):
            return _E2BIG
        new = self._new_pte(walk)
        mm = self.mm_ops
        if old is not None:
            if not _needs_update(old, new):
                return EAGAIN
            self._set(table, idx, None)
            mm.put_page(table)
        elif new is not None:
            self._check_room(table)
        if new is not None:
            self._set(table, idx, new)
            mm.get_page(table)
        self._advance(walk, level)
        return OK

    def _split(self, table: int, idx: int, level: int, old: Pte | None, walk: _Walk) -> int:
        """The granule does not fit: install a new table (replacing a block), descend."""
        assert level < 3
        mm = self.mm_ops
        if old is None:
            self._check_room(table)
        child = mm.zalloc_page()
        if child is None:
            return ENOMEM
        if old is not None:  # the rest of the old block is lost, re-faulted lazily
            self._set(table, idx, None)
            mm.put_page(table)
        self._set(table, idx, (TABLE, child))
        mm.get_page(table)
        return self._map_table(child, level + 1, walk)

    def _map_anchor(self, table: int, idx: int, level: int, child: int, walk: _Walk) -> int:
        """A whole table is replaced by one block: free the subtree, install the block.

        Net effect of the kernel's anchor: the TABLE pte is cleared, every counted pte below
        is put (freeing the subtree deepest-first, in address order), the block leaf is
        installed (get on this page), then the child is put and this page is put once for
        the TABLE entry that went away. This page's count ends where it started.
        """
        self._check_room(table)
        mm = self.mm_ops
        self._set(table, idx, None)
        self._put_subtree(child)
        new = self._new_pte(walk)
        if new is not None:
            self._set(table, idx, new)
            mm.get_page(table)
        mm.put_page(child)
        mm.put_page(table)
        self._advance(walk, level)
        return OK

    def _put_subtree(self, table: int) -> None:
        """Drop every counted entry below `table` (not `table`'s own reference)."""
        mm = self.mm_ops
        for idx in sorted(self.entries(table)):
            pte = self.entries(table).get(idx)
            if pte is None:
                continue
            if pte[PTE_KIND] == TABLE:
                self._put_subtree(pte[PTE_PFN])
                mm.put_page(pte[PTE_PFN])
            mm.put_page(table)

    # -- unmap (kvm_pgtable_stage2_unmap) ----------------------------------------------

    def unmap(self, addr: int, size: int) -> None:
        """Remove every leaf and annotation touching [addr, addr + size); free empty tables.

        A block only partly inside the range goes entirely. Tables are unhooked post-order
        when their count is back to 1 (no counted entries). Only puts: cannot fail.
        """
        end = min(addr + size, self.ia_size)
        if addr >= end:
            return
        preempt.point()
        for pgd_pfn, base in self._pgd_pages_for(addr, end):
            self._unmap_table(pgd_pfn, self.start_level, base, addr, end)

    def _slots_in(self, table: int, level: int, base: int, start: int, end: int
                  ) -> list[tuple[int, Pte, int]]:
        """(index, pte, address) of the table's non-zero entries that intersect [start, end),
        in address order; `base` is the address the table's entry 0 maps. A snapshot, so the
        caller may change the table while it iterates."""
        shift = self._shift[level]
        entries = self.entries(table)
        return [(idx, entries[idx], base + (idx << shift))
                for idx in self._indices_in(entries, shift, base, start, end)]

    def _indices_in(self, entries: dict[int, Pte], shift: int, base: int, start: int,
                    end: int) -> list[int]:
        """The indices of `entries` (a table whose entries map 2**shift bytes each from
        `base`) that intersect [start, end), in increasing order."""
        lo = max(0, (start - base) >> shift)
        hi = min(self.ptrs - 1, (end - 1 - base) >> shift)
        if hi - lo < len(entries):  # a narrow window on a full table: probe the window
            return [i for i in range(lo, hi + 1) if i in entries]
        if lo == 0 and hi == self.ptrs - 1:  # the whole table
            return sorted(entries)
        return sorted([i for i in entries if lo <= i <= hi])

    def _unmap_table(self, table: int, level: int, base: int, start: int, end: int) -> None:
        mm = self.mm_ops
        for idx, pte, at in self._slots_in(table, level, base, start, end):
            if pte[PTE_KIND] == TABLE:
                child = pte[PTE_PFN]
                self._unmap_table(child, level + 1, at, start, end)
                if mm.page_count(child) != 1:
                    continue
                self._set(table, idx, None)
                mm.put_page(table)
                mm.put_page(child)
            else:
                self._set(table, idx, None)
                mm.put_page(table)

    # -- read-only walks ---------------------------------------------------------------

    def mappings(self, start: int = 0, end: int | None = None) -> Iterator[Mapping]:
        """Every non-zero, non-table pte intersecting [start, end), in address order (all
        collected before the first is returned: one recursive walk that appends to lists,
        not a generator per table)."""
        leaves = self.leaf_columns(start, end)
        shift = self._shift
        return iter([Mapping(at, at + (1 << shift[level]), level, pte)
                     for at, level, pte in zip(leaves.starts, leaves.levels, leaves.ptes,
                                               strict=True)])

    def leaf_columns(self, start: int = 0, end: int | None = None) -> LeafColumns:
        """mappings() as columns: no object per leaf (the audit walks every leaf of every
        stage-2; a Mapping each is tens of thousands of objects for the collector)."""
        end = self.ia_size if end is None else end
        leaves = LeafColumns()
        for pgd_pfn, base in self._pgd_pages_for(start, end):
            self._collect_leaves(pgd_pfn, self.start_level, base, start, end, leaves)
        return leaves

    def _collect_leaves(self, table: int, level: int, base: int, start: int, end: int,
                        leaves: LeafColumns) -> None:
        shift = self._shift[level]
        entries = self.entries(table)  # read, not changed: no snapshot of (index, pte) pairs
        for idx in self._indices_in(entries, shift, base, start, end):
            pte = entries[idx]
            at = base + (idx << shift)
            if pte[PTE_KIND] == TABLE:
                self._collect_leaves(pte[PTE_PFN], level + 1, at, start, end, leaves)
            else:
                leaves.starts.append(at)
                leaves.levels.append(level)
                leaves.ptes.append(pte)

    def range_compatible(self, start: int, end: int, accept: Callable[[Pte], bool]) -> bool:
        """True when every non-zero leaf pte covering [start, end) satisfies `accept`.

        The walk of mappings(), stopping at the first refusal, without building a Mapping
        per leaf or a generator per table (the host fault path asks this for every level)."""
        for pgd_pfn, base in self._pgd_pages_for(start, end):
            if not self._leaves_accepted(pgd_pfn, self.start_level, base, start, end, accept):
                return False
        return True

    def _leaves_accepted(self, table: int, level: int, base: int, start: int, end: int,
                         accept: Callable[[Pte], bool]) -> bool:
        for _idx, pte, at in self._slots_in(table, level, base, start, end):
            if pte[PTE_KIND] == TABLE:
                if not self._leaves_accepted(pte[PTE_PFN], level + 1, at, start, end, accept):
                    return False
            elif not accept(pte):
                return False
        return True

    def table_pages(self) -> Iterator[tuple[int, int, int]]:
        """(pfn, level, number of non-zero entries) of every table page, PGD pages first."""
        stack = [(pfn, self.start_level) for pfn in reversed(self.pgd_pfns)]
        while stack:
            pfn, level = stack.pop()
            entries = self.entries(pfn)
            yield pfn, level, len(entries)
            for idx in sorted([i for i, pte in entries.items() if pte[PTE_KIND] == TABLE],
                              reverse=True):
                stack.append((entries[idx][PTE_PFN], level + 1))

    def tables_needed_for_page(self, addr: int, planned: set[tuple[int, int]]) -> int:
        """New table pages a page-level map of addr would allocate, not counting tables
        already in `planned` (keys (level, aligned address)); adds its own to `planned`."""
        _pte, level, _table = self.lookup(addr)
        new = 0
        for lvl in range(level + 1, 4):
            key = (lvl, addr & ~(self.granule(lvl - 1) - 1))
            if key not in planned:
                planned.add(key)
                new += 1
        return new

    def plan_page_maps(
        self, addrs: Iterable[int], *, leaf: bool,
        removed: set[tuple[int, int]] | None = None,
    ) -> PageMapPlan:
        """What map(addr, page_size, pte) for each addr in turn would install (read-only).

        `leaf`: the pte installed is non-zero (a leaf or an annotation; owner 0 installs
        nothing at level 3). A zero slot above level 3 gets a TABLE entry and new tables
        below it; a block there is replaced by a TABLE entry (no count change). `removed`
        plans against the state after an unmap (unmap_plan)."""
        plan = PageMapPlan()
        seen: set[tuple[int, int]] = set()  # slots (level, aligned address) already filled
        for addr in addrs:
            pte, level, table = self.lookup(addr, removed)
            if level == 3:
                if pte is None and leaf:
                    plan.existing[table] = plan.existing.get(table, 0) + 1
                continue
            slot = (level, addr & ~(self.granule(level) - 1))
            if slot not in seen:
                seen.add(slot)
                if pte is None:
                    plan.existing[table] = plan.existing.get(table, 0) + 1
            for lvl in range(level + 1, 4):
                key = (lvl, addr & ~(self.granule(lvl - 1) - 1))
                if key not in plan.fresh:
                    plan.fresh[key] = 0
                    plan.tables += 1
                if lvl < 3:
                    sub = (lvl, addr & ~(self.granule(lvl) - 1))
                    if sub in seen:
                        continue
                    seen.add(sub)
                elif not leaf:
                    continue
                plan.fresh[key] += 1
        return plan

    def check_plan(self, plan: PageMapPlan, removed: set[tuple[int, int]] | None = None) -> None:
        """RefcountLimit (counted) if a table page of `plan` would pass the limit."""
        limit = self.mm_ops.refcount_max
        gone: dict[int, int] = {}
        for table, _idx in removed or ():
            gone[table] = gone.get(table, 0) + 1
        for table, n in sorted(plan.existing.items()):
            count = self.mm_ops.page_count(table) - gone.get(table, 0)
            if count + n > limit:
                self._refuse(f"table page {table:#x} has refcount {count}: {n} more"
                             f" entries need {count + n}")
        for (level, base), n in sorted(plan.fresh.items()):
            if 1 + n > limit:
                self._refuse(f"a new level-{level} table page at {base:#x} would hold {n}"
                             f" entries: refcount {1 + n}")

    def unmap_plan(self, ranges: Iterable[tuple[int, int]]) -> tuple[set[tuple[int, int]],
                                                                      list[int]]:
        """What unmap(start, end - start) over each range in turn would do (read-only):
        the (table pfn, index) entries it would clear and the table pages it would free."""
        removed: set[tuple[int, int]] = set()
        freed: list[int] = []
        for start, end in ranges:
            end = min(end, self.ia_size)
            if start >= end:
                continue
            for pgd_pfn, base in self._pgd_pages_for(start, end):
                self._unmap_plan_table(pgd_pfn, self.start_level, base, start, end, removed,
                                       freed)
        return removed, freed

    def _unmap_plan_table(self, table: int, level: int, base: int, start: int, end: int,
                          removed: set[tuple[int, int]], freed: list[int]) -> None:
        """_unmap_table without writes (count == 1 <=> no entry left that is not removed)."""
        for idx, pte, at in self._slots_in(table, level, base, start, end):
            if (table, idx) in removed:
                continue
            if pte[PTE_KIND] == TABLE:
                child = pte[PTE_PFN]
                self._unmap_plan_table(child, level + 1, at, start, end, removed, freed)
                if any((child, i) not in removed for i in self.entries(child)):
                    continue
                freed.append(child)
            removed.add((table, idx))

    def check_refcounts(self) -> list[int]:
        """The table pages (pfns) that break the refcount rule; [] when all obey it."""
        return [
            pfn for pfn, _level, n in self.table_pages() if self.mm_ops.page_count(pfn) != 1 + n
        ]


def _needs_update(old: Pte, new: Pte | None) -> bool:
    """stage2_pte_needs_update: anything but a permission change on a valid leaf."""
    if new is None or old[PTE_KIND] != LEAF or new[PTE_KIND] != LEAF:
        return True
    return old[PTE_PFN] != new[PTE_PFN] or old[PTE_STATE] != new[PTE_STATE]
