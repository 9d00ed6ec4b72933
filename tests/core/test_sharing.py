"""Host -> hyp share / unshare / pin (docs/stage2.md, Sharing: the v5.17 table, v6.2 pinning)."""

from __future__ import annotations

from collections.abc import Callable
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
from pkvm_sim.core.model import FaultOutcome, PageState, PoolKind
from pkvm_sim.core.pgtable import (
    ANNOTATED,
    LEAF,
    OWNER_HYP,
    PROT_RWX,
    PTE_KIND,
    PTE_PFN,
    PTE_PROT,
    PTE_STATE,
    STATE_OWNED,
    STATE_SHARED_BORROWED,
    STATE_SHARED_OWNED,
    leaf_pte,
)
from pkvm_sim.core.profiles import (
    FIRST_KERNEL,
    Operation,
    kernel_profile_names,
    profile_names,
    profile_spec,
)

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


def test_v5_14_with_coverage_carveout_is_the_kernel_without_sharing() -> None:
    """v5.14 has no __pkvm_host_share_hyp (it arrived in v5.15), no VMs at EL2 (v6.2) and
    no guest maps (v6.14): each is FAILED_PRECONDITION / NOT_IN_PROFILE naming the first
    kernel that has it. The hyp pool (in the carve-out) still serves alloc_pages."""
    hv = boot(vmemmap_coverage="carveout")
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)  # a slice-only VM
    refusals = {
        "v5.15": lambda: hv.host_share(vm.handle, vm.slice_base_pfn),
        "v5.17": lambda: hv.host_unshare(vm.handle, vm.slice_base_pfn),
        "v6.2": lambda: hv.pin_shared(vm.handle, vm.slice_base_pfn),
        "v6.14": lambda: hv.guest_map(vm.handle, 0, vm.slice_base_pfn),
    }
    for first, call in refusals.items():
        before = hv.canonical_dump(host_tables=True)
        with pytest.raises(FailedPrecondition) as err:
            call()
        assert err.value.reason == "NOT_IN_PROFILE"
        assert f"first kernel that has it is {first}" in err.value.message
        assert "v5.14" in err.value.message
        assert hv.canonical_dump(host_tables=True) == before
    with pytest.raises(FailedPrecondition) as err:
        hv.topup_memcache(vm.handle, 1)
    assert err.value.reason == "NOT_IN_PROFILE"
    pfn = hv.alloc_pages(vm.handle, 0)  # the hyp pool is in the carve-out: fine
    assert hv.put_page(vm.handle, pfn) == 0
    hv.audit()
    hv.destroy_vm(vm.handle)
    hv.audit()


def test_v6_1_shares_under_coverage_carveout() -> None:
    """Finding 4. In 5.15-6.1 share and unshare keep the page state only in the host and hyp
    PTE software bits (__pkvm_host_share_hyp -> host_request_owned_transition,
    hyp_complete_share; no hyp_page of a host page is read), so a vmemmap covering only
    the carve-out does not stop them. Pins (hyp_pin_shared_mem, 6.2) and VMs at EL2 do
    need the hyp_page of every page: refused NOT_IN_PROFILE."""
    hv = boot(profile="v6.1", vmemmap_coverage="carveout")
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
    base = vm.slice_base_pfn
    assert not hv.vmemmap.covers(base)
    r = hv.host_share(vm.handle, base, 2)
    assert (r.host_state, r.hyp_state) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    assert states(hv, base) == (PageState.SHARED_OWNED, PageState.SHARED_BORROWED)
    hv.audit()
    with pytest.raises(FailedPrecondition) as err:
        hv.pin_shared(vm.handle, base)
    assert err.value.reason == "NOT_IN_PROFILE" and "v6.2" in err.value.message
    hv.host_unshare(vm.handle, base, 2)
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    hv.audit()


