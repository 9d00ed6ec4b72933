"""Host -> hyp share / unshare / pin (SEMANTICS 4.2, 4.4: the V17 table, V62 pinning)."""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    WouldPanic,
)
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, PageState

SMALL = ["0x80000000:256M"]


def boot(**values: Any) -> Hypervisor:
    values.setdefault("memblocks", SMALL)
    return Hypervisor.boot(SimConfig.from_mapping(values))


@pytest.fixture
def hv_vm() -> tuple[Hypervisor, int, int]:
    hv = boot()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=16)
    return hv, vm.handle, vm.slice_base_pfn


def states(hv: Hypervisor, pfn: int) -> tuple[PageState, PageState]:
    info = hv.page_info(pfn)
    return info.host_state, info.hyp_state


def test_share_owned_page(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    r = hv.host_share(h, base, 2)
    assert (r.host_state, r.hyp_state) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    assert states(hv, base + 1) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    assert states(hv, base + 2) == (PageState.OWNED, PageState.NOPAGE)
    pte, level = hv.host_stage2.host_leaf(base)
    assert level == 3  # non-default states are forced to page granularity
    assert hv.statistics().shared_pages == 2
    hv.audit()


def test_share_of_a_block_mapped_page_splits_the_block() -> None:
    hv = boot()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=1024)
    pfn = -(-vm.slice_base_pfn // 512) * 512  # a 2 MiB aligned page inside the slice
    r = hv.host_fault(pfn << 12)
    assert r.outcome is FaultOutcome.MAPPED and r.level == 2
    hv.host_share(vm.handle, pfn + 5)
    assert hv.host_stage2.host_leaf(pfn + 5)[1] == 3
    assert hv.host_stage2.host_leaf(pfn)[0] is None  # the rest of the block: re-faulted lazily
    hv.audit()


def test_double_share_is_refused_and_changes_nothing(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    hv.host_share(h, base + 1)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(PermissionDenied) as err:
        hv.host_share(h, base, 2)  # page base is fine, base + 1 is already shared
    assert err.value.reason == "HOST_PAGE_NOT_OWNED"
    assert hv.canonical_dump(host_tables=True) == before


def test_unshare_requires_shared_owned(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    with pytest.raises(PermissionDenied):
        hv.host_unshare(h, base)
    hv.host_share(h, base)
    r = hv.host_unshare(h, base)
    assert (r.host_state, r.hyp_state) == (PageState.OWNED, PageState.NOPAGE)
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    hv.audit()


def test_pinned_page_cannot_be_unshared(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    hv.host_share(h, base)
    hv.pin_shared(h, base)
    hv.pin_shared(h, base)
    assert hv.page_info(base).refcount == 2  # the vmemmap refcount of a page outside pools
    with pytest.raises(Busy) as err:
        hv.host_unshare(h, base)
    assert err.value.reason == "PAGE_PINNED" and err.value.errno_name == "EBUSY"
    hv.unpin_shared(h, base)
    hv.unpin_shared(h, base)
    with pytest.raises(WouldPanic):
        hv.unpin_shared(h, base)  # BUG on 0
    hv.host_unshare(h, base)
    hv.audit()


def test_pin_requires_a_shared_page(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    with pytest.raises(PermissionDenied):
        hv.pin_shared(h, base)


def test_pages_outside_the_slice_are_refused(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    other = hv.create_vm(nr_vcpus=1, slice_pages=4)
    for call in (hv.host_share, hv.host_unshare, hv.pin_shared):
        with pytest.raises(PermissionDenied) as err:
            call(h, other.slice_base_pfn)
        assert err.value.reason == "NOT_IN_SLICE"
    with pytest.raises(PermissionDenied):
        hv.host_share(h, base + 15, 2)  # runs past the end of the slice
    with pytest.raises(InvalidArgument):
        hv.host_share(h, base, 0)
    with pytest.raises(NotFound):
        hv.host_share(0x9999, base)


def test_sharing_needs_a_vmemmap_for_all_memory() -> None:
    """Coverage 'carveout' (V13/V14): no hyp_page for host pages, so no sharing (1.3)."""
    hv = boot(vmemmap_coverage="carveout")
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)  # a slice-only VM
    with pytest.raises(FailedPrecondition) as err:
        hv.host_share(vm.handle, vm.slice_base_pfn)
    assert err.value.reason == "VMEMMAP_NOT_COVERED"
    assert "cover letter" in err.value.message
    for call in (lambda: hv.topup_memcache(vm.handle, 1),
                 lambda: hv.guest_map(vm.handle, 0, vm.slice_base_pfn)):
        with pytest.raises(FailedPrecondition):
            call()
    pfn = hv.alloc_pages(vm.handle, 0)  # the hyp pool is in the carve-out: fine
    assert hv.put_page(vm.handle, pfn) == 0
    hv.audit()
    hv.destroy_vm(vm.handle)
    hv.audit()


def test_destroy_drops_shares_and_pins(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    hv.host_share(h, base, 3)
    hv.pin_shared(h, base)
    hv.destroy_vm(h)
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    assert hv.page_info(base).refcount == 0
    hv.audit()
