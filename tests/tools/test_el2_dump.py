"""el2_dump on hand-built carve-outs: a stage-1 of known shape and a vmemmap of known
refcounts, laid out as divide_memory_pool does (vmemmap, VM table, hyp pool). The expected
figures are counted by hand from the tables written here."""

from __future__ import annotations

import pytest
from pkvm_sim.tools.el2_dump import (
    SW0_BIT,
    SW1_BIT,
    CarveoutLayout,
    DumpUnreadable,
    HypPageLayout,
    mapped_ranges,
    read_step,
)

PAGE = 4096
RAM_BASE = 0x4000_0000
RAM_BYTES = 1 << 30
CARVEOUT_BASE = 0x6000_0000
VALID_TABLE = 0b11  # valid, table (levels 0-2) / page (level 3)
VALID_BLOCK = 0b01  # valid, block (levels 1-2)
AF_RW = 1 << 10  # access flag; AP[2] clear: writable


def layout(*, all_memory: bool = True, pool_pages: int = 8) -> CarveoutLayout:
    return CarveoutLayout(
        base=CARVEOUT_BASE, size_bytes=(300 + pool_pages) * PAGE, page_size=PAGE,
        memblocks=((RAM_BASE, RAM_BYTES),), vmemmap_covers_all_memory=all_memory,
        vm_table_pages=1 if all_memory else 0, hyp_pool_pages=pool_pages,
    )


class Carveout:
    """A zeroed carve-out image with helpers to write descriptors and refcounts."""

    def __init__(self, lay: CarveoutLayout) -> None:
        self.lay = lay
        self.data = bytearray(lay.size_bytes)

    def pool_page(self, index: int) -> int:
        return self.lay.hyp_pool_base + index * PAGE

    def set_entry(self, table: int, index: int, descriptor: int) -> None:
        at = table - self.lay.base + 8 * index
        self.data[at: at + 8] = descriptor.to_bytes(8, "little")

    def set_refcount(self, phys: int, count: int, entry_index: int) -> None:
        """`entry_index`: the hyp_page's index in the vmemmap backing, reasoned by hand."""
        at = 4 * entry_index
        self.data[at: at + 2] = count.to_bytes(2, "little")


