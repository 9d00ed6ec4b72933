"""EL2's own stage-1 page table, as far as sharing and donation cost hyp pool pages.

When the host shares a page with hyp (`hyp_complete_share`) or donates one to it
(`hyp_complete_donation`, v6.2+), EL2 maps the page at its linear-map alias with
`pkvm_create_mappings_locked`, one page at a time (arch/arm64/kvm/hyp/nvhe/mm.c); a missing
table on the way down is taken from the hyp pool (`hpool`, order 0). Unsharing
(`hyp_complete_unshare`) and giving a donated page back (`__pkvm_hyp_donate_host`) unmap it
with `kvm_pgtable_hyp_unmap`, whose walker puts the leaf's table and, after the walk, frees
every table left with no entries (page_count 1) back to the hyp pool (6.1 and 6.12 alike:
arch/arm64/kvm/hyp/pgtable.c hyp_unmap_walker).

Model:
- Tables are keyed by (level, index of the hyp VA they cover). Profiles with a modelled boot
  (v6.1, v6.12: core/el2_boot.py) place pages at their linear alias (PA - memstart_addr in
  the upper half of the VA space) and know every boot mapping: the idmap, the vmemmap, the
  hyp sections, the carve-out, per-CPU areas, stacks, fixmap slots. Older profiles keep
  hyp VA = PA and know only the carve-out (mapped with blocks where it can be).
- Boot tables (`boot_tables`, the root included) were paid by the early allocator from the
  hyp pool's first pages (`early_pages`: hyp_pool_init reserves them) or, for the fixmap
  (v6.2+), taken from the hyp pool right after it started (`pool_boot_tables`). They hold
  boot leaves and are never freed. Every other table is an order-0 page of the hyp pool
  whose refcount is 1 + its valid entries, as in the kernel (mm_ops get_page per entry).
- Mapping is all or nothing here: the tables a batch needs are counted first, and a pool
  that cannot supply them refuses with -ENOMEM before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import preempt
from .el2_boot import BootMapping, HypVaLayout
from .errors import WouldPanic
from .hyp_pool import HypPool
from .state_values import IntsIn, put_list

HYP_VA_BITS = 48
LEAF_LEVEL = 3
Key = tuple[int, int]  # (level, index): the table of that level covering VA page index * span


class HypStage1:
    """EL2's stage-1 tables: those of the boot mappings, and those over host pages that hyp
    maps at run time (shared or donated)."""

    def __init__(self, page_shift: int, pool: HypPool | None = None,
                 boot_ranges: Iterable[tuple[int, int]] = (), *,
                 va_bits: int = HYP_VA_BITS, boot: Iterable[BootMapping] = (),
                 va_layout: HypVaLayout | None = None) -> None:
        """boot_ranges: [start_pfn, end_pfn) ranges EL2 mapped at boot at VA = PA with
        blocks allowed (profiles without a modelled boot: the carve-out); boot: the
        mappings of el2_boot.boot_mappings; va_layout: where a pfn's linear alias is
        (None: hyp VA = PA).
        Call `start(pool)` once the hyp pool exists if `pool` is not given."""
        self.page_shift = page_shift
        self.va_bits = va_bits
        self.va_layout = va_layout
        # A page's hyp VA page is its pfn plus this: linear_page(pfn << page_shift) is
        # (linear_base - memstart + (pfn << page_shift)) >> page_shift, and a whole number of
        # pages added under a floor division by the page size comes out whole.
        self._va_offset_pages = 0
        if va_layout is not None:
            assert va_layout.page_shift == page_shift
            self._va_offset_pages = va_layout.linear_page(0)
        bits = page_shift - 3
        # span_pages[level]: the pages one table of that level covers (levels -1 .. 3).
        self.span_pages = {lvl: 1 << (bits * (LEAF_LEVEL + 1 - lvl))
                           for lvl in range(-1, LEAF_LEVEL + 1)}
        # The root: the smallest table (highest level) that still spans the whole VA space.
        root = max(lvl for lvl in range(-1, LEAF_LEVEL + 1)
                   if (self.span_pages[lvl] << page_shift) >= 1 << va_bits)
        self.table_levels = tuple(range(root + 1, LEAF_LEVEL + 1))  # below the root
        # kvm_block_mapping_supported: level-1 blocks with 4K pages, level-2 otherwise.
        self.min_block_level = 1 if page_shift == 12 else 2
        self._boot: set[Key] = set()
        for start, end in boot_ranges:
            self._add_boot(BootMapping("boot", start, end - start, start, blocks=True))
        self._late_boot: list[BootMapping] = []
        modelled_boot = False
        for mapping in boot:
            modelled_boot = True
            if mapping.after_pool_init:
                self._late_boot.append(mapping)
            else:
                self._add_boot(mapping)
        # The early allocator's pages: the root + every boot table (only with a modelled boot).
        self.early_pages = 1 + len(self._boot) if modelled_boot else 0
        self.pool_boot_tables: dict[Key, int] = {}  # boot tables taken from the pool
        self._tables: dict[Key, int] = {}  # (level, index) -> table pfn (run time)
        self.mapped: set[int] = set()  # pfns hyp maps at their alias, outside boot mappings
        self.pool: HypPool
        if pool is not None:
            self.start(pool)

    def start(self, pool: HypPool) -> None:
        """After hyp_pool_init: the boot mappings made from the pool (the fixmap)."""
        self.pool = pool
        for mapping in self._late_boot:
            for key in self._mapping_keys(mapping):
                if key not in self._boot and key not in self.pool_boot_tables:
                    self.pool_boot_tables[key] = pool.alloc_pages(0)

    def _add_boot(self, mapping: BootMapping) -> None:
        self._boot.update(self._mapping_keys(mapping))

    def _mapping_keys(self, mapping: BootMapping) -> set[Key]:
        """The tables (below the root) a boot mapping needs. A table whose whole span the
        mapping covers, with VA and PA aligned alike, is not needed when the entry above it
        can hold a block (kvm_block_mapping_supported)."""
        keys: set[Key] = set()
        start, end = mapping.va_page, mapping.va_page + mapping.nr_pages
        for level in self.table_levels:
            span = self.span_pages[level]
            for index in range(start // span, -(-end // span)):
                lo, hi = index * span, (index + 1) * span
                if (mapping.blocks and mapping.pa_page is not None
                        and (mapping.pa_page - start) % span == 0
                        and start <= lo and hi <= end and level - 1 >= self.min_block_level):
                    continue
                keys.add((level, index))
        return keys

    @property
    def boot_tables(self) -> int:
        """Boot stage-1 table pages: the early allocator's and the pool's."""
        return self.early_pages + len(self.pool_boot_tables)

    def tables_by_level(self) -> dict[int, int]:
        """{level: table pages}, boot and run-time tables, the root included (with a
        modelled boot) at level min(table_levels) - 1."""
        counts: dict[int, int] = {}
        if self.early_pages:
            root = self.table_levels[0] - 1
            counts[root] = 1
        for level, _index in [*self._boot, *self.pool_boot_tables, *self._tables]:
            counts[level] = counts.get(level, 0) + 1
        return dict(sorted(counts.items()))

    def _path(self, pfn: int) -> list[Key]:
        va_page = pfn + self._va_offset_pages  # va_layout.linear_page(pfn << page_shift)
        return self._path_of_leaf(va_page // self.span_pages[LEAF_LEVEL])

    def _path_of_leaf(self, leaf_index: int) -> list[Key]:
        """The path of every page under the leaf table of that index: (level, VA page //
        span) per level, as each span is a whole number of leaf spans."""
        leaf_span = self.span_pages[LEAF_LEVEL]
        return [(level, leaf_index // (self.span_pages[level] // leaf_span))
                for level in self.table_levels]

    def _is_boot(self, key: Key) -> bool:
        return key in self._boot or key in self.pool_boot_tables

    def _missing(self, pfns: Iterable[int]) -> list[Key]:
        missing: dict[Key, None] = {}
        for pfn in pfns:
            for key in self._path(pfn):
                if not self._is_boot(key) and key not in self._tables:
                    missing[key] = None
        return list(missing)

    def missing_tables(self, pfns: Iterable[int]) -> list[Key]:
        """The tables, by key, that mapping these (unmapped) pages would take from the hyp
        pool, in the order mapping would allocate them (a plan: nothing changes)."""
        return self._missing(pfns)

    def table_at(self, key: Key) -> int | None:
        """The pfn of the run-time table `key`, None when there is none (or it is a boot
        table)."""
        return self._tables.get(key)

    @property
    def nr_tables(self) -> int:
        """Run-time table pages, those taken from the hyp pool and freed when empty."""
        return len(self._tables)

    def tables_needed(self, pfns: Iterable[int]) -> int:
        """Hyp pool pages that mapping these (unmapped) pages would take."""
        return len(self._missing(pfns))

    def check_can_map(self, pfns: list[int]) -> None:
        """WouldPanic (nothing changed) when the hyp pool cannot supply the tables: the
        kernel maps in hyp_complete_share / hyp_complete_donation under do_share's /
        do_donate's WARN_ON, and every WARN at EL2 is fatal (nvhe_hyp_panic_handler)."""
        need = self.tables_needed(pfns)
        if need > self.pool.free_pages:
            raise WouldPanic(
                f"EL2 needs {need} hyp stage-1 table page(s) to map the page(s), the hyp pool"
                f" has {self.pool.free_pages} free: EL2 would WARN (fatal)",
                reason="HYP_POOL_EXHAUSTED")

    def map_pages(self, pfns: list[int]) -> int:
        """pkvm_create_mappings_locked page by page; returns the tables allocated."""
        self.check_can_map(pfns)
        allocated = 0
        for pfn in pfns:
            assert pfn not in self.mapped, f"hyp already maps page {pfn:#x}"
            preempt.point()
            parent: int | None = None  # None: the root or a boot table (not counted)
            for key in self._path(pfn):
                table = self._tables.get(key)
                if table is None and not self._is_boot(key):
                    table = self.pool.alloc_pages(0)
                    self._tables[key] = table
                    allocated += 1
                    if parent is not None:
                        self.pool.get_page(parent)  # the new table entry
                parent = table
            if parent is not None:
                self.pool.get_page(parent)  # the leaf entry
            self.mapped.add(pfn)
        return allocated

    def unmap_pages(self, pfns: Iterable[int]) -> int:
        """kvm_pgtable_hyp_unmap page by page; returns the empty tables given back."""
        freed = 0
        for pfn in pfns:
            self.mapped.remove(pfn)
            preempt.point()
            # Walk back up: put the entry in each table, free the ones left empty.
            for key in reversed(self._path(pfn)):
                table = self._tables.get(key)
                if table is None:
                    break  # a boot table: kept, and so are its parents
                if self.pool.put_page(table) > 1:
                    break  # still holds other entries
                self.pool.put_page(table)  # refcount 1 -> 0: back to the hyp pool
                del self._tables[key]
                freed += 1
        return freed

    def table_pages(self) -> dict[int, tuple[int, int]]:
        """{table pfn: (level, valid entries)} of the tables taken from the hyp pool."""
        return {pfn: (key[0], self.pool.refcount(pfn) - 1) for key, pfn in self._tables.items()}

    def expected_entries(self) -> dict[int, int]:
        """{table pfn: entries it must hold} recomputed from the mapped pages (for audit)."""
        counts = dict.fromkeys(self._tables.values(), 0)
        # Pages per leaf table (by index): one integer division and a dict of ints per
        # mapped page; the paths (tuples) are built once per leaf table, not per page.
        leaf_span, offset = self.span_pages[LEAF_LEVEL], self._va_offset_pages
        pages_by_leaf: dict[int, int] = {}
        for pfn in self.mapped:
            leaf_index = (pfn + offset) // leaf_span
            pages_by_leaf[leaf_index] = pages_by_leaf.get(leaf_index, 0) + 1
        children: set[tuple[int, int]] = set()
        for leaf_index, pages in pages_by_leaf.items():
            path = self._path_of_leaf(leaf_index)
            leaf_table = self._tables.get(path[-1])
            if leaf_table is not None:
                counts[leaf_table] += pages
            for parent_key, child_key in zip(path, path[1:], strict=False):
                parent = self._tables.get(parent_key)
                if parent is not None and child_key in self._tables:
                    children.add(child_key)
        for child_key in children:
            level, index = child_key
            parent_level = level - 1
            parent_key = (parent_level,
                          index * self.span_pages[level] // self.span_pages[parent_level])
            parent = self._tables.get(parent_key)
            if parent is not None:
                counts[parent] += 1
        return counts

    def dump(self) -> list[tuple[int, int, int]]:
        """Sorted (level, index, pfn) of the allocated tables (canonical_dump)."""
        return sorted((level, index, pfn) for (level, index), pfn in self._tables.items())


    # -- state (core/state_file.py) ------------------------------------------------------------

    def state(self, out: list[int]) -> dict[str, object]:
        """The run-time tables (in creation order: their levels, indices, then pfns) and the
        pages hyp maps (sorted) appended to `out`; "va": "linear" when tables are keyed by hyp VA (a
        modelled boot)."""
        put_list(out, [level for level, _index in self._tables])
        put_list(out, [index for _level, index in self._tables])
        put_list(out, list(self._tables.values()))
        put_list(out, sorted(self.mapped))
        return {"va": "linear"} if self.va_layout is not None else {}

    @staticmethod
    def take_state(state: Mapping[str, Any], ints: IntsIn) -> dict[str, Any]:
        """A version-2 state (`state()`'s) as version 1 held it, what `restore` reads."""
        levels, indices, pfns = ints.take_list(), ints.take_list(), ints.take_list()
        tables = list(zip(levels, indices, pfns, strict=True))
        return {**state, "tables": tables, "mapped": ints.take_list()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take a saved state's tables and mapped pages (version 1's form), in place (the
        audit checks them against the hyp pool and the host's shares and donations)."""
        self._tables.clear()
        self._tables.update({(int(level), int(index)): int(pfn)
                             for level, index, pfn in state["tables"]})
        self.mapped.clear()
        self.mapped.update(int(pfn) for pfn in state["mapped"])
