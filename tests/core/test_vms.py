"""Guest VMs (SEMANTICS 5, A.3 to A.5): creation, memcache, guest stage-2, teardown, and the
pool pages a VM allocates on its own behalf."""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import (
    InvalidArgument,
    NotFound,
    OutOfMemory,
    PermissionDenied,
    WouldPanic,
)
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, PageState, PoolKind


def boot(**values: Any) -> Hypervisor:
    values.setdefault("memblocks", ["0x80000000:256M"])
    return Hypervisor.boot(SimConfig.from_mapping(values))


def test_create_vm_handles_vmids_and_donations() -> None:
    hv = boot()
    a = hv.create_vm(nr_vcpus=2, slice_pages=32, name="a")
    b = hv.create_vm(nr_vcpus=1, slice_pages=8)
    assert (a.handle, a.vmid, b.handle, b.vmid) == (0x1000, 1, 0x1001, 2)
    # 4K, ia 40: PGD 2 pages; metadata ceil((1024 + 8*2)/4096) + 2 vCPU pages = 3.
    assert a.donated_pages == 2 + 3
    assert hv.vm(a.handle) == a and [v.handle for v in hv.vms()] == [0x1000, 0x1001]
    assert "vm/4096" in [p.name for p in hv.pools()]
    # Donated pages are hyp's: the host cannot map them (annotated), and audit agrees.
    meta = hv._vms[a.handle].meta_pfn
    assert hv.page_info(meta).owner == f"vm:{a.handle}"
    assert hv.page_info(meta).host_state is PageState.NOPAGE
    r = hv.host_fault(meta << 12)
    assert r.outcome is FaultOutcome.FATAL and r.errno_name == "EEXIST"
    assert hv.page_info(a.slice_base_pfn).owner == "host"
    hv.audit()
    with pytest.raises(InvalidArgument):
        hv.create_vm(nr_vcpus=0, slice_pages=1)
    with pytest.raises(InvalidArgument):
        hv.create_vm(nr_vcpus=1, slice_pages=0)
    with pytest.raises(OutOfMemory):
        hv.create_vm(nr_vcpus=1, slice_pages=1 << 20)  # more than the 256 MiB of RAM
    hv.audit()
    with pytest.raises(NotFound):
        hv.vm(0x2000)


def test_vm_slots_are_reused_lowest_first_but_handles_never() -> None:
    """Issue 8: a client must tell "my VM is gone" from a new VM in its slot."""
    hv = boot()
    a = hv.create_vm(nr_vcpus=1, slice_pages=1)
    hv.create_vm(nr_vcpus=1, slice_pages=1)
    hv.destroy_vm(a.handle)
    c = hv.create_vm(nr_vcpus=1, slice_pages=1)
    assert (c.vmid, c.handle) == (a.vmid, 0x1002)


def test_guest_map_needs_table_pages_from_the_memcache() -> None:
    hv = boot()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8)
    # The VM pool holds only the PGD: a first guest map needs 2 tables (levels 2 and 3).
    # v6.14 __pkvm_host_share_guest maps under WARN_ON: a short memcache is fatal at EL2.
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(WouldPanic) as err:
        hv.guest_map(vm.handle, 0x4000_0000, vm.slice_base_pfn)
    assert err.value.reason == "MEMCACHE_EMPTY" and "top up" in err.value.message
    assert hv.canonical_dump(host_tables=True) == before
    assert hv.topup_memcache(vm.handle, 1) == 1
    with pytest.raises(WouldPanic):
        hv.guest_map(vm.handle, 0x4000_0000, vm.slice_base_pfn)  # still one short
    # topup_hyp_memcache(mc, 2) fills up to 2 pages (__topup_hyp_memcache): one more.
    assert hv.topup_memcache(vm.handle, 2) == 2
    assert hv.topup_memcache(vm.handle, 1) == 2  # already that full: nothing added
    r = hv.guest_map(vm.handle, 0x4000_0000, vm.slice_base_pfn)
    # pkvm_refill_memcache moved both host pages to EL2 before the map used them.
    assert (r.level, r.tables_allocated, r.refilled_pages) == (3, 2, 2)
    pool = hv._vms[vm.handle].pool
    assert pool is not None and pool.statistics().admitted_pages == 2
    r = hv.guest_map(vm.handle, 0x4000_1000, vm.slice_base_pfn + 1)
    assert (r.tables_allocated, r.refilled_pages) == (0, 0)
    # __pkvm_host_share_guest: the IPA must be NOPAGE, even for the same pfn (-EPERM).
    for pfn in (vm.slice_base_pfn + 1, vm.slice_base_pfn + 2):
        with pytest.raises(PermissionDenied) as denied:
            hv.guest_map(vm.handle, 0x4000_1000, pfn)
        assert denied.value.reason == "IPA_MAPPED"
    with pytest.raises(PermissionDenied):
        hv.guest_map(vm.handle, 0x4000_2000, vm.slice_base_pfn + 8)  # outside the slice
    with pytest.raises(InvalidArgument):
        hv.guest_map(vm.handle, 0x4000_2001, vm.slice_base_pfn)
    hv.audit()