def build(lay: CarveoutLayout, entry_index_of: dict[int, int] | None = None) -> Carveout:
    """PGD (L0) -> L1 -> L2 -> L3 in the first four pool pages, 48-bit VA:
    VA 0x1000 -> PA 0x5000_0000 owned; VA 0x2000 -> PA 0x5000_1000 shared-borrowed;
    VA 0x3000 -> PA 0x5000_2000 shared-owned; VA 0x20_0000 (L2 entry 1) -> a 2 MiB block at
    PA 0x5020_0000, owned. Each table's refcount is 1 + its valid entries."""
    c = Carveout(lay)
    pgd, l1, l2, l3 = (c.pool_page(i) for i in range(4))
    c.set_entry(pgd, 0, l1 | VALID_TABLE)
    c.set_entry(l1, 0, l2 | VALID_TABLE)
    c.set_entry(l2, 0, l3 | VALID_TABLE)
    c.set_entry(l2, 1, 0x5020_0000 | AF_RW | VALID_BLOCK)
    c.set_entry(l3, 1, 0x5000_0000 | AF_RW | VALID_TABLE)
    c.set_entry(l3, 2, 0x5000_1000 | AF_RW | SW1_BIT | VALID_TABLE)
    c.set_entry(l3, 3, 0x5000_2000 | AF_RW | SW0_BIT | VALID_TABLE)
    for i, table in enumerate((pgd, l1, l2, l3)):
        entries = (1, 1, 2, 3)[i]
        index = (entry_index_of or {}).get(table, (table - RAM_BASE) // PAGE)
        c.set_refcount(table, entries + 1, index)
    return c


def test_figures_of_a_hand_built_stage1() -> None:
    lay = layout()
    # 1 GiB of RAM from 0x4000_0000: the vmemmap is 256 pages (4-byte entries), then the VM
    # table (1 page), so the pool (and the PGD) starts 257 pages into the carve-out.
    assert lay.vmemmap_pages == 256
    assert lay.hyp_pool_base == CARVEOUT_BASE + 257 * PAGE
    figures = read_step(bytes(build(lay).data), lay)
    assert figures.hyp_s1_table_pages == 4
    assert figures.hyp_pool_free_pages == 8 - 4
    assert figures.table_pages_by_level == {0: 1, 1: 1, 2: 1, 3: 1}
    assert figures.stage1.va_bits == 48
    states = figures.pages_by_state
    assert len(states["owned"]) == 1 + 512  # one page and one 2 MiB block
    assert states["shared-borrowed"] == {0x5000_1000}
    assert states["shared-owned"] == {0x5000_2000}


def test_the_v61_vmemmap_covers_only_the_carveout() -> None:
    lay = layout(all_memory=False)
    # 308 pages of carve-out x 4 bytes = 1232 bytes: one vmemmap page; no VM table.
    assert lay.vmemmap_pages == 1
    assert lay.hyp_pool_base == CARVEOUT_BASE + PAGE
    entry_index = {lay.hyp_pool_base + i * PAGE: 1 + i for i in range(4)}  # pfn - base pfn
    figures = read_step(bytes(build(lay, entry_index).data), lay)
    assert figures.hyp_s1_table_pages == 4


def test_a_pinned_pool_page_that_is_no_table_fails_the_self_check() -> None:
    lay = layout()
    c = build(lay)
    stray = c.pool_page(6)
    c.set_refcount(stray, 1, (stray - RAM_BASE) // PAGE)
    with pytest.raises(DumpUnreadable, match="self-check"):
        read_step(bytes(c.data), lay)


def test_a_table_outside_the_carveout_is_unreadable() -> None:
    lay = layout()
    c = build(lay)
    c.set_entry(c.pool_page(2), 5, 0x5555_0000 | VALID_TABLE)  # a 'table' in host memory
    with pytest.raises(DumpUnreadable):
        read_step(bytes(c.data), lay)


def test_a_dump_of_the_wrong_size_is_unreadable() -> None:
    lay = layout()
    with pytest.raises(DumpUnreadable, match="bytes"):
        read_step(bytes(lay.size_bytes - PAGE), lay)


def test_ranges_merge_contiguous_alike_leaves() -> None:
    lay = layout()
    c = build(lay)
    l3 = c.pool_page(3)
    c.set_entry(l3, 4, 0x5000_3000 | AF_RW | VALID_TABLE)  # VA 0x4000 and 0x5000: one range
    c.set_entry(l3, 5, 0x5000_4000 | AF_RW | VALID_TABLE)
    c.set_refcount(l3, 6, (l3 - RAM_BASE) // PAGE)
    ranges = mapped_ranges(read_step(bytes(c.data), lay).stage1, PAGE)
    spans = [(r.va_start, r.pages, r.state) for r in ranges]
    assert spans == [
        (0x1000, 1, "owned"), (0x2000, 1, "shared-borrowed"), (0x3000, 1, "shared-owned"),
        (0x4000, 2, "owned"), (0x20_0000, 512, "owned"),
    ]


def test_v6_16_page_states_come_from_the_hyp_page_not_the_software_bits() -> None:
    """From v6.16 EL2 maps pinned shared pages without software bits; its state is
    `__hyp_state_comp`, the high nibble of byte 3 of the 8-byte hyp_page, stored XOR 0b11
    (get_hyp_state in nvhe/memory.h). Here the walk finds three pages without software
    bits; their hyp_page says owned (comp 3), shared-borrowed (comp 1) and nothing written
    (comp 0: PKVM_NOPAGE, a page EL2 maps but holds no state for)."""
    lay = CarveoutLayout(
        base=CARVEOUT_BASE, size_bytes=(600 + 8) * PAGE, page_size=PAGE,
        memblocks=((RAM_BASE, RAM_BYTES),), vmemmap_covers_all_memory=True,
        vm_table_pages=1, hyp_pool_pages=8, hyp_page=HypPageLayout.of_entry_bytes(8),
    )
    assert lay.vmemmap_pages == 512  # 1 GiB of 4K pages x 8 bytes
    c = Carveout(lay)
    pgd, l1, l2, l3 = (c.pool_page(i) for i in range(4))
    for table, child in ((pgd, l1), (l1, l2), (l2, l3)):
        c.set_entry(table, 0, child | VALID_TABLE)
    pages = (0x5000_0000, 0x5000_1000, 0x5000_2000)
    for i, pa in enumerate(pages):
        c.set_entry(l3, 1 + i, pa | AF_RW | VALID_TABLE)

    def hyp_page(phys: int) -> int:
        return 8 * ((phys - RAM_BASE) // PAGE)  # the vmemmap slice starts at RAM_BASE's pfn

    for table, entries in ((pgd, 1), (l1, 1), (l2, 1), (l3, 3)):
        c.data[hyp_page(table): hyp_page(table) + 2] = (entries + 1).to_bytes(2, "little")
    c.data[hyp_page(pages[0]) + 3] = 0x3 << 4  # owned: 0 ^ 0b11
    c.data[hyp_page(pages[1]) + 3] = 0x1 << 4  # shared-borrowed: 0b10 ^ 0b11
    figures = read_step(bytes(c.data), lay)
    states = figures.pages_by_state
    assert states["owned"] == {pages[0]}
    assert states["shared-borrowed"] == {pages[1]}
    assert states["nopage"] == {pages[2]}
