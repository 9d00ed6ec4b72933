"""Page-by-page operations are bounded per call, so no request holds the lock for long."""

from __future__ import annotations

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import InvalidArgument
from pkvm_sim.core.hypervisor import MAX_PAGES_PER_CALL, Hypervisor


@pytest.fixture
def hv() -> Hypervisor:
    return Hypervisor.boot(SimConfig())


def test_topup_takes_up_to_the_bound_and_refuses_more_unchanged(hv: Hypervisor) -> None:
    handle = hv.create_vm(nr_vcpus=1, slice_pages=8).handle
    assert hv.topup_memcache(handle, MAX_PAGES_PER_CALL) == MAX_PAGES_PER_CALL
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(InvalidArgument) as info:
        hv.topup_memcache(handle, MAX_PAGES_PER_CALL + 1)
    assert info.value.reason == "BAD_SIZE"
    assert hv.canonical_dump(host_tables=True) == before
    hv.audit()


@pytest.mark.parametrize("operation", ["host_share", "host_unshare", "pin_shared",
                                       "unpin_shared"])
def test_share_family_refuses_more_than_the_bound_unchanged(hv: Hypervisor,
                                                             operation: str) -> None:
    vm = hv.create_vm(nr_vcpus=1, slice_pages=MAX_PAGES_PER_CALL + 1)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(InvalidArgument) as info:
        getattr(hv, operation)(vm.handle, vm.slice_base_pfn, MAX_PAGES_PER_CALL + 1)
    assert info.value.reason == "BAD_SIZE"
    assert hv.canonical_dump(host_tables=True) == before


def test_sharing_exactly_the_bound_works(hv: Hypervisor) -> None:
    vm = hv.create_vm(nr_vcpus=1, slice_pages=MAX_PAGES_PER_CALL)
    result = hv.host_share(vm.handle, vm.slice_base_pfn, MAX_PAGES_PER_CALL)
    assert result.nr_pages == MAX_PAGES_PER_CALL
    hv.host_unshare(vm.handle, vm.slice_base_pfn, MAX_PAGES_PER_CALL)
    hv.audit()
