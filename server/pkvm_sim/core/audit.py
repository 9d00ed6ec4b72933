"""Whole-machine invariants (docs/model.md, section 9): what `Hypervisor.audit()` proves.

1. Every pool obeys 2.2 and free + allocated + reserved == its pages.
2. Every table page (host and guest stage-2, PGD pages included) has refcount 1 + non-zero
   entries, is an order-0 page held in the right pool, and is referenced once.
3. Every held page of a host stage-2 pool is a table page; every held block of the hyp pool
   is owned by a VM or is an EL2 stage-1 table page (counted: refcount 1 + entries, entries
   recomputed from the pages hyp maps); every held page of a VM pool is a guest table page
   or a VM's block.
4. Host RAM is partitioned exactly: carve-out, free host RAM, and host allocations (slices,
   donated metadata/PGD/memcache pages, host memcache pages) cover every memblock page once.
5. The host's owner annotations cover exactly what hyp owns (carve-out and donated pages)
   and no valid host mapping touches it; EL2's stage-1 maps exactly the hyp-borrowed and
   donated pages.
6. Every host SHARED_OWNED page-level leaf is borrowed by hyp or shared with guests, never
   both (no kernel allows a page both guest-mapped and hyp-borrowed: __pkvm_host_share_hyp
   needs OWNED, __pkvm_host_share_guest refuses a page shared with hyp); each page's guest
   share count equals the guest leaves mapping it; pins are only on shared pages and equal
   the vmemmap refcounts.
7. Simulated memory holds something only in table pages and memcache pages.

Cost: O(pool pages + mappings): for tests and on-demand checks, never on the hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .host_memory import HOST_OWNED_TAGS
from .model import PoolKind
from .pgtable import (
    ANNOTATED,
    LEAF,
    PTE_KIND,
    PTE_PFN,
    PTE_STATE,
    STATE_OWNED,
    STATE_SHARED_BORROWED,
    STATE_SHARED_OWNED,
    Stage2PageTable,
)
from .profiles import Operation

if TYPE_CHECKING:
    from .hyp_pool import HypPool
    from .hypervisor import Hypervisor


def audit(hv: Hypervisor) -> None:
    for pool in hv.pools():
        pool.check_invariants()
        st = pool.statistics()
        assert st.free_pages + st.allocated_pages + st.reserved_pages == st.total_pages, \
            f"pool {pool.name}: pages do not add up"

    # 2 + 3: host stage-2 tables and pools.
    host_tables = _check_tables(hv.host_stage2.pgt, None)
    held = {pfn: (rc, order) for pool in hv.host_pools for pfn, rc, order in pool.held_blocks()}
    assert set(held) == set(host_tables), (
        f"host_s2 pages held but not tables: {sorted(set(held) - set(host_tables))[:8]},"
        f" tables not held: {sorted(set(host_tables) - set(held))[:8]}"
    )
    assert all(order == 0 for _rc, order in held.values()), "a host table block is not order 0"

    hyp_held = {pfn for pfn, _rc, _o in hv.hyp_pool.held_blocks()}
    owned_hyp = {pfn for pfn, (_h, kind) in hv.owners.items() if kind is PoolKind.HYP}
    s1_tables = hv.hyp_stage1.table_pages()
    assert not owned_hyp & set(s1_tables), "a VM's block is also a hyp stage-1 table"
    boot_tables = set(hv.hyp_stage1.pool_boot_tables.values())
    assert not boot_tables & (owned_hyp | set(s1_tables)), "a boot table is also held otherwise"
    assert hyp_held == owned_hyp | set(s1_tables) | boot_tables, \
        "hyp pool blocks differ from VM ownership records + hyp stage-1 tables"
    expected = hv.hyp_stage1.expected_entries()
    for pfn, (_level, entries) in s1_tables.items():
        assert hv.hyp_pool.page_order(pfn) == 0, f"hyp stage-1 table {pfn:#x} is not order 0"
        assert entries == expected[pfn] > 0, \
            f"hyp stage-1 table {pfn:#x}: refcount says {entries} entries, {expected[pfn]} mapped"

    table_pfns = set(host_tables)
    hm = hv.host_memory
    for pfn, (h, _kind) in hv.owners.items():
        assert h in hv.vm_table, f"block {pfn:#x} owned by a destroyed VM"
    vm_owned_by_handle: dict[int, set[int]] = {}  # one pass over the owners, not one per VM
    for pfn, (h, kind) in hv.owners.items():
        if kind is PoolKind.VM:
            vm_owned_by_handle.setdefault(h, set()).add(pfn)
    for handle, vm in hv.vm_table.items():
        alloc = hm.allocations.get(vm.slice_base_pfn)
        assert alloc is not None and alloc.owner == f"slice:{handle}"
        for pfn in vm.struct_pfns:
            alloc = hm.allocation_at(pfn)
            assert alloc is not None and alloc.owner.startswith("slab:")
            assert pfn in hv.kernel_shared, f"struct page {pfn:#x} of VM {handle:#x} not shared"
        if vm.pool is None:
            assert (Operation.VMS not in hv.operations or not vm.ran) and vm.pgt is None
            continue
        assert vm.pgt is not None
        tables = _check_tables(vm.pgt, handle)
        assert not set(tables) & table_pfns, "a table page is used twice"
        table_pfns |= set(tables)
        vm_held = {pfn for pfn, _rc, _o in vm.pool.held_blocks()}
        vm_owned = vm_owned_by_handle.get(handle, set())
        assert vm_held == set(tables) | vm_owned, f"VM {handle:#x} pool holds stray pages"
        assert all(_pool_has(vm.pool, pfn) for pfn in tables)
        caches = (vm.memcache, vm.hyp_memcache, vm.admitted)
        assert sum(map(len, caches)) == len(set().union(*caches)), "a memcache page twice"
        donated_memcache, host_memcache = f"memcache:{handle}", f"hostmc:{handle}"
        for pfn in vm.hyp_memcache + vm.admitted:
            alloc = hm.allocations.get(pfn)
            assert alloc is not None and alloc.owner == donated_memcache
        for pfn in vm.memcache:
            alloc = hm.allocations.get(pfn)
            assert alloc is not None and alloc.owner == host_memcache
        for base, owner in ((vm.meta_pfn, "meta"), (vm.pgd_base_pfn, "pgd"),
                            (vm.slice_base_pfn, "slice")):
            alloc = hm.allocations.get(base)
            assert alloc is not None and alloc.owner == f"{owner}:{handle}"

    # 4: host RAM partition.
    hm.check_invariants()
    lay = hv.carveout
    total = sum(b.size for b in hv.config.memblocks) >> hv.page_shift
    allocated = sum(a.nr_pages for a in hm.allocations.values())
    assert hm.free_pages + allocated + lay.nr_pages == total, "host RAM pages do not add up"
    for owner in {a.owner.split(":")[1] for a in hm.allocations.values()
                  if not a.owner.startswith(("task:", "slab:", "boot:"))}:
        assert int(owner) in hv.vm_table, f"host allocation for a destroyed VM {owner}"
    task_pages = {a.base_pfn for a in hm.allocations.values() if a.owner.startswith("task:")}
    assert task_pages == ({hv.task_fp_pfn} if hv.task_fp_pfn is not None else set())
    struct_refs: dict[int, int] = {}
    for vm in hv.vm_table.values():
        for pfn in vm.struct_pfns:
            struct_refs[pfn] = struct_refs.get(pfn, 0) + 1
    if hv.task_fp_pfn is not None:
        struct_refs[hv.task_fp_pfn] = sum(1 for vm in hv.vm_table.values() if vm.ran)
    assert struct_refs == hv.kernel_shared, "kernel share counts differ from the structs"
    slabs: dict[str, dict[int, set[int]]] = {}
    for vm in hv.vm_table.values():
        for name, base, index in vm.slab_objects:
            slots = slabs.setdefault(name, {}).setdefault(base, set())
            assert index not in slots, f"slab slot {base:#x}/{index} used twice"
            slots.add(index)
    assert slabs == hv.slabs, "the slab index differs from the VMs' objects"
    slab_pages = {a.base_pfn for a in hm.allocations.values() if a.owner.startswith("slab:")}
    assert slab_pages == {base for cache in slabs.values() for base in cache}, \
        "slab pages differ from the slabs in use"

    # 5: annotations == hyp-owned memory; no valid host leaf touches it.
    shift = hv.page_shift
    hyp_owned = [(lay.base_pfn << shift, (lay.base_pfn + lay.nr_pages) << shift)]
    donated = [a for a in hm.allocations.values() if not a.owner.startswith(HOST_OWNED_TAGS)]
    hyp_owned += [(a.base_pfn << shift, a.end_pfn << shift) for a in donated]
    hyp_runs = _merge(hyp_owned)
    run_starts, run_ends = [s for s, _e in hyp_runs], [e for _s, e in hyp_runs]
    # The walk is in address order, so the leaves' starts increase: the first hyp run
    # that ends after a leaf's start only moves forward, and the annotations are merged into
    # runs (as _merge would) as they come.
    annotated_starts: list[int] = []
    annotated_ends: list[int] = []
    shared_host: set[int] = set()
    run = 0
    host_pgt = hv.host_stage2.pgt
    leaves = host_pgt.leaf_columns()
    for start, level, pte in zip(leaves.starts, leaves.levels, leaves.ptes, strict=True):
        end = start + host_pgt.granule(level)
        if pte[PTE_KIND] == ANNOTATED:
            if annotated_ends and start <= annotated_ends[-1]:
                annotated_ends[-1] = max(annotated_ends[-1], end)
            else:
                annotated_starts.append(start)
                annotated_ends.append(end)
            continue
        assert pte[PTE_KIND] == LEAF
        while run < len(run_ends) and run_ends[run] <= start:
            run += 1
        assert run == len(run_starts) or end <= run_starts[run], \
            f"host leaf [{start:#x}, {end:#x}) maps hyp memory"
        if pte[PTE_STATE] != STATE_OWNED:
            assert pte[PTE_STATE] == STATE_SHARED_OWNED and level == 3, "bad host page state"
            shared_host.add(start >> shift)
    assert annotated_starts == run_starts and annotated_ends == run_ends, \
        "host annotations differ from hyp-owned memory"

    hyp_mapped = set(hv.hyp_shared) | set(hv.kernel_shared)
    if hv.pins_map:  # v6.16+: EL2 maps a shared page only while it is pinned
        hyp_mapped = {pfn for pfn in hyp_mapped if hv.vmemmap.refcount(pfn)}
        struct_pins: dict[int, int] = {}
        for vm in hv.vm_table.values():
            if vm.pool is not None:  # at EL2: __pkvm_init_vm/_vcpu pinned its structs
                for pfn in vm.struct_pfns:
                    struct_pins[pfn] = struct_pins.get(pfn, 0) + 1
        for pfn in hv.kernel_shared:
            assert hv.vmemmap.refcount(pfn) == struct_pins.get(pfn, 0), \
                f"pin count of struct page {pfn:#x} drifted"
    for a in donated:
        hyp_mapped.update(range(a.base_pfn, a.base_pfn + a.nr_pages))
    assert hv.hyp_stage1.mapped == hyp_mapped, \
        "EL2's stage-1 does not map exactly the hyp-borrowed and donated pages"

    # 6: sharing.
    both = set(hv.hyp_shared) & set(hv.guest_shared)
    assert not both, f"pages both guest-mapped and hyp-borrowed: {sorted(both)[:8]}"
    # Guest shares keep the host state in the vmemmap (v6.14+), not in host stage-2 leaves.
    assert shared_host == set(hv.hyp_shared) | set(hv.kernel_shared), \
        "host stage-2 shared pages differ from the pages hyp borrows"
    guest_leaves: dict[int, int] = {}
    for handle, vm in hv.vm_table.items():
        if vm.pgt is None:
            continue
        leaves = vm.pgt.leaf_columns()
        for start, level, pte in zip(leaves.starts, leaves.levels, leaves.ptes, strict=True):
            assert level == 3 and pte[PTE_STATE] == STATE_SHARED_BORROWED, \
                f"VM {handle:#x}: guest leaf at {start:#x} is not a shared page"
            pfn = pte[PTE_PFN]
            assert vm.in_slice(pfn), f"VM {handle:#x} maps pfn {pfn:#x} outside its slice"
            guest_leaves[pfn] = guest_leaves.get(pfn, 0) + 1
    assert guest_leaves == hv.guest_shared, "guest share counts differ from guest leaves"
    for pfn, handle in hv.hyp_shared.items():
        vm = hv.vm_table[handle]
        assert pfn in vm.shared and vm.in_slice(pfn)
    for vm in hv.vm_table.values():
        assert set(vm.pins) <= vm.shared, "a pinned page is not shared"
        for pfn, count in vm.pins.items():
            assert hv.vmemmap.refcount(pfn) == count, f"pin count of {pfn:#x} drifted"

    # 7: simulated memory.
    memcache = {pfn for vm in hv.vm_table.values() for pfn in vm.memcache + vm.hyp_memcache}
    for pfn in hv.physmem.written_pfns():
        assert pfn in table_pfns or pfn in memcache, f"page {pfn:#x} is dirty for no reason"


def _pool_has(pool: HypPool, pfn: int) -> bool:
    return pool.contains(pfn)


def _check_tables(pgt: Stage2PageTable, handle: int | None) -> dict[int, int]:
    """{table pfn: level} of the host's (handle None) or a VM's stage-2; asserts the
    refcount rule and single reference."""
    seen: dict[int, int] = {}
    mm_ops = pgt.mm_ops
    for pfn, level, n in pgt.table_pages():
        assert pfn not in seen, f"{_owner(handle)}: table page {pfn:#x} referenced twice"
        seen[pfn] = level
        count = mm_ops.page_count(pfn)
        assert count == 1 + n, \
            f"{_owner(handle)}: table page {pfn:#x} has refcount {count}, {n} entries"
    return seen


def _owner(handle: int | None) -> str:
    return "host" if handle is None else f"vm {handle:#x}"


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]