@pytest.mark.parametrize("coverage", ["carveout", "all"])
def test_v6_1_has_no_vms_at_el2(coverage: str) -> None:
    """__pkvm_init_vm arrived in v6.2: under v6.1 a client VM is a slice only, whatever
    the vmemmap coverage (nothing is donated, no VM pool, no guest stage-2)."""
    hv = boot(profile="v6.1", vmemmap_coverage=coverage)
    vm = hv.create_vm(nr_vcpus=2, slice_pages=4)
    assert vm.donated_pages == 0 and [p.name for p in hv.pools()][-1] == "host_s2"
    with pytest.raises(FailedPrecondition) as err:
        hv.alloc_pages(vm.handle, 0, PoolKind.VM)
    assert err.value.reason == "NOT_IN_PROFILE" and "v6.2" in err.value.message
    hv.destroy_vm(vm.handle)
    hv.audit()


def test_v6_12_pins_but_does_not_map_guest_memory() -> None:
    """v6.12 has pins and VMs at EL2, but not __pkvm_host_share_guest (v6.14): guest maps
    and memcache top-ups (only the guest map's refill consumes them) are NOT_IN_PROFILE,
    naming v6.18, the profile of a kernel that has them."""
    hv = boot(profile="v6.12")
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
    hv.host_share(vm.handle, vm.slice_base_pfn)
    hv.pin_shared(vm.handle, vm.slice_base_pfn)
    with pytest.raises(Busy):
        hv.host_unshare(vm.handle, vm.slice_base_pfn)
    for call in (lambda: hv.guest_map(vm.handle, 0, vm.slice_base_pfn + 1),
                 lambda: hv.topup_memcache(vm.handle, 1)):
        with pytest.raises(FailedPrecondition) as err:
            call()
        assert err.value.reason == "NOT_IN_PROFILE" and "v6.14" in err.value.message
        assert "v6.18" in err.value.message


def test_registry_operations_per_profile() -> None:
    """The table of docs/model.md, read from the registry."""
    def ops(profile: str, coverage: str = "all") -> set[str]:
        return {op.name for op in profile_spec(profile).operations(coverage)}

    everything = {op.name for op in Operation}
    assert ops("v5.13", "carveout") == ops("v5.14", "carveout") == set()
    assert ops("v5.13") == ops("v5.14") == everything  # the documented extension
    assert ops("v6.1") == ops("v6.1", "carveout") == {"SHARE_HYP", "UNSHARE_HYP"}
    assert ops("v6.12") == everything - {"GUEST_SHARE"}
    assert FIRST_KERNEL[Operation.GUEST_SHARE] == "v6.14"
    # v6.18 and v7.3 have every operation, with v6.16+ rules that need the build's struct
    # sizes: the registry serves none by itself; a machine whose build is modelled (4K)
    # serves them all, any other refuses NOT_MODELLED (test_v6_16_rules_need_a_build).
    for today in ("v6.18", "v7.3"):
        assert profile_spec(today).native_operations() == set(Operation)
        assert ops(today) == set()
    assert "v6.12+guest-share" not in profile_names()
    assert kernel_profile_names() == profile_names()  # no extension profile is registered


def test_destroy_drops_shares_and_pins(hv_vm: tuple[Hypervisor, int, int]) -> None:
    hv, h, base = hv_vm
    hv.host_share(h, base, 3)
    hv.pin_shared(h, base)
    hv.destroy_vm(h)
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    assert hv.page_info(base).refcount == 0
    hv.audit()


# -- finding 3: shares and donations cost hyp stage-1 table pages -------------------------

def hyp_free(hv: Hypervisor) -> int:
    return hv.hyp_pool.free_pages


# The hyp stage-1 tables a 1-vCPU VM's creation and first run take, on RAM 0x8000_0000:4G:
# - v5.14 (no modelled boot; the carve-out alone mapped at boot, at VA = PA): the donated
#   metadata and PGD land at the bottom of RAM (GiB 2), which has no level-2 table yet: a
#   level-2 and a level-3 table.
# - v6.12: struct kvm and kvm_vcpu (slab), the hyp VM/vCPU structs (order-1 pages) and the
#   PGD (order 4) land in three 2 MiB pageblocks of ZONE_NORMAL (above 4 GiB, relative GiB 2,
#   whose level-2 table the per-CPU areas needed at boot): three level-3 tables, as the real
#   6.12 under QEMU takes for its first VM (4 GiB, 1 CPU: 37 -> 40 table pages).
VM_CREATION_TABLES = {"v5.14": 2, "v6.12": 3}


