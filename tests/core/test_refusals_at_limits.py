"""Refusals at the limits change nothing (the Hypervisor rule) and are reported right.

Every public method completes or raises a PkvmError with `canonical_dump(host_tables=True)`
unchanged; the hyp_page refcount limit (A.1) is a WouldPanic (REFCOUNT_OVERFLOW) counted
once in `refcount_limit_hits`, whatever operation met it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import InvalidArgument, OutOfMemory, PkvmError, WouldPanic
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, PageState
from pkvm_sim.core.pgtable import RefcountLimit

P64K = 64 << 10
WINDOW = (0x8000_0000, 0xA000_0000)  # one 512 MiB level-3 table: half RAM, half MMIO


def boot(**values: Any) -> Hypervisor:
    return Hypervisor.boot(SimConfig.from_mapping(values))


def dump(hv: Hypervisor) -> str:
    return json.dumps(hv.canonical_dump(host_tables=True), sort_keys=True, default=str)


def hits(hv: Hypervisor) -> int:
    return hv.statistics().host_stage2.refcount_limit_hits


def assert_refused_unchanged(hv: Hypervisor, call: Any, exc: type[PkvmError],
                             reason: str) -> PkvmError:
    before = dump(hv)
    with pytest.raises(exc) as info:
        call()
    assert info.value.reason == reason
    assert dump(hv) == before
    hv.audit()
    return info.value


def layout2_64k() -> Hypervisor:
    hv = boot(page_size="64K", hyp_page_layout="2", memblocks=["0x80000000:256M"])
    assert hv.host_stage2.mm.refcount_max == 8191
    return hv


def fill_window(hv: Hypervisor, keep_zero: set[int]) -> int:
    """Fault pages of WINDOW (not those in keep_zero) until its table is at the limit."""
    pgt, mm = hv.host_stage2.pgt, hv.host_stage2.mm
    hv.host_fault(WINDOW[1] - P64K)
    _pte, level, table = pgt.lookup(WINDOW[0])
    assert level == 3
    for addr in range(WINDOW[0], WINDOW[1], P64K):
        if mm.page_count(table) >= mm.refcount_max:
            break
        if addr not in keep_zero:
            hv.host_fault(addr)
    assert mm.page_count(table) == mm.refcount_max
    for addr in keep_zero:
        assert pgt.lookup(addr) == (None, 3, table)
    return table


def test_create_vm_at_the_refcount_limit_is_a_clean_would_panic() -> None:
    """D1: the donation of the metadata page that needs a new entry is refused; the page
    before it (a host leaf, replaced in place) keeps its leaf: nothing changed."""
    hv = layout2_64k()
    base = hv.host_memory.free_ranges()[0][0] * P64K
    assert base == WINDOW[0]
    hv.host_fault(base)  # metadata page 0 of the next VM: a valid host leaf
    table = fill_window(hv, {base + P64K, base + 2 * P64K})
    leaf = hv.host_stage2.pgt.lookup(base)[0]
    err = assert_refused_unchanged(hv, lambda: hv.create_vm(nr_vcpus=2, slice_pages=1),
                                   RefcountLimit, "REFCOUNT_OVERFLOW")
    assert isinstance(err, WouldPanic) and err.would_panic
    assert hv.host_stage2.pgt.lookup(base)[0] == leaf
    assert hv.host_stage2.mm.page_count(table) == 8191
    assert hits(hv) == 1
    assert hv.vms() == []


def test_memcache_refill_at_the_refcount_limit_is_a_clean_would_panic() -> None:
    """The host's top-up only allocates (no host stage-2 change, so no limit to meet); the
    donation at EL2's refill (pkvm_refill_memcache -> __pkvm_host_donate_hyp) meets it."""
    hv = layout2_64k()
    vm = hv.create_vm(nr_vcpus=1, slice_pages=1)
    nxt = hv.host_memory.free_ranges()[0][0] * P64K
    fill_window(hv, {nxt})  # 8190 entries, refcount 8191: the one zero slot is nxt's
    tables = sorted(hv.host_stage2.pgt.table_pages())
    assert hv.topup_memcache(vm.handle, 1) == 1
    assert sorted(hv.host_stage2.pgt.table_pages()) == tables and hits(hv) == 0
    assert_refused_unchanged(hv, lambda: hv.guest_map(vm.handle, 0, vm.slice_base_pfn),
                             RefcountLimit, "REFCOUNT_OVERFLOW")
    assert hits(hv) == 1


