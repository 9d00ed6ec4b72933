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
- hyp VA = PA (the real alias adds a constant whose low bits are zero, so which pages share a
  table is the same); a 48-bit VA space, so the root is level 0 with 4K and 16K pages and
  level 1 with 64K pages.
- Tables that exist from boot (those over the carve-out, which the early allocator paid for)
  are never allocated or freed here; every other table is an order-0 page of the hyp pool
  whose refcount is 1 + its valid entries, as in the kernel (mm_ops get_page per entry).
- Mapping is all or nothing here: the tables a batch needs are counted first, and a pool
  that cannot supply them refuses with -ENOMEM before anything changes.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import OutOfMemory
from .hyp_pool import HypPool

HYP_VA_BITS = 48
LEAF_LEVEL = 3


class HypStage1:
    """The hyp stage-1 tables over host pages that hyp maps (shared or donated)."""

    def __init__(self, page_shift: int, pool: HypPool,
                 boot_ranges: Iterable[tuple[int, int]]) -> None:
        """boot_ranges: [start_pfn, end_pfn) ranges EL2 mapped at boot (the carve-out)."""
        self.page_shift = page_shift
        self.pool = pool
        bits = page_shift - 3
        # span_pages[level]: the pages one table of that level covers.
        self.span_pages = {lvl: 1 << (bits * (LEAF_LEVEL + 1 - lvl))
                           for lvl in range(LEAF_LEVEL + 1)}
        # The root: the smallest table (highest level) that still spans the whole VA space.
        root = max(lvl for lvl in range(LEAF_LEVEL + 1)
                   if (self.span_pages[lvl] << page_shift) >= 1 << HYP_VA_BITS)
        self.table_levels = tuple(range(root + 1, LEAF_LEVEL + 1))  # below the root
        min_block_level = 1 if page_shift == 12 else 2  # kvm_block_mapping_supported
        self._boot: set[tuple[int, int]] = set()
        for start, end in boot_ranges:
            self._mark_boot_tables(start, end, min_block_level)
        self._tables: dict[tuple[int, int], int] = {}  # (level, index) -> table pfn
        self.mapped: set[int] = set()  # pfns hyp maps at their alias, outside boot mappings

    def _mark_boot_tables(self, start: int, end: int, min_block_level: int) -> None:
        for level in self.table_levels:
            span = self.span_pages[level]
            for index in range(start // span, -(-end // span)):
                lo, hi = index * span, (index + 1) * span
                # A chunk the range covers whole is one block of the level above: no table.
                if start <= lo and hi <= end and level - 1 >= min_block_level:
                    continue
                self._boot.add((level, index))

    def _path(self, pfn: int) -> list[tuple[int, int]]:
        return [(level, pfn // self.span_pages[level]) for level in self.table_levels]

    def _missing(self, pfns: Iterable[int]) -> list[tuple[int, int]]:
        missing: dict[tuple[int, int], None] = {}
        for pfn in pfns:
            for key in self._path(pfn):
                if key not in self._boot and key not in self._tables:
                    missing[key] = None
        return list(missing)

    def tables_needed(self, pfns: Iterable[int]) -> int:
        """Hyp pool pages that mapping these (unmapped) pages would take."""
        return len(self._missing(pfns))

    def check_can_map(self, pfns: list[int]) -> None:
        """-ENOMEM (nothing changed) when the hyp pool cannot supply the tables."""
        need = self.tables_needed(pfns)
        if need > self.pool.free_pages:
            raise OutOfMemory(
                f"EL2 needs {need} hyp stage-1 table page(s) to map the page(s), the hyp pool"
                f" has {self.pool.free_pages} free", reason="HYP_POOL_EXHAUSTED")

    def map_pages(self, pfns: list[int]) -> int:
        """pkvm_create_mappings_locked page by page; returns the tables allocated."""
        self.check_can_map(pfns)
        allocated = 0
        for pfn in pfns:
            assert pfn not in self.mapped, f"hyp already maps page {pfn:#x}"
            parent: int | None = None  # None: the root or a boot table (not counted)
            for key in self._path(pfn):
                table = self._tables.get(key)
                if table is None and key not in self._boot:
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
        children: set[tuple[int, int]] = set()
        for pfn in self.mapped:
            path = self._path(pfn)
            leaf_table = self._tables.get(path[-1])
            if leaf_table is not None:
                counts[leaf_table] += 1
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
