"""The vmemmap's storage: chunks allocated on first write, honest memory figures, bulk
export/import in the layouts' own items.

Expected values come from the layouts' sizes and packing (layout.py, the kernel's struct
hyp_page), from the chunk geometry (an allocated chunk is CHUNK_ENTRIES 8-byte items) and
from what the Python allocator reports (tracemalloc).
"""

from __future__ import annotations

import tracemalloc
from array import array

import pytest
from pkvm_sim.core.errors import WouldPanic
from pkvm_sim.core.layout import LAYOUT_2, LAYOUT_4, LAYOUT_32, HypPageLayout
from pkvm_sim.core.vmemmap import CHUNK_ENTRIES, Vmemmap

TIB_4K_PAGES = 1 << 28  # 1 TiB of 4 KiB pages
BASE_PFN = 0x80000


def test_a_1tib_vmemmap_allocates_only_the_chunks_written() -> None:
    vmemmap = Vmemmap(LAYOUT_4, [(BASE_PFN, TIB_4K_PAGES)])
    assert vmemmap.modelled_bytes == 4 * TIB_4K_PAGES  # what EL2 spends: 1 GiB
    assert vmemmap.stored_bytes == 8 * TIB_4K_PAGES  # one i64 per entry, all chunks allocated
    slots_bytes = 8 * (TIB_4K_PAGES // CHUNK_ENTRIES)  # one pointer per chunk: 512 KiB
    assert vmemmap.resident_bytes == slots_bytes  # nothing written: the chunk list only
    far = BASE_PFN + TIB_4K_PAGES - 1
    vmemmap.set_entry(far, refcount=3, order=2)
    vmemmap.set_entry(far - 1, refcount=1, order=0)  # the same chunk
    assert vmemmap.resident_bytes == slots_bytes + 8 * CHUNK_ENTRIES  # one chunk allocated
    assert vmemmap.refcount(far) == 3 and vmemmap.order(far) == 2
    assert vmemmap.entry(BASE_PFN + TIB_4K_PAGES // 2) == 0  # never written: reads as zero


def test_resident_bytes_is_what_the_host_allocator_handed_out() -> None:
    """Chunks are allocated on the Python heap: tracemalloc sees what they really take."""
    vmemmap = Vmemmap(LAYOUT_4, [(BASE_PFN, TIB_4K_PAGES)])
    tracemalloc.start()
    try:
        before, reported = tracemalloc.get_traced_memory()[0], vmemmap.resident_bytes
        for i in range(64):  # 64 chunks, one entry each
            vmemmap.set_entry(BASE_PFN + i * 1_000_003, refcount=1)
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    grown = vmemmap.resident_bytes - reported
    assert grown == 64 * 8 * CHUNK_ENTRIES
    assert grown <= traced <= grown + 64 * 1024  # a little allocator and object overhead


@pytest.mark.parametrize("layout", [LAYOUT_32, LAYOUT_4, LAYOUT_2], ids=lambda lay: lay.name)
def test_entries_read_as_zero_and_hold_the_widest_values(layout: HypPageLayout) -> None:
    vmemmap = Vmemmap(layout, [(16, 64)])
    assert all(vmemmap.entry(pfn) == 0 for pfn in range(16, 80))
    vmemmap.set_entry(17, refcount=layout.refcount_max, order=layout.no_order)
    assert vmemmap.refcount(17) == layout.refcount_max
    assert vmemmap.order(17) == layout.no_order
    with pytest.raises(ValueError):
        vmemmap.set_entry(18, refcount=layout.refcount_max + 1)
    assert vmemmap.entry(18) == 0  # the refused write changed nothing


def test_uncovered_pfns_fault() -> None:
    vmemmap = Vmemmap(LAYOUT_4, [(16, 16), (64, 16)])
    assert [seg.base_pfn for seg in vmemmap.segments] == [16, 64]
    for pfn in (15, 32, 63, 80):
        with pytest.raises(WouldPanic):
            vmemmap.entry(pfn)


def test_export_is_little_endian_and_import_restores_it() -> None:
    vmemmap = Vmemmap(LAYOUT_4, [(0, 8)])
    vmemmap.set_entry(1, refcount=2, order=1)  # 1 << 16 | 2
    blob = vmemmap.segments[0].export_bytes()
    assert len(blob) == 8 * 4
    assert blob[4:8] == ((1 << 16) | 2).to_bytes(4, "little")
    assert blob[:4] == bytes(4) and blob[8:] == bytes(24)
    other = Vmemmap(LAYOUT_4, [(0, 8)])
    other.segments[0].import_bytes(blob)
    assert [other.entry(pfn) for pfn in range(8)] == [vmemmap.entry(pfn) for pfn in range(8)]
    with pytest.raises(ValueError):
        other.segments[0].import_bytes(blob[:-4])


def test_the_machine_comparison_sees_a_changed_vmemmap_entry() -> None:
    """The state file's deep comparison walks the vmemmap's buffers, not just their types."""
    from pkvm_sim.core import state_file
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.hypervisor import Hypervisor

    from tests.core.machine_compare import assert_same_machine

    hv = Hypervisor.boot(SimConfig.from_mapping({"memblocks": ["0x80000000:64M"]}))
    restored = state_file.restore(state_file.decode(state_file.encode(hv)))
    assert_same_machine(hv, restored)
    seg = restored.vmemmap.segments[0]
    pfn = seg.end_pfn - 1
    restored.vmemmap.set_entry(pfn, refcount=restored.vmemmap.refcount(pfn) + 1)
    changed = r"vmemmap\.segments\[0\]\.chunks\[\d+\]: entries differ"
    with pytest.raises(AssertionError, match=changed):
        assert_same_machine(hv, restored)


def test_layout_32_keeps_all_64_bits_of_an_entry() -> None:
    """Layout 32's u32 refcount and u32 order fill a 64-bit entry: a tail (order NO_ORDER)
    is 0xffffffff00000000, above the largest signed 64-bit integer."""
    vmemmap = Vmemmap(LAYOUT_32, [(0, 8)])
    vmemmap.set_entry(1, refcount=0, order=2**32 - 1)  # a tail
    vmemmap.set_entry(2, refcount=2**32 - 1, order=2**32 - 1)  # every bit set
    vmemmap.set_entry(3, refcount=2**32 - 2, order=0)
    assert [vmemmap.entry(pfn) for pfn in range(4)] == [0, 0xFFFF_FFFF_0000_0000, 2**64 - 1,
                                                       2**32 - 2]
    assert vmemmap.order(1) == 2**32 - 1 and vmemmap.refcount(2) == 2**32 - 1
    blob = vmemmap.segments[0].export_bytes()
    assert blob[8:16] == bytes(4) + b"\xff" * 4 and blob[16:24] == b"\xff" * 8
    assert vmemmap.segments[0].range_bytes(1, 3) == array("Q", [0xFFFF_FFFF_0000_0000,
                                                                 2**64 - 1]).tobytes()
    other = Vmemmap(LAYOUT_32, [(0, 8)])
    other.segments[0].import_bytes(blob)
    assert [other.entry(pfn) for pfn in range(8)] == [vmemmap.entry(pfn) for pfn in range(8)]


@pytest.mark.parametrize(("layout", "width"), [(LAYOUT_32, 8), (LAYOUT_4, 4), (LAYOUT_2, 2)],
                         ids=["32", "4", "2"])
def test_export_carries_the_layouts_own_items(layout: HypPageLayout, width: int) -> None:
    vmemmap = Vmemmap(layout, [(0, CHUNK_ENTRIES + 3)])  # a second, partial chunk
    tail = layout.no_order << layout.order_shift
    last = CHUNK_ENTRIES + 2
    vmemmap.set_entry(last, order=layout.no_order)
    blob = vmemmap.segments[0].export_bytes()
    assert len(blob) == (CHUNK_ENTRIES + 3) * width
    assert blob[last * width:] == tail.to_bytes(width, "little")
    assert not any(blob[:last * width])  # every other entry: zero


@pytest.mark.parametrize("layout", [LAYOUT_32, LAYOUT_4, LAYOUT_2], ids=lambda lay: lay.name)
def test_an_order_wider_than_the_layout_is_refused_not_wrapped(layout: HypPageLayout) -> None:
    vmemmap = Vmemmap(layout, [(0, 8)])
    vmemmap.set_entry(3, refcount=1, order=1)
    with pytest.raises(ValueError):
        vmemmap.set_entry(3, order=layout.no_order + 1)
    with pytest.raises(ValueError):
        vmemmap.segments[0].set(3, 1 << (8 * layout.stored_bytes))  # too wide for any item
    assert vmemmap.refcount(3) == 1 and vmemmap.order(3) == 1  # unchanged


def test_import_allocates_only_chunks_with_entries_and_keeps_allocated_ones() -> None:
    nr_pages = 4 * CHUNK_ENTRIES
    vmemmap = Vmemmap(LAYOUT_4, [(0, nr_pages)])
    slots_bytes = 8 * 4
    chunk_bytes = 8 * CHUNK_ENTRIES
    vmemmap.set_entry(0, refcount=1)  # chunk 0 allocated
    blob = bytearray(4 * nr_pages)
    blob[4 * 2 * CHUNK_ENTRIES] = 7  # chunk 2: refcount 7 at its first entry
    vmemmap.segments[0].import_bytes(bytes(blob))
    assert vmemmap.resident_bytes == slots_bytes + 2 * chunk_bytes  # chunks 0 and 2
    assert vmemmap.entry(0) == 0 and vmemmap.refcount(2 * CHUNK_ENTRIES) == 7
    assert vmemmap.segments[0].export_bytes() == bytes(blob)


@pytest.mark.parametrize("layout", [LAYOUT_32, LAYOUT_4, LAYOUT_2], ids=lambda lay: lay.name)
def test_fill_sets_exactly_its_range_whatever_the_run_length(layout: HypPageLayout) -> None:
    """Runs short and long, inside one chunk, across chunks, whole chunks, on absent and on
    allocated chunks: every entry of the range is the fill value, every other one keeps its
    value (each pfn was given its own value first, so a shifted or short fill shows)."""
    nr_pages = 3 * CHUNK_ENTRIES
    base = 5  # the segment's first chunk starts below it
    vmemmap = Vmemmap(layout, [(base, nr_pages)])
    segment = vmemmap.segments[0]
    tail = layout.no_order << layout.order_shift  # the widest entry (layout 32: bit 63 set)
    expected = dict.fromkeys(range(base, base + nr_pages), 0)
    for pfn in range(base, base + CHUNK_ENTRIES, 97):  # chunk 0 allocated, chunk 1 absent
        vmemmap.set_entry(pfn, refcount=pfn % 5 + 1)
        expected[pfn] = pfn % 5 + 1
    first_of_1, first_of_2 = CHUNK_ENTRIES, 2 * CHUNK_ENTRIES
    runs = [(base + 10, base + 12, tail), (base + 300, base + 300 + 256, 1),
            (base + 1000, base + 1257, tail), (first_of_1 - 3, first_of_1 + 4, 1),
            (first_of_1 + 9, first_of_2 - 2, tail), (first_of_2, base + nr_pages, 1),
            (base + 40, base + 40, tail)]  # the last one is empty
    for start, stop, entry in runs:
        segment.fill(start, stop, entry)
        expected.update(dict.fromkeys(range(start, stop), entry))
    assert {pfn: segment.get(pfn) for pfn in expected} == expected
    with pytest.raises(ValueError):
        segment.fill(base, base + 2, 1 << (8 * layout.stored_bytes))
    assert segment.get(base + 10) == tail  # refused: nothing written