def test_host_share_counts_new_table_entries_at_higher_levels() -> None:
    """D2: a 2-page share whose second page needs a TABLE entry in a full level-2 table is
    refused before the first page is remapped."""
    hv = boot(page_size="64K", hyp_page_layout="2", ia_bits=48,
              memblocks=["0x80000000:256M", "0xC0000000:2G"])
    hs2, pgt = hv.host_stage2, hv.host_stage2.pgt
    _base, n = hv.host_memory.free_ranges()[0]
    hv.create_vm(nr_vcpus=1, slice_pages=n - 3)  # fills the first memblock
    edge = 0xE000_0000  # a 512 MiB window nothing touched yet
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8192)  # its slice straddles edge
    assert vm.slice_base_pfn * P64K < edge < (vm.slice_base_pfn + 8192) * P64K
    _pte, level, t2 = pgt.lookup(edge)
    assert level == 2
    for w in range(0, 1 << 42, 512 << 20):
        if hs2.mm.page_count(t2) >= hs2.mm.refcount_max:
            break
        if w != edge:
            hv.host_fault(w)
    p1 = edge // P64K - 1
    hv.host_fault(p1 * P64K)
    assert_refused_unchanged(hv, lambda: hv.host_share(vm.handle, p1, 2), RefcountLimit,
                             "REFCOUNT_OVERFLOW")
    assert hs2.host_state(p1) is PageState.OWNED and p1 not in hv._hyp_shared
    assert hits(hv) == 1
    hv.host_share(vm.handle, p1, 1)  # the first page alone fits
    assert hits(hv) == 1


