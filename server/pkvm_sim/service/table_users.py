"""Which live VMs use a hyp stage-1 table: who pays for it once the VM that paid is gone.

EL2 keeps a run-time stage-1 table (taken from the hyp pool by pkvm_create_mappings_locked)
for as long as a page under it is mapped (kvm_pgtable_hyp_unmap frees it when its last
entry goes). Every page EL2 maps at run time is mapped on some VM's behalf:

- a page of the VM's slice the host shared with hyp (v6.1, v6.12: hyp_complete_share) or,
  from v6.16, pinned (hyp_pin_shared_mem): `Hypervisor.hyp_shared` names the VM;
- the host kernel's struct kvm and struct kvm_vcpu pages (kvm_share_hyp, v6.1 and v6.12;
  pinned by __pkvm_init_vm/__pkvm_init_vcpu from v6.16): `GuestVm.struct_pfns` (two VMs'
  vCPUs may share a slab page: both use it);
- the pages donated for the VM at its first run (struct pkvm_hyp_vm and vCPUs, the guest
  PGD: hyp_complete_donation) and its memcache pages EL2 took (pkvm_refill_memcache);
- v6.1's VMM FP/SIMD page (kvm_arch_vcpu_run_map_fp), shared while any VM has run: every
  VM that ran uses it.

This module reads the core through its read-only views and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from pkvm_sim.core.hyp_stage1 import HypStage1, Key
from pkvm_sim.core.hypervisor import Hypervisor


def va_offset_pages(stage1: HypStage1) -> int:
    """hyp VA page - pfn of the linear map (0 when tables are keyed by pfn)."""
    layout = stage1.va_layout
    return 0 if layout is None else layout.linear_page(0)


def table_key(stage1: HypStage1, pfn: int, level: int) -> Key:
    """The key of the level-`level` table on `pfn`'s walk (as HypStage1 keys its tables:
    (level, hyp VA page // pages the table spans))."""
    return level, (pfn + va_offset_pages(stage1)) // stage1.span_pages[level]


def pages_under(stage1: HypStage1, key: Key) -> range:
    """The pfns whose linear-map alias a table spans."""
    level, index = key
    span = stage1.span_pages[level]
    first = index * span - va_offset_pages(stage1)
    return range(first, first + span)


def mapped_under(stage1: HypStage1, key: Key) -> list[int]:
    """The pages EL2 maps under table `key` (walking the smaller of the span and the set)."""
    under = pages_under(stage1, key)
    mapped = stage1.mapped
    if len(mapped) < len(under):
        return sorted(pfn for pfn in mapped if pfn in under)
    return [pfn for pfn in under if pfn in mapped]


def users_of(hv: Hypervisor, keys: Iterable[Key]) -> dict[Key, list[int]]:
    """key -> the handles (ascending) of the live VMs on whose behalf EL2 maps a page
    under that table (see the module docstring); [] when none does."""
    stage1 = hv.hyp_stage1
    under = {key: mapped_under(stage1, key) for key in keys}
    shared = hv.hyp_shared
    others = {pfn for pfns in under.values() for pfn in pfns if pfn not in shared}
    kernel = _kernel_pages_users(hv, others) if others else {}
    users: dict[Key, list[int]] = {}
    for key, pfns in under.items():
        found: set[int] = set()
        for pfn in pfns:
            handle = shared.get(pfn)
            if handle is not None:
                found.add(handle)
            else:
                found.update(kernel.get(pfn, ()))
        users[key] = sorted(found)
    return users


def _kernel_pages_users(hv: Hypervisor, wanted: set[int]) -> dict[int, set[int]]:
    """pfn -> VMs, for the pages of `wanted` mapped for VMs but not as their shares."""
    found: dict[int, set[int]] = {}
    task_fp = hv.task_fp_pfn
    for handle, vm in hv.vm_table.items():
        pages: list[Iterable[int]] = [vm.struct_pfns, vm.hyp_memcache, vm.admitted]
        if vm.meta_pfn >= 0:
            pages.append(range(vm.meta_pfn, vm.meta_pfn + vm.meta_pages))
        if vm.pgd_base_pfn >= 0:
            pages.append(range(vm.pgd_base_pfn, vm.pgd_base_pfn + vm.pgd_pages))
        if vm.ran and task_fp is not None:
            pages.append((task_fp,))
        for group in pages:
            for pfn in group:
                if pfn in wanted:
                    found.setdefault(pfn, set()).add(handle)
    return found


def run_time_tables(stage1: HypStage1) -> dict[int, Key]:
    """table pfn -> key of every run-time table (taken from the hyp pool), by level then
    index."""
    return {pfn: (level, index) for level, index, pfn in stage1.dump()}
