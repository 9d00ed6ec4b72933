"""Read EL2's memory from a dump of the pKVM carve-out (QEMU `pmemsave`).

The carve-out (`kvm [0]: Reserved N MiB at 0xBASE`) is cut by `divide_memory_pool`
(arch/arm64/kvm/hyp/nvhe/setup.c) into, in this order: the hyp vmemmap (`struct hyp_page` of
each page: the whole of memory since v6.2 (`hyp_back_vmemmap`, one slice per memblock), only
the carve-out in v6.1 (`hyp_vmemmap_range`)), the VM table (v6.2+, `hyp_vm_table_pages`),
then the hyp pool region (`hyp_s1_pgtable_pages`), whose first page is EL2's stage-1 PGD
(`kvm_pgtable_hyp_init` in `recreate_hyp_mappings` takes the early allocator's first page),
then the host stage-2 pool and the FF-A proxy pages.

From one dump this module returns the hyp pool's free pages (refcount 0 in the vmemmap), the
stage-1 table pages (a walk from the PGD), and each mapped leaf page by its software bits
(`pkvm_mkstate`: OWNED = none, SHARED_OWNED = SW0 bit 55, SHARED_BORROWED = SW1 bit 56; from
v6.16 the state is in the page's 8-byte `hyp_page` instead, `__hyp_state_comp`, and read
there: `hyp_states`).
Self-check: the pool pages with a refcount > 0 are exactly the stage-1 table pages (every
table page is pinned by its entries, `hyp_page_ref_inc` in the kvm_pgtable mm_ops, and the
hyp pool gives pages to nothing else). When it fails the dump is reported as unreadable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

SW0_BIT = 1 << 55  # KVM_PGTABLE_PROT_SW0
SW1_BIT = 1 << 56  # KVM_PGTABLE_PROT_SW1
STATE_NAMES = {0: "owned", SW0_BIT: "shared-owned", SW1_BIT: "shared-borrowed",
               SW0_BIT | SW1_BIT: "reserved"}
# pkvm_page_state (nvhe/memory.h) as get_hyp_state() decodes __hyp_state_comp (XOR with
# PKVM_PAGE_STATE_VMEMMAP_MASK, so a zeroed vmemmap reads PKVM_NOPAGE)
_VMEMMAP_STATE_MASK = 0b11
VMEMMAP_STATE_NAMES = {0: "owned", 1: "shared-owned", 2: "shared-borrowed", 3: "nopage"}
_OA_MASK = (1 << 48) - 1  # output address bits [47:page_shift]; RAM here is below 2^48
_AP_RO_BIT = 1 << 7  # AP[2]: read-only
_XN_BIT = 1 << 54  # XN (EL2 stage-1 of nVHE) / UXN (hVHE)
_PXN_BIT = 1 << 53  # PXN (hVHE)


class DumpUnreadable(ValueError):
    """The dump does not look like the layout it was read with (the self-check failed)."""


@dataclass(frozen=True)
class HypPageLayout:
    """`struct hyp_page` of a kernel version: its size and where the refcount sits."""

    entry_bytes: int = 4  # v6.1 and v6.12: unsigned short refcount; unsigned short order
    refcount_offset: int = 0
    refcount_bytes: int = 2
    # v6.16+: the byte whose high nibble is __hyp_state_comp (u16 refcount, u8 order, then
    # __host_state : 4 and __hyp_state_comp : 4, then u32 host_share_guest_count). EL2's page
    # state lives there, not in the stage-1 software bits. None: read the software bits.
    hyp_state_byte: int | None = None

    @classmethod
    def of_entry_bytes(cls, entry_bytes: int) -> HypPageLayout:
        """The layout of a kernel whose struct hyp_page has `entry_bytes` (8: v6.16+)."""
        return cls(entry_bytes=entry_bytes, hyp_state_byte=3 if entry_bytes == 8 else None)


@dataclass(frozen=True)
class CarveoutLayout:
    """Where things are in the carve-out, as `divide_memory_pool` cut it."""

    base: int  # physical address of the carve-out
    size_bytes: int
    page_size: int
    memblocks: tuple[tuple[int, int], ...]  # (base, size) of each RAM region
    vmemmap_covers_all_memory: bool  # v6.2+: yes; v6.1: only the carve-out
    vm_table_pages: int
    hyp_pool_pages: int  # hyp_s1_pgtable_pages()
    hyp_page: HypPageLayout = HypPageLayout()

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def vmemmap_pages(self) -> int:
        """The pages divide_memory_pool takes first for the vmemmap (v6.2+
        `hyp_vmemmap_pages`: each memblock's slice rounded out to pages; v6.1
        `hyp_vmemmap_range` of the carve-out)."""
        entry = self.hyp_page.entry_bytes
        if not self.vmemmap_covers_all_memory:
            return self._slice_pages(self.base, self.size_bytes, entry)
        return sum(self._slice_pages(base, size, entry) for base, size in self.memblocks)

    def _slice_pages(self, base: int, size: int, entry: int) -> int:
        start = _align_down((base >> self.page_shift) * entry, self.page_size)
        end = _align_up(((base + size) >> self.page_shift) * entry, self.page_size)
        return (end - start) // self.page_size

    @property
    def hyp_pool_base(self) -> int:
        return self.base + (self.vmemmap_pages + self.vm_table_pages) * self.page_size

    def vmemmap_offset(self, phys: int) -> int:
        """Byte offset in the carve-out of the `struct hyp_page` of page `phys`."""
        entry = self.hyp_page.entry_bytes
        pfn = phys >> self.page_shift
        if not self.vmemmap_covers_all_memory:  # v6.1: hyp_vmemmap_range(carve-out)
            first = (self.base >> self.page_shift) * entry
            return pfn * entry - _align_down(first, self.page_size)
        back = 0  # v6.2+ hyp_back_vmemmap: one backed slice per memblock, back to back
        end = 0
        for base, size in self.memblocks:
            start = max(_align_down((base >> self.page_shift) * entry, self.page_size), end)
            end = _align_up(((base + size) >> self.page_shift) * entry, self.page_size)
            if base <= phys < base + size:
                return back + pfn * entry - start
            if start < end:
                back += end - start
        raise ValueError(f"{phys:#x} is in no memblock")


def _align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def _align_up(value: int, alignment: int) -> int:
    return _align_down(value + alignment - 1, alignment)


@dataclass(frozen=True)
class Leaf:
    """One valid leaf descriptor: `pages` pages from `va` -> `pa`."""

    va: int
    pa: int
    pages: int
    level: int
    descriptor: int
    tables: tuple[int, ...]  # PAs of the table pages on the walk, PGD first

    @property
    def state(self) -> str:
        return STATE_NAMES[self.descriptor & (SW0_BIT | SW1_BIT)]

    @property
    def perms(self) -> str:
        writable = not self.descriptor & _AP_RO_BIT
        executable = not self.descriptor & (_XN_BIT | _PXN_BIT)
        return "R" + ("W" if writable else "-") + ("X" if executable else "-")

    @property
    def attr_index(self) -> int:
        return (self.descriptor >> 2) & 7  # AttrIndx: MT_NORMAL, MT_DEVICE_nGnRE...


@dataclass
class Stage1:
    """A walk of EL2's stage-1: its table pages (by level) and its leaves, in VA order."""

    start_level: int
    va_bits: int
    page_size: int
    table_levels: dict[int, int] = field(default_factory=dict)  # table PA -> its level
    leaves: list[Leaf] = field(default_factory=list)

    def pages_by_state(self) -> dict[str, set[int]]:
        """Physical pages mapped, per state (a page mapped twice is counted once)."""
        states: dict[str, set[int]] = {name: set() for name in STATE_NAMES.values()}
        for leaf in self.leaves:
            states[leaf.state].update(leaf.pa + i * self.page_size for i in range(leaf.pages))
        return states