def test_guest_map_refusal_is_counted() -> None:
    """D4: the guest stage-2 meets the same limit; it is counted like the host's."""
    hv = boot(page_size="64K", hyp_page_layout="2", memblocks=["0x80000000:2G"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8192)
    hv.topup_memcache(vm.handle, 4)
    # The same two host pages at every IPA (a page shared with guests may be shared again:
    # __pkvm_host_share_guest), so only the guest's level-3 table fills up.
    for i in range(8190):  # one level-3 table: 8190 entries, refcount 8191
        hv.guest_map(vm.handle, i * P64K, vm.slice_base_pfn + i % 2)
    assert hits(hv) == 0
    assert_refused_unchanged(
        hv, lambda: hv.guest_map(vm.handle, 8190 * P64K, vm.slice_base_pfn),
        RefcountLimit, "REFCOUNT_OVERFLOW")
    assert hits(hv) == 1


def test_fault_refusal_is_counted_once() -> None:
    hv = layout2_64k()
    fill_window(hv, {WINDOW[0] + 0x1000_0000})
    r = hv.host_fault(WINDOW[0] + 0x1000_0000)
    assert r.outcome is FaultOutcome.FATAL and r.errno_name is None
    assert r.reason is not None and r.reason.startswith("REFCOUNT_OVERFLOW")
    assert (r.recycled, r.tables_allocated) == (False, 0)
    assert hits(hv) == 1


@pytest.mark.parametrize("pool", ["bogus", 7, None])
def test_alloc_pages_with_an_unknown_pool_is_invalid_argument(pool: Any) -> None:
    """D3"""
    hv = boot(memblocks=["0x80000000:64M"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=1)
    assert_refused_unchanged(hv, lambda: hv.alloc_pages(vm.handle, 0, pool), InvalidArgument,
                             "BAD_POOL")
    pfns, err = hv.alloc_pages_run(vm.handle, 0, pool, 3)
    assert pfns == [] and isinstance(err, InvalidArgument) and err.reason == "BAD_POOL"


def mmio_next_to_slice(mmio: bool = True) -> tuple[Hypervisor, int, list[int]]:
    """4K pages; a slice at 0x8030_0000; one MMIO page at 0x8020_0000 whose level-3 table
    [0x8020_0000, 0x8040_0000) holds nothing else; the host_s2 pool drained to 0 free."""
    hv = boot(memblocks=["0x40000000:16M", "0x80300000:64M"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8192)
    assert vm.slice_base_pfn == 0x80300
    if mmio:
        r = hv.map_mmio(0x8020_0000)
        assert (r.level, r.tables_allocated) == (3, 1)
    pool = hv.host_pools[0]
    drained = [pool.alloc_pages(0) for _ in range(pool.free_pages)]
    return hv, vm.handle, drained


def test_share_refused_when_the_recycle_would_not_help_keeps_mmio() -> None:
    """(a) 2 pages: 0x803ff sits in the MMIO page's table, 0x80400 needs a new one. The
    recycle would free that table (+1 page) but then both need one (2 > 1): refused, and
    the MMIO mapping stays (before: unmapped, then an assert on the half-done remap)."""
    hv, h, drained = mmio_next_to_slice()
    assert_refused_unchanged_drained(hv, lambda: hv.host_share(h, 0x803FF, 2), drained)
    assert hv.host_stage2.pgt.lookup(0x8020_0000)[0] is not None
    assert hv.statistics().host_stage2.mmio_recycles == 0


def assert_refused_unchanged_drained(hv: Hypervisor, call: Any, drained: list[int]) -> None:
    before = dump(hv)
    with pytest.raises(OutOfMemory) as info:
        call()
    assert info.value.reason == "POOL_EXHAUSTED"
    assert dump(hv) == before
    for pfn in drained:
        hv.host_pools[0].put_page(pfn)
    hv.audit()


def test_share_recycles_mmio_when_that_makes_it_fit() -> None:
    hv, h, drained = mmio_next_to_slice()
    hv.host_share(h, 0x80400, 1)  # one table needed, the recycle frees one
    assert hv.host_stage2.pgt.lookup(0x8020_0000)[0] is None
    assert hv.statistics().host_stage2.mmio_recycles == 1
    for pfn in drained:
        hv.host_pools[0].put_page(pfn)
    hv.audit()


def test_create_vm_and_topup_refused_on_an_empty_pool_change_nothing() -> None:
    """(b) donations are planned: no table page is taken, no annotation made, no recycle."""
    hv, h, drained = mmio_next_to_slice(mmio=False)
    # The next host pages follow VM 1's metadata at 0x4000_0000: 600 memcache pages, or
    # 512 vCPU structs, run into the next 2 MiB window, which needs a level-3 table.
    # The host's top-up only allocates: no host stage-2 table is needed for it.
    assert hv.topup_memcache(h, 600) == 600
    before = dump(hv)
    with pytest.raises(OutOfMemory) as info:
        hv.guest_map(h, 0, 0x80300)  # the slice page's new state and the refill need tables
    assert info.value.reason == "POOL_EXHAUSTED" and dump(hv) == before
    with pytest.raises(OutOfMemory) as info:
        hv.create_vm(nr_vcpus=512, slice_pages=1)
    assert info.value.reason == "POOL_EXHAUSTED" and dump(hv) == before
    assert hv.statistics().host_stage2.mmio_recycles == 0
    for pfn in drained:
        hv.host_pools[0].put_page(pfn)
    hv.audit()


def test_fault_tables_allocated_is_net_of_the_recycle() -> None:
    """(d) attempt 1 takes the last free page (a level-2 table) and fails; the recycle frees
    it and the MMIO page's table; the retry takes both again: 2 tables, not 3."""
    hv = boot(memblocks=["0x40000000:15M", "0x80300000:64M"])
    assert hv.map_mmio(0x8020_0000).tables_allocated == 1
    pool = hv.host_pools[0]
    drained = [pool.alloc_pages(0) for _ in range(pool.free_pages - 1)]
    r = hv.map_mmio(0x40F0_0000)  # page-level: needs a level-2 and a level-3 table
    assert (r.outcome, r.level, r.recycled, r.recycled_pages) == (FaultOutcome.MAPPED, 3,
                                                                  True, 2)
    assert r.tables_allocated == 2
    for pfn in drained:
        pool.put_page(pfn)
    hv.audit()


def test_guest_map_refused_at_the_refcount_limit_changes_nothing() -> None:
    """64K pages and the 2-byte hyp_page (13-bit refcount, max 8191): a guest level-3 table
    holds 8192 entries, so the 8191st leaf in one table would need refcount 8192. The map
    is planned before the first change (as the host side is): the host page stays OWNED,
    the memcache is not refilled, and audit() passes. One host page is mapped at every IPA
    (a page shared with guests may be shared again), so the host stage-2 gains one leaf."""
    hv = boot(profile="v5.14", page_size="64K", hyp_page_layout="2",
              memblocks=["0x80000000:2G"])
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8192)
    hv.topup_memcache(vm.handle, 4)
    limit = hv.vmemmap.layout.refcount_max  # 8191: a table can hold 8190 entries
    for i in range(limit - 1):
        hv.guest_map(vm.handle, i * P64K, vm.slice_base_pfn)
    hv.topup_memcache(vm.handle, 4)
    pfn = vm.slice_base_pfn + 1
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(RefcountLimit):
        hv.guest_map(vm.handle, (limit - 1) * P64K, pfn)
    assert hv.canonical_dump(host_tables=True) == before
    assert hv.page_info(pfn).host_state is PageState.OWNED
    hv.audit()
