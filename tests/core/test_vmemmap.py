"""The vmemmap's storage: lazily zeroed buffers, honest memory figures, bulk export/import.

Expected values come from the layouts' sizes (layout.py) and from how an anonymous mapping
behaves: a page costs host memory once written, and one entry lies in one host page.
"""

from __future__ import annotations

import mmap

import pytest
from pkvm_sim.core.errors import WouldPanic
from pkvm_sim.core.layout import LAYOUT_2, LAYOUT_4, LAYOUT_32, HypPageLayout
from pkvm_sim.core.vmemmap import Vmemmap

TIB_4K_PAGES = 1 << 28  # 1 TiB of 4 KiB pages
BASE_PFN = 0x80000
HUGE_PAGE_BYTES = 2 << 20  # a transparent huge page, where the host uses them


def test_a_1tib_vmemmap_stores_1gib_but_only_written_pages_are_resident() -> None:
    vmemmap = Vmemmap(LAYOUT_4, [(BASE_PFN, TIB_4K_PAGES)])
    assert vmemmap.modelled_bytes == 4 * TIB_4K_PAGES  # what EL2 spends: 1 GiB
    assert vmemmap.stored_bytes == 4 * TIB_4K_PAGES  # 'I' items: 4 bytes each
    untouched = vmemmap.resident_bytes
    assert untouched < HUGE_PAGE_BYTES  # nothing written yet: (nearly) nothing resident
    far = BASE_PFN + TIB_4K_PAGES - 1
    vmemmap.set_entry(far, refcount=3, order=2)
    grown = vmemmap.resident_bytes - untouched
    assert mmap.PAGESIZE <= grown <= HUGE_PAGE_BYTES  # one entry: one host page (or one THP)
    assert vmemmap.refcount(far) == 3 and vmemmap.order(far) == 2
    assert vmemmap.entry(BASE_PFN + TIB_4K_PAGES // 2) == 0  # never written: reads as zero


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
    with pytest.raises(AssertionError, match=r"vmemmap\.segments\[0\]\.items: buffers differ"):
        assert_same_machine(hv, restored)