@dataclass
class StepFigures:
    """What one dump shows."""

    hyp_pool_pages: int
    hyp_pool_free_pages: int
    hyp_s1_table_pages: int
    table_pages_by_level: dict[int, int]
    pages_by_state: dict[str, set[int]] = field(repr=False)
    stage1: Stage1 = field(repr=False)


def walk_stage1(dump: bytes, layout: CarveoutLayout, va_bits: int) -> Stage1:
    """Walk the hyp stage-1 from the PGD (the first page of the hyp pool region)."""
    shift = layout.page_shift
    bits_per_level = shift - 3
    levels = -(-(va_bits - shift) // bits_per_level)
    start_level = 4 - levels
    stage1 = Stage1(start_level, va_bits, layout.page_size)
    _walk(dump, layout, layout.hyp_pool_base, start_level, 0, va_bits, (), stage1)
    return stage1


def _walk(dump: bytes, layout: CarveoutLayout, table: int, level: int, va_base: int,
          va_bits: int, path: tuple[int, ...], stage1: Stage1) -> None:
    shift = layout.page_shift
    bits_per_level = shift - 3
    level_shift = shift + (3 - level) * bits_per_level
    entries = 1 << min(bits_per_level, va_bits - level_shift)
    if table in stage1.table_levels:
        raise DumpUnreadable(f"table {table:#x} is reached twice")
    if not layout.base <= table < layout.base + layout.size_bytes:
        raise DumpUnreadable(f"level {level} table at {table:#x} is outside the carve-out")
    stage1.table_levels[table] = level
    path = (*path, table)
    offset = table - layout.base
    for index in range(entries):
        raw = dump[offset + 8 * index: offset + 8 * index + 8]
        descriptor = int.from_bytes(raw, "little")
        if not descriptor & 1:
            continue
        va = va_base | (index << level_shift)
        address = descriptor & _OA_MASK & ~((1 << shift) - 1)
        if level < 3 and descriptor & 2:
            _walk(dump, layout, address, level + 1, va, va_bits, path, stage1)
        elif level == 3 and not descriptor & 2:
            raise DumpUnreadable(f"reserved level-3 descriptor {descriptor:#x} at {va:#x}")
        else:
            pages = 1 << (level_shift - shift)
            stage1.leaves.append(Leaf(va, address, pages, level, descriptor, path))


def refcounts(dump: bytes, layout: CarveoutLayout, first_page: int, nr_pages: int
              ) -> list[int]:
    """The `hyp_page` refcounts of `nr_pages` pages from physical `first_page`."""
    entry = layout.hyp_page
    counts = []
    for i in range(nr_pages):
        at = layout.vmemmap_offset(first_page + i * layout.page_size) + entry.refcount_offset
        counts.append(int.from_bytes(dump[at: at + entry.refcount_bytes], "little"))
    return counts


def hyp_states(dump: bytes, layout: CarveoutLayout, pages: set[int]) -> dict[str, set[int]]:
    """v6.16+: EL2's state of each page, from `__hyp_state_comp` in its `hyp_page`
    (hyp_page_state in nvhe/mem_protect.c): the stage-1 software bits are no longer set, so
    a pinned shared page and a donated one look alike in the walk."""
    byte = layout.hyp_page.hyp_state_byte
    assert byte is not None
    states: dict[str, set[int]] = {name: set() for name in STATE_NAMES.values()}
    states["nopage"] = set()
    for page in pages:
        at = layout.vmemmap_offset(page) + byte
        comp = dump[at] >> 4
        states[VMEMMAP_STATE_NAMES[(comp ^ _VMEMMAP_STATE_MASK) & _VMEMMAP_STATE_MASK]].add(page)
    return states


def _pages_by_state(dump: bytes, layout: CarveoutLayout, stage1: Stage1) -> dict[str, set[int]]:
    """Mapped pages by EL2's state: the software bits (up to v6.15) or the vmemmap (v6.16+;
    a mapped page outside memory, e.g. the idmap of an image out of the memblocks, keeps its
    software-bit state)."""
    by_bits = stage1.pages_by_state()
    if layout.hyp_page.hyp_state_byte is None:
        return by_bits
    mapped = set().union(*by_bits.values())
    in_memory = {p for p in mapped
                 if any(b <= p < b + size for b, size in layout.memblocks)}
    states = hyp_states(dump, layout, in_memory)
    for name, pages in by_bits.items():
        states[name] |= pages - in_memory
    return states


def read_step(dump: bytes, layout: CarveoutLayout,
              va_bits_candidates: Sequence[int] = (48, 52, 47, 42, 39)) -> StepFigures:
    """The figures of one dump; DumpUnreadable when no walk passes the self-check."""
    if len(dump) != layout.size_bytes:
        raise DumpUnreadable(f"dump is {len(dump)} bytes, the carve-out {layout.size_bytes}")
    pool_base = layout.hyp_pool_base
    counts = refcounts(dump, layout, pool_base, layout.hyp_pool_pages)
    pinned = {pool_base + i * layout.page_size for i, count in enumerate(counts) if count}
    reasons = []
    for va_bits in va_bits_candidates:
        try:
            stage1 = walk_stage1(dump, layout, va_bits)
        except DumpUnreadable as error:
            reasons.append(f"{va_bits}-bit VA: {error}")
            continue
        tables = set(stage1.table_levels)
        if tables != pinned:
            reasons.append(f"{va_bits}-bit VA: {len(tables)} table pages, {len(pinned)} "
                           f"pool pages with refcount > 0, {len(tables ^ pinned)} differ")
            continue
        by_level: dict[int, int] = {}
        for level in stage1.table_levels.values():
            by_level[level] = by_level.get(level, 0) + 1
        return StepFigures(
            hyp_pool_pages=layout.hyp_pool_pages,
            hyp_pool_free_pages=layout.hyp_pool_pages - len(pinned),
            hyp_s1_table_pages=len(tables), table_pages_by_level=dict(sorted(by_level.items())),
            pages_by_state=_pages_by_state(dump, layout, stage1), stage1=stage1,
        )
    raise DumpUnreadable("self-check failed: " + "; ".join(reasons))


@dataclass(frozen=True)
class MappedRange:
    """Leaves that follow each other in VA and PA with the same attributes."""

    va_start: int
    va_end: int
    pa_start: int
    pages: int
    state: str
    perms: str
    attr_index: int
    leaf_level: int
    last_level_tables: tuple[int, ...]  # the PAs of the tables holding the leaves


def mapped_ranges(stage1: Stage1, page_size: int) -> list[MappedRange]:
    """The stage-1 as ranges VA -> PA, merged where contiguous and alike."""
    ranges: list[MappedRange] = []
    for leaf in stage1.leaves:
        size = leaf.pages * page_size
        last = ranges[-1] if ranges else None
        if (last is not None and last.va_end == leaf.va
                and last.pa_start + last.pages * page_size == leaf.pa
                and (last.state, last.perms, last.attr_index, last.leaf_level)
                == (leaf.state, leaf.perms, leaf.attr_index, leaf.level)):
            tables = last.last_level_tables
            if tables[-1] != leaf.tables[-1]:
                tables = (*tables, leaf.tables[-1])
            ranges[-1] = MappedRange(last.va_start, leaf.va + size, last.pa_start,
                                     last.pages + leaf.pages, last.state, last.perms,
                                     last.attr_index, last.leaf_level, tables)
        else:
            ranges.append(MappedRange(leaf.va, leaf.va + size, leaf.pa, leaf.pages,
                                      leaf.state, leaf.perms, leaf.attr_index, leaf.level,
                                      (leaf.tables[-1],)))
    return ranges


def render_ranges(ranges: Sequence[MappedRange], layout: CarveoutLayout) -> Iterator[str]:
    """One line per range: VA start-end -> PA, pages, state, permissions, where it lies."""
    yield (f"{'VA start':>18} {'VA end':>18}  {'PA':>12} {'pages':>6}  {'state':<15} perm "
           "attr lvl  PA region / tables holding the leaves")
    end = layout.base + layout.size_bytes
    for r in ranges:
        where = "carve-out" if layout.base <= r.pa_start < end else "outside carve-out"
        tables = ",".join(f"{t:#x}" for t in r.last_level_tables[:4])
        if len(r.last_level_tables) > 4:
            tables += f",... ({len(r.last_level_tables)} tables)"
        yield (f"{r.va_start:#018x} {r.va_end:#018x}  {r.pa_start:#012x} {r.pages:>6}  "
               f"{r.state:<15} {r.perms}  {r.attr_index:>3}  {r.leaf_level:>2}  {where}; "
               f"{tables}")