def test_alloc_put_get_ownership() -> None:
    hv = boot()
    a = hv.create_vm(nr_vcpus=1, slice_pages=1).handle
    b = hv.create_vm(nr_vcpus=1, slice_pages=1).handle
    pfn = hv.alloc_pages(a, 3)
    assert hv.page_info(pfn).owner == f"vm:{a}" and hv.page_info(pfn + 7).owner == f"vm:{a}"
    assert hv.get_page(a, pfn) == 2
    with pytest.raises(PermissionDenied) as err:
        hv.put_page(b, pfn)
    assert err.value.reason == "NOT_OWNER"
    with pytest.raises(PermissionDenied):
        hv.get_page(a, pfn + 1)  # a tail is not a head the VM owns
    assert hv.put_page(a, pfn) == 1
    assert hv.put_page(a, pfn) == 0
    with pytest.raises(PermissionDenied):
        hv.put_page(a, pfn)  # ownership went with the last reference
    for bad in (-1, hv.max_order + 1):
        with pytest.raises(InvalidArgument):
            hv.alloc_pages(a, bad)
    with pytest.raises(OutOfMemory):
        hv.alloc_pages(a, hv.max_order)  # orders usable are 0 .. max_order - 1
    with pytest.raises(NotFound):
        hv.alloc_pages(0x2fff, 0)
    # The VM's own pool: only the PGD pages, all in use.
    with pytest.raises(OutOfMemory):
        hv.alloc_pages(a, 0, PoolKind.VM)
    hv.audit()


def test_refcount_overflow_on_get_is_refused() -> None:
    hv = boot(hyp_page_layout="2")
    h = hv.create_vm(nr_vcpus=1, slice_pages=1).handle
    pfn = hv.alloc_pages(h, 0)
    for _ in range(8190):
        hv.get_page(h, pfn)
    with pytest.raises(WouldPanic) as err:
        hv.get_page(h, pfn)
    assert err.value.reason == "REFCOUNT_OVERFLOW"
    hv.audit()
    hv.destroy_vm(h)
    hv.audit()


def test_teardown_returns_everything_and_the_state_equals_boot() -> None:
    hv = boot()
    boot_dump = hv.canonical_dump()
    handles = [hv.create_vm(nr_vcpus=1 + i % 3, slice_pages=8 + i).handle for i in range(5)]
    for i, h in enumerate(handles):
        vm = hv.vm(h)
        hv.topup_memcache(h, 3 + i)
        for j in range(4):
            hv.guest_map(h, 0x4000_0000 + j * 0x1000, vm.slice_base_pfn + j)
        hv.guest_map(h, 0x4000_8000, vm.slice_base_pfn)  # the same page at a second IPA
        pfn = hv.alloc_pages(h, i % 3)
        hv.get_page(h, pfn)
        hv.host_share(h, vm.slice_base_pfn + 4, 2)
        hv.pin_shared(h, vm.slice_base_pfn + 4)
    hv.audit()
    assert hv.statistics().nr_vms == 5
    for h in handles:
        vm = hv.vm(h)
        returned = hv.destroy_vm(h)
        assert returned >= vm.slice_nr_pages + vm.donated_pages
        hv.audit()
    assert hv.canonical_dump() == boot_dump
    with pytest.raises(NotFound):
        hv.destroy_vm(handles[0])


def test_statistics_name_every_pool() -> None:
    hv = boot(profile="v5.13")
    h = hv.create_vm(nr_vcpus=1, slice_pages=1).handle
    stats = hv.statistics()
    assert [p.name for p in stats.pools] == ["hyp", "host_s2_mem", "host_s2_dev", f"vm/{h}"]
    assert stats.vmemmap.coverage == "all" and stats.vmemmap.entry_bytes == 32
    assert stats.host_stage2.table_pages == sum(p.allocated_pages for p in stats.pools[1:3])


# -- finding 2: the memcache (topup_hyp_memcache at the host, refill_memcache at EL2) -------

