"""A protected guest VM at EL2: its pool, its stage-2 and its memcaches (docs/stage2.md, VMs).

    host RAM                                   EL2
    ---------                                  ---
    slice (the VMM's memory, host-owned) ----> may be shared with hyp, or shared with the
                                               guest (__pkvm_host_share_guest, v6.14+)
    metadata pages (VM + vCPU structs) ------> donated: hyp-owned on the VM's behalf
    PGD pages (size from VTCR) -------------> donated: vm.pool := hyp_pool_init over them,
                                               then the guest PGD is allocated back out of it
    host memcache pages (top-ups) -----------> stay host-owned until EL2 refills its own
                                               memcache at the next guest map
                                               (pkvm_refill_memcache): donated one at a time

The two memcaches are stacks, as in the kernel (push_hyp_memcache / pop_hyp_memcache):
`memcache` is the host's (top = last pushed), `hyp_memcache` is EL2's. A refill pops the
host's top and pushes it on EL2's until EL2 holds as many pages as the host had
(refill_memcache with min_pages = the host's nr_pages), so the host's first page ends on
top of EL2's stack: pages are used first in, first out.

Table pages for the guest stage-2 (guest_s2_zalloc_page): first alloc(vm.pool, 0); if the
pool is empty, pop one page from EL2's memcache, zero it and admit it (refcount 1, order 0,
never coalesced). Pages freed to 0 go back to vm.pool. Teardown returns everything (see
Hypervisor.destroy_vm).

VM pools use the v5.17 max_order formula whatever the configuration says: with the v5.14
formula a 2-page pool could not hold its own 2-page PGD (orders 0..0 only) and a 1-page pool
could not exist at all; VM pools only exist from v6.2 on, where the fix is in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import WouldPanic
from .hyp_pool import HypPool
from .pgtable import Stage2PageTable
from .physmem import PhysicalMemory
from .state_values import IntsIn, decode_value, put_list, put_pairs


class GuestMmOps:
    """mm_ops of a guest stage-2: vm.pool first, then the memcache."""

    def __init__(self, vm: GuestVm, physmem: PhysicalMemory, refcount_max: int) -> None:
        self.vm = vm
        self.physmem = physmem
        self._refcount_max = refcount_max
        self.allocated = 0

    @property
    def refcount_max(self) -> int:
        return self._refcount_max

    @property
    def pool(self) -> HypPool:
        assert self.vm.pool is not None
        return self.vm.pool

    def zalloc_page(self) -> int | None:
        vm = self.vm
        pfn = self.pool.try_alloc_pages(0)
        if pfn is None and vm.hyp_memcache:
            pfn = vm.hyp_memcache.pop()
            self.physmem.zero_range(pfn, 1)  # the memcache "next" link
            self.pool.admit_page(pfn)
            vm.admitted.append(pfn)
        if pfn is not None:
            self.allocated += 1
        return pfn

    def get_page(self, pfn: int) -> int:
        return self.pool.get_page(pfn)

    def put_page(self, pfn: int) -> int:
        return self.pool.put_page(pfn)

    def page_count(self, pfn: int) -> int:
        return self.pool.refcount(pfn)


@dataclass(kw_only=True)
class GuestVm:
    """struct pkvm_hyp_vm, reduced to what the memory manager needs (built by keyword). A VM
    without EL2 state (vmemmap coverage 'carveout') has only its identity and slice: no
    metadata (meta_pfn -1), no PGD (pgd_base_pfn -1), no pool."""

    handle: int
    vmid: int
    name: str
    nr_vcpus: int
    slice_base_pfn: int
    slice_nr_pages: int
    meta_pfn: int = -1
    meta_pages: int = 0
    pgd_base_pfn: int = -1
    pgd_pages: int = 0
    pool: HypPool | None = None  # None with vmemmap coverage 'carveout': no EL2 VM state
    pgt: Stage2PageTable | None = None
    mm: GuestMmOps | None = None
    memcache: list[int] = field(default_factory=list)  # the host's memcache, top = last
    hyp_memcache: list[int] = field(default_factory=list)  # EL2's (donated), top = last
    admitted: list[int] = field(default_factory=list)  # memcache pages now in vm.pool
    shared: set[int] = field(default_factory=set)  # slice pfns shared with hyp
    pins: dict[int, int] = field(default_factory=dict)  # slice pfn -> pin count
    # host pages of struct kvm and each struct kvm_vcpu, shared with hyp (v6.1, v6.12)
    struct_pfns: list[int] = field(default_factory=list)
    # its slab objects (cache name, slab base pfn, slot): struct kvm, then each kvm_vcpu
    slab_objects: list[tuple[str, int, int]] = field(default_factory=list)
    ran: bool = False  # its vCPUs ran once (v6.2+: the VM exists at EL2 from then on)

    # -- state (core/state_file.py) ------------------------------------------------------------

    def state(self, out: list[int]) -> dict[str, Any]:
        """The VM for a state file: its scalar fields and slab objects as JSON values
        (state_values), in field order; its page lists (_PACKED_FIELDS, in that order, the
        pins as pairs) appended to `out`, then its pool's free lists. The objects rebuilt
        on restore (pool, pgt, mm) are saved by what they hold: the pool's geometry, the
        PGD pages and the count of table pages the guest stage-2 took."""
        put_list(out, self.memcache)
        put_list(out, self.hyp_memcache)
        put_list(out, self.admitted)
        put_list(out, sorted(self.shared))
        put_pairs(out, self.pins)
        put_list(out, self.struct_pfns)
        return {
            "handle": self.handle, "vmid": self.vmid, "name": self.name,
            "nr_vcpus": self.nr_vcpus, "slice_base_pfn": self.slice_base_pfn,
            "slice_nr_pages": self.slice_nr_pages, "meta_pfn": self.meta_pfn,
            "meta_pages": self.meta_pages, "pgd_base_pfn": self.pgd_base_pfn,
            "pgd_pages": self.pgd_pages,
            "slab_objects": {"l": [[name, base, index]
                                   for name, base, index in self.slab_objects]},
            "ran": self.ran,
            "pool": None if self.pool is None else self.pool.state(out),
            "pgd_pfns": None if self.pgt is None else list(self.pgt.pgd_pfns),
            "tables_allocated": None if self.mm is None else self.mm.allocated,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], ints: IntsIn | None = None) -> GuestVm:
        """A VM with `state()`'s fields, without pool, tables or mm (Hypervisor rebuilds
        them); `ints` is the "vms" stream of a version-2 file, None for version 1 (where
        every field is a JSON value). A field a file lacks (written before the field
        existed) keeps its default; a field this VM does not have is refused."""
        unknown = state.keys() - _STATE_KEYS
        if unknown:
            raise ValueError(f"unknown VM fields {sorted(unknown)}")
        if ints is None:
            values = {name: decode_value(state[name]) for name in _FIELD_NAMES if name in state}
            return cls(**values)
        # Version 2: the scalars are themselves (decode_value would give them back as they
        # are), the slab objects in the value encoding, the page lists in the stream.
        values = {name: state[name] for name in _SCALAR_FIELDS if name in state}
        return cls(**values, slab_objects=decode_value(state["slab_objects"]),
                   memcache=ints.take_list(), hyp_memcache=ints.take_list(),
                   admitted=ints.take_list(), shared=set(ints.take_list()),
                   pins=dict(ints.take_pairs()), struct_pfns=ints.take_list())

    @property
    def donated_pages(self) -> int:
        return self.meta_pages + self.pgd_pages

    def in_slice(self, pfn: int, nr_pages: int = 1) -> bool:
        return (self.slice_base_pfn <= pfn
                and pfn + nr_pages <= self.slice_base_pfn + self.slice_nr_pages)

    def refill_pages(self) -> list[int]:
        """The host pages EL2's next refill moves, in order (refill_memcache: pop the host's
        top until EL2 holds as many pages as the host had when it started)."""
        nr = max(0, len(self.memcache) - len(self.hyp_memcache))
        return self.memcache[::-1][:nr]

    def require_table_pages(self, need: int, refill: int) -> None:
        """WouldPanic unless vm.pool, EL2's memcache and the coming refill hold `need`
        pages: v6.14 __pkvm_host_share_guest maps under WARN_ON, fatal at EL2."""
        assert self.pool is not None
        have = self.pool.free_pages + len(self.hyp_memcache) + refill
        if need > have:
            raise WouldPanic(
                f"VM {self.handle:#x}: the guest map needs {need} table page(s), the VM pool"
                f" has {self.pool.free_pages} free, EL2's memcache {len(self.hyp_memcache)}"
                f" and the refill would add {refill}: EL2 would WARN (fatal); top up the"
                " memcache first",
                reason="MEMCACHE_EMPTY",
            )


# The fields a state file holds by value (the objects pool, pgt and mm are rebuilt); since
# format version 2 those of _PACKED_FIELDS are in the "vms" stream, not in JSON.
_FIELD_NAMES = ("handle", "vmid", "name", "nr_vcpus", "slice_base_pfn", "slice_nr_pages",
                "meta_pfn", "meta_pages", "pgd_base_pfn", "pgd_pages", "memcache",
                "hyp_memcache", "admitted", "shared", "pins", "struct_pfns", "slab_objects",
                "ran")
_PACKED_FIELDS = ("memcache", "hyp_memcache", "admitted", "shared", "pins", "struct_pfns")
_SCALAR_FIELDS = tuple(name for name in _FIELD_NAMES
                       if name not in _PACKED_FIELDS and name != "slab_objects")
# Every key a VM's state may have: its fields, and what rebuilds its pool, tables and mm.
_STATE_KEYS = frozenset(_FIELD_NAMES) | {"pool", "pgd_pfns", "tables_allocated"}
