"""v6.16+ run-time rules on the v6.18 and v7.3 profiles (their 4K Debian builds).

Expected behaviour from the kernel source (Debian linux-source-7.3, arch/arm64/kvm/;
v6.18 from its merge history and the real 6.18.15 boots): __pkvm_host_share_hyp records the
states in the hyp_page and maps nothing; hyp_pin_shared_mem maps a page at its first pin and
hyp_unpin_shared_mem unmaps at the last; __pkvm_reserve_vm takes the VM table slot at
KVM_CREATE_VM; __pkvm_host_share_guest returns -EPERM for a page shared with hyp, and
-ENOMEM before any change when the memcache is shorter than kvm_mmu_cache_min_pages."""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import Busy, OutOfMemory, PermissionDenied
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.profiles import KVM_MAX_PVMS

TODAY = ["v6.18", "v7.3"]


def boot(profile: str, **values: Any) -> Hypervisor:
    values.setdefault("memblocks", ["0x40000000:1G"])
    return Hypervisor.boot(SimConfig.from_mapping({"profile": profile, **values}))


@pytest.mark.parametrize("profile", TODAY)
def test_a_share_maps_nothing_and_the_first_pin_maps(profile: str) -> None:
    hv = boot(profile)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=16)
    pfn = vm.slice_base_pfn
    mapped = set(hv.hyp_stage1.mapped)
    free = hv.hyp_pool.free_pages
    hv.host_share(vm.handle, pfn, 2)
    assert hv.hyp_stage1.mapped == mapped and hv.hyp_pool.free_pages == free
    hv.pin_shared(vm.handle, pfn)
    hv.pin_shared(vm.handle, pfn)  # a second pin: refcount 2, nothing more to map
    assert hv.hyp_stage1.mapped == mapped | {pfn}
    assert hv.vmemmap.refcount(pfn) == 2
    with pytest.raises(Busy):  # __pkvm_host_unshare_hyp while pinned
        hv.host_unshare(vm.handle, pfn)
    hv.unpin_shared(vm.handle, pfn)
    assert pfn in hv.hyp_stage1.mapped  # still pinned once
    hv.unpin_shared(vm.handle, pfn)
    assert hv.hyp_stage1.mapped == mapped
    assert hv.hyp_pool.free_pages == free  # the pin's tables went back
    hv.host_unshare(vm.handle, pfn, 2)
    hv.audit()


@pytest.mark.parametrize("profile", TODAY)
def test_the_vm_limit_is_reached_at_creation(profile: str) -> None:
    """255 VMs exist at EL1 without running; the 256th KVM_CREATE_VM fails (ENOMEM), as
    on the real 6.18.15 and 7.3.4; destroying one frees its slot."""
    hv = boot(profile)
    handles = [hv.create_vm(nr_vcpus=1, slice_pages=1, run=False).handle
               for _ in range(KVM_MAX_PVMS)]
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(OutOfMemory) as err:
        hv.create_vm(nr_vcpus=1, slice_pages=1, run=False)
    assert err.value.reason == "VM_TABLE_FULL"
    assert hv.canonical_dump(host_tables=True) == before
    hv.destroy_vm(handles[7])
    again = hv.create_vm(nr_vcpus=1, slice_pages=1, run=False)
    assert again.vmid == 8  # the lowest free slot
    hv.audit()


def test_v6_12_still_reaches_the_limit_at_the_first_run() -> None:
    hv = boot("v6.12")
    for _ in range(KVM_MAX_PVMS + 1):
        hv.create_vm(nr_vcpus=1, slice_pages=1, run=False)  # all exist at EL1


@pytest.mark.parametrize("profile", TODAY)
def test_running_a_vm_pins_its_host_structs(profile: str) -> None:
    """__pkvm_init_vm pins struct kvm and __pkvm_init_vcpu each struct kvm_vcpu: mapped at
    EL2 from the first run, unmapped at teardown."""
    hv = boot(profile)
    info = hv.create_vm(nr_vcpus=2, slice_pages=1, run=False)
    vm = hv._vm(info.handle)
    structs = set(vm.struct_pfns)
    assert structs and not structs & hv.hyp_stage1.mapped  # shared, not mapped
    hv.run_vm(info.handle)
    assert structs <= hv.hyp_stage1.mapped
    hv.audit()
    hv.destroy_vm(info.handle)
    assert not structs & hv.hyp_stage1.mapped
    hv.audit()


@pytest.mark.parametrize("profile", TODAY)
def test_guest_share_of_a_page_shared_with_hyp_is_eperm(profile: str) -> None:
    """No WARN from v6.16 (v6.14-v6.15 WARN, fatal at EL2): a clean -EPERM."""
    hv = boot(profile)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
    hv.topup_memcache(vm.handle, 3)
    hv.host_share(vm.handle, vm.slice_base_pfn)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(PermissionDenied) as err:
        hv.guest_map(vm.handle, 0, vm.slice_base_pfn)
    assert err.value.reason == "HOST_PAGE_SHARED_WITH_HYP"
    assert hv.canonical_dump(host_tables=True) == before


@pytest.mark.parametrize("profile", TODAY)
def test_a_memcache_below_the_minimum_is_enomem_and_changes_nothing(profile: str) -> None:
    """kvm_mmu_cache_min_pages = stage-2 levels - 1: with a 48-bit IPA and 4K pages the
    guest stage-2 has 4 levels, so 3 pages; 2 are refused before anything changes, even
    though a later map in the same tables would need none."""
    hv = boot(profile, ia_bits=48)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
    hv.topup_memcache(vm.handle, 2)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(OutOfMemory) as err:
        hv.guest_map(vm.handle, 0, vm.slice_base_pfn)
    assert err.value.reason == "MEMCACHE_TOO_SHORT"
    assert hv.canonical_dump(host_tables=True) == before
    hv.topup_memcache(vm.handle, 3)
    result = hv.guest_map(vm.handle, 0, vm.slice_base_pfn)
    assert result.refilled_pages == 3
    hv.audit()
