"""The vmemmap's storage: chunks allocated on first write, honest memory figures, bulk
export/import in the layouts' own items.

Expected values come from the layouts' sizes and packing (layout.py, the kernel's struct
hyp_page), from the chunk geometry (an allocated chunk is CHUNK_ENTRIES 8-byte items) and
from what the Python allocator reports (tracemalloc).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

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
    before, reported = tracemalloc_bytes(), vmemmap.resident_bytes
    for i in range(64):  # 64 chunks, one entry each
        vmemmap.set_entry(BASE_PFN + i * 1_000_003, refcount=1)
    traced = tracemalloc_bytes() - before
    grown = vmemmap.resident_bytes - reported
    assert grown == 64 * 8 * CHUNK_ENTRIES
    assert grown <= traced <= grown + 64 * 1024  # a little allocator and object overhead


def tracemalloc_bytes() -> int:
    return tracemalloc.get_traced_memory()[0]


@pytest.fixture(autouse=True)
def _tracing() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


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