@pytest.mark.parametrize("profile", ["v5.14", "v6.12"])
def test_shares_and_donations_take_hyp_stage1_tables_from_the_hyp_pool(profile: str) -> None:
    """hyp_complete_donation / hyp_complete_share map each page at EL2 with
    pkvm_create_mappings_locked; a missing table comes from the hyp pool (hpool), one page
    per level. Unsharing (hyp_complete_unshare -> kvm_pgtable_hyp_unmap) frees tables left
    empty. The slice sits at the bottom of RAM: under v6.12 the kernel image's level-2 table
    (GiB 0 of the linear map) covers it, under v5.14 the VM's donations made GiB 2's."""
    hv = boot(profile=profile, memblocks=["0x80000000:4G"])
    free = hyp_free(hv)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4096)
    created = VM_CREATION_TABLES[profile]
    assert hyp_free(hv) == free - created
    assert hv.statistics().hyp_stage1_table_pages == created
    meta_chunk = hv._vms[vm.handle].meta_pfn // 512  # the metadata's 2 MiB region
    chunks = [c for c in range(vm.slice_base_pfn // 512 + 1, 0x90000 // 512)
              if c != meta_chunk][:4]
    pages = [c * 512 + 7 for c in chunks]
    for pfn in pages:  # 4 shares in distinct 2 MiB regions: one level-3 table each
        hv.host_share(vm.handle, pfn)
    assert hyp_free(hv) == free - created - 4
    hv.audit()
    hv.host_share(vm.handle, pages[0] + 1)  # same region: no new table
    assert hyp_free(hv) == free - created - 4
    for pfn in pages:
        hv.host_unshare(vm.handle, pfn)
    assert hyp_free(hv) == free - created - 1  # pages[0] + 1 still keeps its table
    hv.host_unshare(vm.handle, pages[0] + 1)
    assert hyp_free(hv) == free - created
    hv.audit()
    hv.destroy_vm(vm.handle)
    assert hyp_free(hv) == free and hv.statistics().hyp_stage1_table_pages == 0
    hv.audit()


@pytest.mark.parametrize("profile", ["v5.14", "v6.12"])
def test_audit_counts_each_hyp_stage1_tables_entries(profile: str) -> None:
    """Each run-time table's refcount is 1 + its entries (one per page mapped under a
    last-level table, one per child table above it), keyed by PA (v5.14) or by the linear
    alias (v6.12): the audit recomputes the entries from the mapped pages and refuses a
    refcount one off, up or down, in any table."""
    hv = boot(profile=profile, memblocks=["0x80000000:4G"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4096)
    for pfn in range(vm.slice_base_pfn + 600, vm.slice_base_pfn + 2000, 100):
        hv.host_share(vm.handle, pfn, 3)  # 3 pages, some across a 2 MiB boundary
    s1 = hv.hyp_stage1
    tables = s1.table_pages()
    assert {pfn: entries for pfn, (_level, entries) in tables.items()} == s1.expected_entries()
    levels = sorted({level for level, _entries in tables.values()})
    assert levels[-1] == 3 and len(tables) >= 3  # several last-level tables
    hv.audit()
    for table in tables:
        for change, undo in ((hv.hyp_pool.get_page, hv.hyp_pool.put_page),
                             (hv.hyp_pool.put_page, hv.hyp_pool.get_page)):
            change(table)
            with pytest.raises(AssertionError, match="refcount says"):
                hv.audit()
            undo(table)
    hv.audit()


def test_v6_1_shares_take_and_give_back_hyp_stage1_tables() -> None:
    """v6.1's hyp_unmap_walker frees empty tables as 6.12's does. A v6.1 VM has no EL2 part
    but the host shares its struct kvm (1 page), struct kvm_vcpu (9680 B: 3 pages) and, at
    the first run, the VMM task's FP state (1 page): 5 pages in one slab pageblock of
    ZONE_NORMAL, one level-3 table (the real 6.1: 5 pages, 33 -> 34 tables)."""
    hv = boot(profile="v6.1", vmemmap_coverage="carveout", memblocks=["0x80000000:4G"])
    free = hyp_free(hv)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=2048)
    assert hyp_free(hv) == free - 1 and hv.statistics().shared_pages == 5
    base = -(-vm.slice_base_pfn // 512) * 512
    hv.host_share(vm.handle, base)  # GiB 0 of the linear map has the image's level 2
    assert hyp_free(hv) == free - 2
    hv.host_share(vm.handle, base + 512)  # another 2 MiB region: level 3
    assert hyp_free(hv) == free - 3
    hv.audit()
    hv.host_unshare(vm.handle, base + 512)
    hv.host_unshare(vm.handle, base)
    assert hyp_free(hv) == free - 1
    hv.destroy_vm(vm.handle)
    assert hyp_free(hv) == free and hv.statistics().shared_pages == 0
    hv.audit()


def test_share_refused_when_the_hyp_pool_cannot_supply_the_tables() -> None:
    """do_share maps under WARN_ON, and every WARN at EL2 is fatal (nvhe_hyp_panic_handler:
    "All hyp bugs, including warnings, are treated as fatal"): WouldPanic, nothing changed."""
    hv = boot(memblocks=["0x80000000:1G"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=2048)
    base = -(-vm.slice_base_pfn // 512) * 512
    hv.host_share(vm.handle, base)
    while hv.hyp_pool.free_pages:
        hv.alloc_pages(vm.handle, 0)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(WouldPanic) as err:
        hv.host_share(vm.handle, base + 512)  # needs a new level-3 table
    assert err.value.reason == "HYP_POOL_EXHAUSTED"
    assert hv.canonical_dump(host_tables=True) == before
    hv.host_share(vm.handle, base + 1)  # its table exists: fine without a free page
    hv.audit()


# -- finding 1: guest maps follow __pkvm_host_share_guest (v6.14+) --------------------------

@pytest.mark.parametrize("profile", ["v5.14"])
def test_guest_map_follows_the_v6_14_page_state_rules(profile: str) -> None:
    hv = boot(profile=profile)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=16)
    h, base = vm.handle, vm.slice_base_pfn
    hv.topup_memcache(h, 4)
    # OWNED -> SHARED_OWNED; the guest leaf is SHARED_BORROWED.
    r = hv.guest_map(h, 0, base)
    assert states(hv, base)[0] is PageState.SHARED_OWNED
    assert hv._vms[h].pgt.lookup(0)[0][3] == 2  # type: ignore[index,union-attr]
    # A page shared with guests cannot be shared with hyp (its host state is not OWNED).
    with pytest.raises(PermissionDenied) as err:
        hv.host_share(h, base)
    assert err.value.reason == "HOST_PAGE_NOT_OWNED"
    with pytest.raises(PermissionDenied):
        hv.host_unshare(h, base)  # nor unshared from hyp
    # Already SHARED_OWNED with a non-zero guest-share count: accepted at another IPA.
    r = hv.guest_map(h, 0x1000, base)
    assert r.level == 3 and hv._guest_shared[base] == 2
    # The IPA must be NOPAGE (__guest_check_page_state_range): -EPERM, same pfn or not.
    for pfn in (base, base + 1):
        with pytest.raises(PermissionDenied) as err:
            hv.guest_map(h, 0x1000, pfn)
        assert err.value.reason == "IPA_MAPPED"
    # A page shared with hyp (SHARED_OWNED, guest-share count 0): v6.14-v6.15 WARN_ON(1)
    # before -EPERM, which is fatal at EL2.
    hv.host_share(h, base + 2)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(WouldPanic) as panic:
        hv.guest_map(h, 0x2000, base + 2)
    assert panic.value.reason == "HOST_PAGE_SHARED_WITH_HYP"
    assert hv.canonical_dump(host_tables=True) == before
    hv.audit()
    hv.destroy_vm(h)
    assert states(hv, base) == (PageState.OWNED, PageState.NOPAGE)
    hv.audit()


def test_audit_refuses_a_page_both_guest_mapped_and_hyp_borrowed() -> None:
    hv = boot()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=16)
    hv.topup_memcache(vm.handle, 4)
    hv.guest_map(vm.handle, 0, vm.slice_base_pfn)
    hv.audit()
    # What the old guest_map allowed: hyp borrows the page too (and maps it at EL2).
    hv._hyp_shared[vm.slice_base_pfn] = vm.handle
    hv._vms[vm.handle].shared.add(vm.slice_base_pfn)
    hv.hyp_stage1.map_pages([vm.slice_base_pfn])
    with pytest.raises(AssertionError, match="both guest-mapped and hyp-borrowed"):
        hv.audit()


def _host_level3_entry(hv: Hypervisor, wanted: Callable[[tuple[int, ...]], bool]
                       ) -> tuple[dict[int, tuple[int, ...]], int]:
    """(the live entries of a host level-3 table, an index) of a pte `wanted` accepts."""
    pgt = hv.host_stage2.pgt
    for table, level, _n in pgt.table_pages():
        entries = pgt.entries(table)
        for index, pte in entries.items():
            if level == 3 and wanted(pte):
                return entries, index
    raise AssertionError("no such host leaf")


@pytest.mark.parametrize(("corrupt", "message"), [
    # a hyp-owned page (annotated) mapped by a valid host leaf instead
    ((ANNOTATED,), "maps hyp memory"),
    # a host page annotated as hyp's, though no hyp-owned range holds it
    ((LEAF, STATE_OWNED), "host annotations differ from hyp-owned memory"),
    # a host page left SHARED_OWNED though hyp does not borrow it
    ((LEAF, STATE_SHARED_OWNED), "host stage-2 shared pages differ"),
    # a host leaf in a state only a guest's leaves have
    ((LEAF, STATE_SHARED_BORROWED), "bad host page state"),
])
def test_audit_refuses_a_host_stage2_that_disagrees_with_ownership(
        corrupt: tuple[int, ...], message: str) -> None:
    """Section 5 of the audit, one corruption of a host level-3 entry at a time (the entry
    count stays, so only the ownership checks can see it)."""
    hv = boot()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=64)
    hv.host_share(vm.handle, vm.slice_base_pfn + 8, 2)  # SHARED_OWNED level-3 leaves
    hv.host_fault((vm.slice_base_pfn + 12) << hv.page_shift)  # an OWNED one beside them
    hv.audit()
    kind = corrupt[0]
    entries, index = _host_level3_entry(hv, lambda pte: pte[PTE_KIND] == kind and (
        kind == ANNOTATED or pte[PTE_STATE] == STATE_OWNED))
    original = entries[index]
    if kind == ANNOTATED:
        entries[index] = leaf_pte(0x1000, PROT_RWX)
    elif corrupt[1] == STATE_OWNED:
        entries[index] = (ANNOTATED, OWNER_HYP)
    else:
        entries[index] = leaf_pte(original[PTE_PFN], original[PTE_PROT], corrupt[1])
    with pytest.raises(AssertionError, match=message):
        hv.audit()
    entries[index] = original
    hv.audit()


# -- finding 5: page by page ------------------------------------------------------------------

def test_page_by_page_share_keeps_the_pages_before_the_refusal(
        hv_vm: tuple[Hypervisor, int, int]) -> None:
    """kvm_share_hyp loops one __pkvm_host_share_hyp per page and stops at the first error,
    leaving the earlier pages shared."""
    hv, h, base = hv_vm
    hv.host_share(h, base + 2)
    r = hv.host_share(h, base, 4, page_by_page=True)
    assert (r.pages_done, r.failed_pfn, r.failed_reason, r.failed_errno) == (
        2, base + 2, "HOST_PAGE_NOT_OWNED", "EPERM")
    assert [states(hv, base + i)[0] for i in range(4)] == [
        PageState.SHARED_OWNED, PageState.SHARED_OWNED, PageState.SHARED_OWNED,
        PageState.OWNED]
    r = hv.host_share(h, base + 3, 2, page_by_page=True)
    assert (r.pages_done, r.failed_pfn) == (2, None)
    hv.audit()


@pytest.mark.parametrize(("page_size", "levels", "leaf_table_bytes"), [
    ("4K", (1, 2, 3), 2 << 20),  # 48-bit VA: root level 0; a level-3 table maps 2 MiB
    ("16K", (1, 2, 3), 32 << 20),  # root level 0 (2 entries); level 3 maps 32 MiB
    ("64K", (2, 3), 512 << 20),  # root level 1; level 3 maps 512 MiB
])
def test_hyp_stage1_geometry(page_size: str, levels: tuple[int, ...],
                             leaf_table_bytes: int) -> None:
    """Tables below the root of a 48-bit hyp VA space (kvm_pgtable_hyp_init with
    hyp_va_bits 48), one entry per page of 8 bytes."""
    hv = boot(page_size=page_size, memblocks=["0x80000000:4G"])
    s1 = hv.hyp_stage1
    assert s1.table_levels == levels
    assert s1.span_pages[3] << hv.page_shift == leaf_table_bytes
    vm = hv.create_vm(nr_vcpus=1, slice_pages=1)
    taken = s1.table_pages()
    # The donated pages sit at 0x8000_0000, far from the carve-out at the top of RAM: with
    # 4K pages that needs a level-2 and a level-3 table (the level-1 table over the first
    # 512 GiB exists from boot); with 16K and 64K only a level-3 table (the level-2 table
    # over 64 GiB / 4 TiB holds the carve-out already).
    assert sorted(level for level, _entries in taken.values()) == (
        [2, 3] if page_size == "4K" else [3])
    hv.destroy_vm(vm.handle)
    assert s1.table_pages() == {}
    hv.audit()


def test_guest_share_leaves_the_host_stage2_alone() -> None:
    """From v6.14 the host's page states live in the hyp vmemmap (hyp_page.host_state):
    __pkvm_host_share_guest sets SHARED_OWNED there and maps nothing for a page the host
    owns, so a host block over the page is not split."""
    hv = boot(profile="v5.14", memblocks=["0x80000000:1G"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=2048)
    h = vm.handle
    hv.topup_memcache(h, 4)
    hv.guest_map(h, 0, vm.slice_base_pfn)  # the first map takes the refill
    block_pfn = -(-vm.slice_base_pfn // 512) * 512 + 512  # a 2 MiB block inside the slice
    fault = hv.host_fault(block_pfn << 12)
    assert fault.level <= 2  # the host maps it with a block
    leaves = [(m.start, m.end, m.level) for m in hv.host_stage2.pgt.mappings()]
    hv.guest_map(h, 0x1000, block_pfn + 5)
    assert [(m.start, m.end, m.level) for m in hv.host_stage2.pgt.mappings()] == leaves
    assert hv.page_info(block_pfn + 5).host_state is PageState.SHARED_OWNED
    with pytest.raises(PermissionDenied):  # shared with a guest: not OWNED for hyp
        hv.host_share(h, block_pfn + 5)
    hv.audit()
    hv.destroy_vm(h)
    assert hv.page_info(block_pfn + 5).host_state is PageState.OWNED
    hv.audit()


@pytest.mark.parametrize("profile", ["v6.18", "v7.3"])
def test_v6_16_rules_need_a_build(profile: str) -> None:
    """The 4K and 16K Debian builds of 6.18 and 7.3 are modelled (el2_boot.KERNEL_IMAGES):
    every operation is served. With 64K pages (no Debian build) nothing that needs the
    run-time rules is served: NOT_MODELLED, not another version's rules."""
    for page_size in ("4K", "16K"):
        hv = boot(profile=profile, page_size=page_size, memblocks=["0x40000000:1G"])
        assert hv.operations == set(Operation)
    hv64 = boot(profile=profile, page_size="64K", memblocks=["0x40000000:1G"])
    with pytest.raises(FailedPrecondition) as err:
        hv64.create_vm(nr_vcpus=1, slice_pages=1)
    assert err.value.reason == "NOT_MODELLED"