@pytest.mark.parametrize("profile", ["v5.14"])
def test_topup_only_allocates_and_el2_refills_first_in_first_out(profile: str) -> None:
    """topup_hyp_memcache (host, arch/arm64/kvm/mmu.c) allocates pages and pushes them on
    the host's memcache: they stay host-owned. At the next guest map,
    handle___pkvm_host_share_guest calls pkvm_refill_memcache: refill_memcache pops the
    host's top and donates it (admit_host_page -> __pkvm_host_donate_hyp), one page at a
    time, pushing it on EL2's memcache, until EL2 holds min_pages = the host's nr_pages.
    Two stacks: the host's first page is used first (guest_s2_zalloc_page pops EL2's)."""
    hv = boot(profile=profile)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8)
    h = vm.handle
    host_s2 = hv.canonical_dump()["host_stage2"]
    hyp_free = hv.hyp_pool.free_pages
    hv.topup_memcache(h, 3)
    a, b, c = hv._vms[h].memcache
    assert a < b < c
    assert hv.canonical_dump()["host_stage2"] == host_s2  # no donation: nothing annotated
    assert hv.hyp_pool.free_pages == hyp_free
    for pfn in (a, b, c):
        assert hv.page_info(pfn).owner == "host"
        assert hv.page_info(pfn).host_state is PageState.OWNED
    hv.audit()
    r = hv.guest_map(h, 0x4000_0000, vm.slice_base_pfn)  # needs 2 tables (levels 2 and 3)
    assert (r.tables_allocated, r.refilled_pages) == (2, 3)
    gvm = hv._vms[h]
    assert gvm.admitted == [a, b]  # first in, first out
    assert (gvm.memcache, gvm.hyp_memcache) == ([], [c])
    for pfn in (a, b, c):
        assert hv.page_info(pfn).host_state is PageState.NOPAGE  # donated to hyp
    hv.audit()
    # min_pages is the host's count (2): EL2 holds 1, so one page moves: the host's top.
    hv.topup_memcache(h, 2)
    d, e = gvm.memcache
    r = hv.guest_map(h, 0x4000_1000, vm.slice_base_pfn + 1)
    assert (r.tables_allocated, r.refilled_pages) == (0, 1)
    assert (gvm.memcache, gvm.hyp_memcache) == ([d], [c, e])
    assert hv.page_info(d).host_state is PageState.OWNED
    hv.audit()
    hv.destroy_vm(h)
    hv.audit()


# -- finding 6: the EL2 VM table ----------------------------------------------------------

def test_the_el2_vm_table_holds_kvm_max_pvms() -> None:
    """find_free_vm_table_entry (arch/arm64/kvm/hyp/nvhe/pkvm.c): KVM_MAX_PVMS (255) slots,
    the lowest free one first, -ENOMEM when all are taken."""
    hv = boot(profile="v6.12", memblocks=["0x80000000:1G"])
    vms = [hv.create_vm(nr_vcpus=1, slice_pages=1) for _ in range(255)]
    assert [vm.vmid for vm in vms] == list(range(1, 256))  # VMID = table slot + 1
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(OutOfMemory) as err:
        hv.create_vm(nr_vcpus=1, slice_pages=1)
    assert err.value.reason == "VM_TABLE_FULL" and "255" in err.value.message
    assert hv.canonical_dump(host_tables=True) == before
    hv.destroy_vm(vms[7].handle)
    assert hv.create_vm(nr_vcpus=1, slice_pages=1).vmid == 8  # the freed slot
    hv.audit()


def test_client_vms_without_el2_state_are_not_bound_by_the_kernel_table() -> None:
    """v6.1 has no VMs at EL2: a client VM is the service's own record (a slice)."""
    hv = boot(profile="v6.1", memblocks=["0x80000000:1G"])
    handles = [hv.create_vm(nr_vcpus=1, slice_pages=1).handle for _ in range(300)]
    assert len(set(handles)) == 300
    hv.audit()


def test_teardown_says_which_steps_are_the_kernels() -> None:
    """__pkvm_teardown_vm hands back the donated metadata, PGD and memcache pages and
    unpins; unsharing the host's hyp shares is the host's job, done here by the service."""
    hv = boot()
    vm = hv.create_vm(nr_vcpus=2, slice_pages=16)
    h, base = vm.handle, vm.slice_base_pfn
    hv.topup_memcache(h, 3)
    hv.guest_map(h, 0, base)  # refills 3: 2 become tables, 1 stays in EL2's memcache
    hv.guest_map(h, 0x1000, base)  # the same page twice: one page back to the host
    hv.host_share(h, base + 1, 3)
    hv.pin_shared(h, base + 1, 2)
    r = hv.teardown_vm(h)
    assert r.el2_returned_pages == vm.donated_pages + 3
    assert (r.guest_unshared_pages, r.unpinned_pages, r.host_unshared_pages) == (1, 2, 3)
    assert r.pages_returned == vm.donated_pages + 3 + vm.slice_nr_pages
    hv.audit()
