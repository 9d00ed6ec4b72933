"""audit()'s stage-2 checks: each corruption of a stage-2's tables (section 2) or of a guest's
leaves (section 6) is refused, and the message says whose (the host's or which VM's)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.guest import GuestVm
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.pgtable import (
    LEAF,
    PTE_KIND,
    PTE_PFN,
    PTE_PROT,
    PTE_STATE,
    STATE_OWNED,
    TABLE,
    Pte,
    Stage2PageTable,
    leaf_pte,
)


def machine() -> tuple[Hypervisor, int]:
    hv = Hypervisor.boot(SimConfig.from_mapping({"memblocks": ["0x80000000:1G"]}))
    vm = hv.create_vm(nr_vcpus=1, slice_pages=2048)
    hv.host_share(vm.handle, vm.slice_base_pfn + 100)  # two 2 MiB regions apart: level-3
    hv.host_share(vm.handle, vm.slice_base_pfn + 1200)  # tables side by side in the host's
    hv.topup_memcache(vm.handle, 4)
    hv.guest_map(vm.handle, 1 << 30, vm.slice_base_pfn)
    hv.guest_map(vm.handle, 2 << 30, vm.slice_base_pfn + 1)
    hv.audit()
    return hv, vm.handle


def two_table_entries(pgt: Stage2PageTable) -> list[tuple[int, int]]:
    """(table pfn, index) of two TABLE entries of tables of one level (children of one
    level too, neither an ancestor of the other)."""
    by_level: dict[int, list[tuple[int, int]]] = {}
    for pfn, level, _n in pgt.table_pages():
        for index, pte in pgt.entries(pfn).items():
            if pte[PTE_KIND] == TABLE:
                by_level.setdefault(level, []).append((pfn, index))
    return next(entries[:2] for entries in by_level.values() if len(entries) >= 2)


@pytest.mark.parametrize("whose", ["host", "vm"])
def test_a_table_page_whose_refcount_drifted_is_refused(whose: str) -> None:
    hv, handle = machine()
    vm = hv.vm_table[handle]
    assert vm.pgt is not None and vm.pool is not None
    pgt, pool = (hv.host_stage2.pgt, hv.host_pools[0]) if whose == "host" else (vm.pgt, vm.pool)
    says = "host" if whose == "host" else f"vm {handle:#x}"
    for table, _level, _n in list(pgt.table_pages()):
        if not pool.contains(table):
            continue
        pool.get_page(table)
        with pytest.raises(AssertionError, match=f"{says}: table page {table:#x} has refcount"):
            hv.audit()
        pool.put_page(table)
    hv.audit()


@pytest.mark.parametrize("whose", ["host", "vm"])
def test_a_table_page_referenced_twice_is_refused(whose: str) -> None:
    """One TABLE entry made to point at another's child: the entry counts stay right, the
    child is reached twice."""
    hv, handle = machine()
    vm = hv.vm_table[handle]
    assert vm.pgt is not None
    pgt = hv.host_stage2.pgt if whose == "host" else vm.pgt
    (parent, index), (other_parent, other_index) = two_table_entries(pgt)
    entries = pgt.entries(parent)
    original = entries[index]
    entries[index] = pgt.entries(other_parent)[other_index]
    says = "host" if whose == "host" else f"vm {handle:#x}"
    with pytest.raises(AssertionError, match=f"{says}: table page 0x[0-9a-f]+ referenced twice"):
        hv.audit()
    entries[index] = original
    hv.audit()


@pytest.mark.parametrize(("corrupt", "says"), [
    # a guest leaf in a state only the host's leaves have
    (lambda pte, vm: leaf_pte(pte[PTE_PFN], pte[PTE_PROT], STATE_OWNED),
     "guest leaf at 0x[0-9a-f]+ is not a shared page"),
    # a guest leaf over a page of no slice of its VM
    (lambda pte, vm: leaf_pte(vm.slice_base_pfn + vm.slice_nr_pages, pte[PTE_PROT],
                              pte[PTE_STATE]), "maps pfn 0x[0-9a-f]+ outside its slice"),
    # a guest leaf moved to another page of its slice: the share counts no longer match
    (lambda pte, vm: leaf_pte(pte[PTE_PFN] + 5, pte[PTE_PROT], pte[PTE_STATE]),
     "guest share counts differ from guest leaves"),
])
def test_a_guest_leaf_that_disagrees_with_the_shares_is_refused(
        corrupt: Callable[[Pte, GuestVm], Pte], says: str) -> None:
    hv, handle = machine()
    vm = hv.vm_table[handle]
    assert vm.pgt is not None
    for table, level, _n in vm.pgt.table_pages():
        entries = vm.pgt.entries(table)
        leaves = [index for index, pte in entries.items() if pte[PTE_KIND] == LEAF]
        if level == 3 and leaves:
            break
    original = entries[leaves[0]]
    entries[leaves[0]] = corrupt(original, vm)
    with pytest.raises(AssertionError, match=f"VM {handle:#x}: {says}|{says}"):
        hv.audit()
    entries[leaves[0]] = original
    hv.audit()
