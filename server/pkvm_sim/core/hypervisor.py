"""The booted simulated hypervisor: the one object the service, tools and tests drive.

`Hypervisor.boot(config)` does what the kernel does at KVM init (docs/reservation.md,
3.7): compute and place the carve-out, carve the vmemmap and the pools out of it, build the
vmemmap for the configured coverage, create the host stage-2 with its PGD allocated from its
pool, and annotate everything the hypervisor owns so the host can never map it.

This class is not thread-safe and takes no locks: callers serialise every call (the service
holds one lock around each request or batch, docs/service.md). Every public method either
completes or raises a `PkvmError` subclass and leaves the state exactly as it was. (One
documented exception, kernel behaviour: a host fault that fails with -ENOMEM even after
recycling MMIO is reported FATAL and keeps the partial page-table edits of 3.5.)

Clients are VMs (A.4): per-VM operations take the acting VM's `handle`; a VM may only put,
get, share, unshare or map what it owns or what lies in its slice of host RAM.

Who owns a page (what `audit` proves, and what `page_info` reports):

    carve-out   vmemmap slice, slack                  hyp
                hyp pool / host_s2 pool(s) pages       free, hyp (tables), or vm:<h> (blocks
                                                       a VM allocated with alloc_pages)
    host RAM    free or a VM's slice                   host
                VM metadata, PGD, memcache pages       vm:<h> (donated: hyp-owned for the VM;
                                                       PGD and admitted memcache pages are
                                                       vm/<h> pool pages: free or tables)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from .config import SimConfig
from .el2_boot import kernel_image_for, machine_boot
from .errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    OutOfRange,
    PermissionDenied,
    PkvmError,
    WouldPanic,
)
from .guest import GuestMmOps, GuestVm
from .host_kernel import SLAB_GROUP, SlabCache, kvm_struct_cache, object_pfns, vcpu_cache
from .host_memory import HOST_OWNED_TAGS, HostMemory
from .host_stage2 import HostStage2
from .hyp_pool import HypPool, get_order
from .hyp_stage1 import HypStage1
from .layout import ceil_div, effective_max_order
from .model import (
    FaultResult,
    GuestMapResult,
    HypervisorStatistics,
    PageInfo,
    PageState,
    PoolKind,
    ShareResult,
    TeardownResult,
    VmemmapStatistics,
    VmInfo,
)
from .pgtable import (
    ANNOTATED,
    LEAF,
    OK,
    OWNER_HOST,
    OWNER_HYP,
    PROT_RWX,
    PTE_KIND,
    PTE_OWNER,
    PTE_PFN,
    PTE_PROT,
    PTE_STATE,
    STATE_OWNED,
    STATE_SHARED_BORROWED,
    STATE_SHARED_OWNED,
    Stage2PageTable,
    leaf_pte,
    pgd_geometry,
)
from .physmem import PhysicalMemory
from .profiles import FIRST_KERNEL, KVM_MAX_PVMS, Operation
from .reservation import CarveoutLayout, Reservation, compute_reservation, partition_carveout
from .state_values import (
    PAGE_JSON,
    STREAMS,
    IntsIn,
    SparseBytes,
    decode_page,
    encode_value,
    put_list,
    put_pairs,
    put_table_page,
)
from .vmemmap import Vmemmap

VM_HANDLE_OFFSET = 0x1000  # the first handle; the kernel's is table index + 0x1000
# Client VMs without EL2 state (profiles without Operation.VMS) and VMs of profiles that
# reserve no hyp VM table are the service's own records: at most this many. VMs at EL2 of a
# profile with a VM table live in it: vm_table_entries (KVM_MAX_PVMS, 255, in v6.12).
MAX_VMS = 4096
PKVM_HYP_VM_BYTES = 1024  # struct pkvm_hyp_vm without the vCPU pointer array (illustrative)
PKVM_HYP_VCPU_BYTES = 4096  # struct pkvm_hyp_vcpu (illustrative), donated per vCPU
MAX_VCPUS = 512

# Page-by-page operations (share, unshare, pin, unpin, memcache top-up) take at most this many
# pages per call. The kernel's hypercalls take one page at a time; the bound keeps any one
# request's time under the simulator lock short (about 40 ms), so no client can stall the
# others for seconds. Callers loop for more.
MAX_PAGES_PER_CALL = 4096
# hyp_page.host_share_guest_count is a u32 (v6.14+); v6.16+ refuses -EBUSY at its maximum.
U32_MAX = 2**32 - 1


class Hypervisor:
    """The simulated pKVM EL2 memory manager of one machine."""

    def __init__(self, config: SimConfig, reservation: Reservation, layout: CarveoutLayout,
                 vmemmap: Vmemmap, physmem: PhysicalMemory, hyp_pool: HypPool,
                 host_pools: list[HypPool], host_stage2: HostStage2,
                 host_memory: HostMemory, hyp_stage1: HypStage1 | None = None) -> None:
        """Use `Hypervisor.boot(config)`."""
        self.config = config
        self.reservation = reservation
        self.carveout = layout
        self.vmemmap = vmemmap
        self.physmem = physmem
        self.hyp_pool = hyp_pool
        self.host_pools = host_pools
        self.host_stage2 = host_stage2
        self.host_memory = host_memory
        self.geometry = config.geometry
        self.page_size = self.geometry.page_size
        self.page_shift = self.geometry.page_shift
        self.max_order = effective_max_order(self.geometry, config.layout)
        self._vms: dict[int, GuestVm] = {}  # handle -> VM
        self._owners: dict[int, tuple[int, PoolKind]] = {}  # block head -> (handle, pool)
        self._hyp_shared: dict[int, int] = {}  # pfn -> handle: hyp SHARED_BORROWED pages
        self._guest_shared: dict[int, int] = {}  # pfn -> host_share_guest_count (v6.14+)
        # Host-kernel pages shared with hyp (struct kvm, kvm_vcpu, the VMM task's FP state):
        # pfn -> share_pfn_hyp count. Only v6.1/v6.12 machines (a modelled build) have them.
        self._kernel_shared: dict[int, int] = {}
        self._task_fp_pfn: int | None = None
        # The host's slab caches of KVM structs: cache name -> slab base pfn -> slots in use
        # (derived from the VMs' slab_objects: rebuild_slabs after a restore).
        self.slabs: dict[str, dict[int, set[int]]] = {}
        self._partial_slabs: dict[str, set[int]] = {}  # slabs with a free slot, per cache
        self.build = kernel_image_for(config.profile.value, config.page_size)
        # What this profile serves (registry): a missing operation is NOT_IN_PROFILE. An
        # operation whose rules need the build's sizes (v6.18, v7.3) is served where the
        # build is modelled (el2_boot.KERNEL_IMAGES) and refused NOT_MODELLED elsewhere.
        kernel = config.kernel
        self.operations = kernel.operations(config.vmemmap_coverage)
        self.unmodelled_operations = kernel.unmodelled_operations
        if self.build is not None:
            self.operations |= kernel.native_operations() & kernel.unmodelled_operations
            self.unmodelled_operations = frozenset()
        # EL2's stage-1: its boot tables and those over pages it maps at their alias
        # (shares, donations).
        self.hyp_stage1 = hyp_stage1 or HypStage1(
            self.page_shift, hyp_pool, [(layout.base_pfn, layout.base_pfn + layout.nr_pages)])
        # VMs ever created: the next handle is VM_HANDLE_OFFSET + this, so a handle is never
        # reused within one machine's lifetime (saved with it: core/state_file.py).
        self._vms_created = 0

    # -- boot ------------------------------------------------------------------------------

    @classmethod
    def boot(cls, config: SimConfig) -> Hypervisor:
        """Boot a machine from `config`; raises ValueError for an impossible configuration."""
        reservation = compute_reservation(config)
        layout = partition_carveout(reservation, config)
        geometry = config.geometry
        shift = geometry.page_shift
        if config.vmemmap_coverage == "all":
            ranges = [(b.base >> shift, b.size >> shift) for b in config.memblocks]
        else:
            ranges = [(layout.base_pfn, layout.nr_pages)]
        vmemmap = Vmemmap(config.layout, ranges)
        physmem = PhysicalMemory()
        cap = effective_max_order(geometry, config.layout)

        def pool(name: str, reserved: int = 0) -> HypPool:
            region = layout.region(name)
            return HypPool(vmemmap, physmem, region.base_pfn, region.nr_pages, reserved,
                           page_shift=shift, max_order_cap=cap,
                           max_order_formula=config.pool_max_order_formula, name=name)

        stage1 = _boot_stage1(config, layout)
        early_pages = (config.hyp_s1_early_used_pages
                       if config.hyp_s1_early_used_pages is not None else stage1.early_pages)
        if early_pages > layout.region("hyp").nr_pages:
            raise ValueError(f"boot failed: EL2's boot stage-1 needs {early_pages} pages, the"
                             f" hyp pool has {layout.region('hyp').nr_pages}")
        try:
            hyp_pool = pool("hyp", early_pages)
            stage1.start(hyp_pool)
            host_pools = [pool(spec.name) for spec in config.kernel.host_s2_pools]
            host_stage2 = HostStage2(config, physmem, vmemmap, host_pools)
            host_stage2.mark_hyp(reservation.carveout_base, reservation.carveout_end)
        except PkvmError as err:
            raise ValueError(f"boot failed: {err.message} ({err.reason})") from err
        ram = [(b.base >> shift, b.size >> shift) for b in config.memblocks]
        host_memory = HostMemory(_subtract(ram, layout.base_pfn, layout.nr_pages))
        return cls(config, reservation, layout, vmemmap, physmem, hyp_pool, host_pools,
                   host_stage2, host_memory, stage1)

    # -- VMs (docs/stage2.md, VMs) -------------------------------------------------------------

    def create_vm(self, *, nr_vcpus: int, slice_pages: int, name: str | None = None,
                  run: bool = True) -> VmInfo:
        """Create a VM (KVM_CREATE_VM and its vCPUs) with a slice of host RAM for its VMM
        and, with run=True (the service's), run each vCPU once. -EINVAL for nr_vcpus < 1 or
        a bad size; -ENOMEM when host RAM cannot supply the slice or the structs.

        Creation at EL1 (v6.1, v6.12: kvm_arch_init_vm, kvm_arch_vcpu_create): the host
        shares its struct kvm and each struct kvm_vcpu with hyp (kvm_share_hyp), which maps
        them in EL2's stage-1, with tables from the hyp pool. The VM exists at EL2 only from
        its first run (`run_vm`). In a profile without VMs at EL2 (Operation.VMS) the VM never
        gets an EL2 part: no donations, pool or guest stage-2, and what needs them is refused
        NOT_IN_PROFILE. An empty hyp pool in hyp_complete_share is a WARN at EL2, which the
        kernel treats as fatal: WouldPanic, nothing changed."""
        if not 1 <= nr_vcpus <= MAX_VCPUS:
            raise InvalidArgument(f"nr_vcpus must be in 1..{MAX_VCPUS}, not {nr_vcpus}",
                                  reason="BAD_NR_VCPUS")
        self._refuse_unmodelled(Operation.VMS, "create a VM at EL2")
        if slice_pages < 1:
            raise InvalidArgument(f"slice_pages must be >= 1, not {slice_pages}",
                                  reason="BAD_SLICE_SIZE")
        if len(self._vms) >= MAX_VMS:
            raise OutOfMemory(f"the VM table is full ({MAX_VMS} VMs)", reason="VM_TABLE_FULL")
        at_el2 = Operation.VMS in self.operations
        # 6.18+: KVM_CREATE_VM reserves the hyp VM table slot (pkvm_init_host_vm ->
        # __pkvm_reserve_vm: -ENOMEM when all KVM_MAX_PVMS are reserved), so the 256th VM
        # fails here; up to 6.12 the slot is taken at the first run (__pkvm_init_vm).
        slot_now = not at_el2 or self._slot_at_create
        index = 0
        if not at_el2:  # the service's own table: the VMID never reaches EL2
            index = self._free_vm_slot(MAX_VMS)
        elif slot_now:
            index = self._free_vm_slot(self.config.kernel.vm_table_entries or MAX_VMS)
        elif run:  # the first run would find the hyp VM table full: refuse before anything
            self._free_vm_slot(self.config.kernel.vm_table_entries or MAX_VMS)
        handle = VM_HANDLE_OFFSET + self._vms_created
        hm = self.host_memory
        # Without a modelled build (v5.x) the donations come first and the slice after them,
        # as this simulator always placed them.
        slice_later = self.build is None and run and at_el2
        slice_base = -1 if slice_later else hm.alloc(slice_pages, f"slice:{handle}")
        try:
            struct_pfns, objects = self._share_host_structs(handle, nr_vcpus)
        except PkvmError as err:
            if not slice_later:
                hm.free(slice_base)
            if isinstance(err, OutOfMemory):
                raise OutOfMemory(f"cannot create VM: {err.message}", reason=err.reason) from err
            raise
        vm = GuestVm(handle=handle, vmid=index + 1 if slot_now else 0,
                     name=name or f"vm-{handle:#x}", nr_vcpus=nr_vcpus,
                     slice_base_pfn=slice_base, slice_nr_pages=slice_pages,
                     struct_pfns=struct_pfns, slab_objects=objects)
        self._vms[handle] = vm
        self._vms_created += 1
        if run:
            try:
                self.run_vm(handle)
                if slice_later:
                    vm.slice_base_pfn = hm.alloc(slice_pages, f"slice:{handle}")
            except PkvmError as err:
                self.teardown_vm(handle)  # undo the creation
                self._vms_created -= 1  # the handle was never handed out
                if slice_later and isinstance(err, OutOfMemory):
                    raise OutOfMemory(f"cannot create VM: {err.message}",
                                      reason=err.reason) from err
                raise
        return self._vm_info(vm)

    def _free_vm_slot(self, slots: int) -> int:
        """find_free_vm_table_entry: the lowest free slot (VMID - 1), -ENOMEM when full.
        The slot is reused like the kernel's; the handle is not (it would be slot + 0x1000
        in the kernel): a client can tell its VM was destroyed, or the server restarted,
        from a new VM that took the slot (docs/state-file.md)."""
        used = {vm.vmid - 1 for vm in self._vms.values() if vm.vmid}
        index = next((i for i in range(slots) if i not in used), None)
        if index is None:
            table = ("the hyp VM table (KVM_MAX_PVMS)" if slots == KVM_MAX_PVMS
                     else "the VM table")
            raise OutOfMemory(f"{table} is full ({slots} VMs)", reason="VM_TABLE_FULL")
        return index

    def run_vm(self, handle: int) -> VmInfo:
        """The first KVM_RUN of each vCPU; later runs change nothing.

        v6.2+ (Operation.VMS): pkvm_create_hyp_vm creates the VM at EL2: __pkvm_init_vm
        takes a slot of the hyp VM table (KVM_MAX_PVMS, 255: -ENOMEM when full, so the
        256th VM fails here, not at creation) and the donated pkvm_hyp_vm and guest PGD
        (sized by the host's IPA limit in protected mode), then one __pkvm_init_vcpu per
        vCPU donates its pkvm_hyp_vcpu. v6.1: kvm_arch_vcpu_run_map_fp shares the VMM
        task's FP/SIMD state with hyp (one page for the task, however many vCPUs ran)."""
        vm = self._vm(handle)
        if vm.ran:
            return self._vm_info(vm)
        build = self.build
        if Operation.VMS in self.operations:
            self._create_at_el2(vm)
        elif build is not None and build.shares_task_fpsimd:
            self._share_task_fp()
        vm.ran = True
        return self._vm_info(vm)

    def _create_at_el2(self, vm: GuestVm) -> None:
        """__pkvm_init_vm + __pkvm_init_vcpu per vCPU, all or nothing here."""
        handle, nr_vcpus = vm.handle, vm.nr_vcpus
        # The hyp VM table kvm_hyp_reserve reserved (v6.2+: KVM_MAX_PVMS slots); profiles
        # without one (v5.x serving VMs as an extension) keep the service's own table.
        index = (vm.vmid - 1 if vm.vmid
                 else self._free_vm_slot(self.config.kernel.vm_table_entries or MAX_VMS))
        _start, pgd_pages = pgd_geometry(self.geometry, self.config.ia_bits)
        build = self.build
        vm_bytes = build.hyp_vm_bytes if build else PKVM_HYP_VM_BYTES
        vcpu_bytes = build.hyp_vcpu_bytes if build else PKVM_HYP_VCPU_BYTES
        # hyp_vm_sz = PAGE_ALIGN(PKVM_HYP_VM_SIZE + vcpu pointers), then per vCPU
        # PAGE_ALIGN(PKVM_HYP_VCPU_SIZE) (pkvm.c __pkvm_create_hyp_vm).
        meta_pages = (ceil_div(vm_bytes + 8 * nr_vcpus, self.page_size)
                      + nr_vcpus * ceil_div(vcpu_bytes, self.page_size))
        hm = self.host_memory
        made: list[int] = []
        try:
            # alloc_pages_exact: the PGD (order 4 for 16 pages) and the structs (order 1 for
            # 2 pages) come from different free blocks, hence pageblocks.
            meta = self._alloc_donation(meta_pages, f"meta:{handle}", ("meta:",))
            made.append(meta)
            pgd_base = self._alloc_donation(pgd_pages, f"pgd:{handle}", ("pgd:",),
                                            align_pages=pgd_pages)
            made.append(pgd_base)
            donated = [*range(meta, meta + meta_pages), *range(pgd_base, pgd_base + pgd_pages)]
            # v6.16+: __pkvm_init_vm pins the host's struct kvm and __pkvm_init_vcpu each
            # struct kvm_vcpu (hyp_pin_shared_mem), which maps the pages a first pin reaches.
            pinned = self._first_pins(vm.struct_pfns) if self._pins_map else []
            self.hyp_stage1.check_can_map(donated + pinned)
            # All or nothing (planned first): a refusal leaves the host stage-2 untouched.
            self.host_stage2.set_owner_pages(donated, OWNER_HYP)
            self.hyp_stage1.map_pages(donated)
            if self._pins_map:
                self._pin(vm.struct_pfns)
        except PkvmError as err:
            for base in reversed(made):
                hm.free(base)
            if isinstance(err, OutOfMemory):
                raise OutOfMemory(f"cannot create VM: {err.message}", reason=err.reason) from err
            raise  # e.g. RefcountLimit or an empty hyp pool: a WouldPanic stays one
        pool = HypPool(self.vmemmap, self.physmem, pgd_base, pgd_pages, 0,
                       page_shift=self.page_shift, max_order_cap=self.max_order,
                       max_order_formula="v5.17", name=f"vm/{handle}")
        vm.vmid = index + 1
        vm.meta_pfn, vm.meta_pages = meta, meta_pages
        vm.pgd_base_pfn, vm.pgd_pages = pgd_base, pgd_pages
        vm.pool = pool
        vm.mm = GuestMmOps(vm, self.physmem, self.vmemmap.layout.refcount_max)
        order = get_order(pgd_pages * self.page_size, self.page_shift)
        pgd = pool.alloc_pages(order)
        pool.split_page(pgd)
        vm.pgt = Stage2PageTable(self.geometry, self.config.ia_bits, self.physmem, vm.mm,
                                 [pgd + i for i in range(pgd_pages)],
                                 on_refcount_limit=self.host_stage2.count_refcount_limit)

    # -- what the host kernel shares with hyp for its own structs (v6.1, v6.12) -----------

    def _share_host_structs(self, handle: int, nr_vcpus: int) -> tuple[
            list[int], list[tuple[str, int, int]]]:
        """kvm_share_hyp(kvm, kvm + 1) and, per vCPU, kvm_share_hyp(vcpu, vcpu + 1): the
        structs (sizes from the build's BTF) are slab objects (host_kernel.py): struct kvm
        in kmalloc-4k, each struct kvm_vcpu in the kvm_vcpu cache, packed back to back, so
        vCPUs of one VM share boundary pages. Returns the pfns shared (a page per object it
        spans) and the objects; nothing changes on a refusal."""
        build = self.build
        if build is None:
            return [], []
        objects: list[tuple[str, int, int]] = []
        pfns: list[int] = []
        try:
            for cache in ([kvm_struct_cache(build.kvm_bytes)]
                          + [vcpu_cache(build.kvm_vcpu_bytes)] * nr_vcpus):
                obj = self._slab_alloc(cache)
                objects.append(obj)
                pfns += object_pfns(cache, obj, self.page_size)
            self._kernel_share(pfns)
        except PkvmError:
            while objects:
                self._slab_free(objects.pop())
            raise
        return pfns, objects

    def _kernel_alloc(self, nr_pages: int, owner: str, group: tuple[str, ...],
                      align_pages: int = 1) -> int:
        """A host kernel allocation (slab pages, pages to donate), placed by pageblock
        grouping (HostMemory.alloc_grouped): ZONE_NORMAL (above 4 GiB) first."""
        shift = self.page_shift
        four_gib = (4 << 30) >> shift
        ram_above = any(b.end > 4 << 30 for b in self.config.memblocks)
        zone_start = four_gib if ram_above else min(b.base for b in self.config.memblocks) >> shift
        return self.host_memory.alloc_grouped(
            nr_pages, owner, group=group, block_pages=self.page_size // 8,
            zone_start_pfn=zone_start, align_pages=align_pages)

    def _alloc_donation(self, nr_pages: int, owner: str, group: tuple[str, ...],
                        align_pages: int = 1) -> int:
        """Host pages to donate: the kernel's own allocation where the build is modelled,
        else first fit (older profiles, as before)."""
        if self.build is None:
            return self.host_memory.alloc(nr_pages, owner, align_pages=align_pages)
        return self._kernel_alloc(nr_pages, owner, group, align_pages)

    def _slab_alloc(self, cache: SlabCache) -> tuple[str, int, int]:
        """An object from the lowest slab of `cache` with a free slot, else a new slab."""
        slabs = self.slabs.setdefault(cache.name, {})
        per_slab = cache.objects_per_slab(self.page_size)
        partial = self._partial_slabs.setdefault(cache.name, set())
        if partial:
            base = min(partial)
            taken = slabs[base]
            index = next(i for i in range(per_slab) if i not in taken)
            taken.add(index)
            if len(taken) == per_slab:
                partial.discard(base)
            return cache.name, base, index
        base = self._kernel_alloc(cache.slab_pages, f"slab:{cache.name}", SLAB_GROUP,
                                  align_pages=cache.slab_pages)
        slabs[base] = {0}
        if per_slab > 1:
            partial.add(base)
        return cache.name, base, 0

    def _slab_free(self, obj: tuple[str, int, int]) -> None:
        """Free an object; a slab left empty goes back to the host."""
        name, base, index = obj
        slabs = self.slabs[name]
        slabs[base].discard(index)
        partial = self._partial_slabs.setdefault(name, set())
        partial.add(base)
        if not slabs[base]:
            del slabs[base]
            partial.discard(base)
            self.host_memory.free(base)
            if not slabs:
                del self.slabs[name]
        if not partial:
            del self._partial_slabs[name]

    def rebuild_slabs(self) -> None:
        """The slab index from the live VMs' objects (after a state file is loaded)."""
        self.slabs.clear()
        for vm in self._vms.values():
            for name, base, index in vm.slab_objects:
                self.slabs.setdefault(name, {}).setdefault(base, set()).add(index)
        self._partial_slabs.clear()
        sizes: dict[str, SlabCache] = {}
        if self.build is not None:
            kvm_cache = kvm_struct_cache(self.build.kvm_bytes)
            sizes = {kvm_cache.name: kvm_cache,
                     "kvm_vcpu": vcpu_cache(self.build.kvm_vcpu_bytes)}
        for name, slabs in self.slabs.items():
            per_slab = sizes[name].objects_per_slab(self.page_size)
            partial = {base for base, used in slabs.items() if len(used) < per_slab}
            if partial:
                self._partial_slabs[name] = partial

    def _kernel_share(self, pfns: list[int]) -> None:
        """__pkvm_host_share_hyp of host-kernel pages (share_pfn_hyp counts repeated shares
        of one pfn: only the first reaches EL2)."""
        new = [pfn for pfn in dict.fromkeys(pfns) if pfn not in self._kernel_shared]
        if new:
            if not self._pins_map:
                self.hyp_stage1.check_can_map(new)
            self.host_stage2.set_page_state(new, STATE_SHARED_OWNED)
            if not self._pins_map:  # v6.16+: a share maps nothing at EL2
                self.hyp_stage1.map_pages(new)
        for pfn in pfns:
            self._kernel_shared[pfn] = self._kernel_shared.get(pfn, 0) + 1

    def _kernel_unshare(self, pfns: list[int]) -> None:
        """unshare_pfn_hyp: the last unshare of a pfn reaches EL2."""
        last = []
        for pfn in pfns:
            self._kernel_shared[pfn] -= 1
            if not self._kernel_shared[pfn]:
                del self._kernel_shared[pfn]
                last.append(pfn)
        if last:
            self.host_stage2.set_page_state(last, STATE_OWNED)
            if not self._pins_map:
                self.hyp_stage1.unmap_pages(last)

    @property
    def _pins_map(self) -> bool:
        """v6.16+: shares map nothing at EL2, the first pin of a page maps it."""
        return self.build is not None and not self.build.share_maps_at_el2

    @property
    def _slot_at_create(self) -> bool:
        return self.build is not None and self.build.vm_slot_at_create

    def _first_pins(self, pfns: list[int]) -> list[int]:
        """The distinct pages of `pfns` no pin holds yet: those a pin maps."""
        return [q for q in dict.fromkeys(pfns) if not self.vmemmap.refcount(q)]

    def _pin(self, pfns: list[int]) -> None:
        """hyp_pin_shared_mem (v6.16+), one reference per entry of `pfns` (a page twice in
        it, e.g. a slab page two vCPUs touch, is pinned twice): hyp_page_ref_inc, and
        pkvm_create_mappings_locked of a page whose refcount becomes 1. Checked first by
        the caller (check_can_map of `_first_pins`)."""
        for q in pfns:
            count = self.vmemmap.refcount(q)
            self.vmemmap.set_entry(q, refcount=count + 1)
            if not count:
                self.hyp_stage1.map_pages([q])

    def _unpin(self, pfns: list[int]) -> None:
        """hyp_unpin_shared_mem: kvm_pgtable_hyp_unmap of a page at refcount 1, then
        hyp_page_ref_dec."""
        for q in pfns:
            count = self.vmemmap.refcount(q)
            if count == 1:
                self.hyp_stage1.unmap_pages([q])
            self.vmemmap.set_entry(q, refcount=count - 1)

    def _share_task_fp(self) -> None:
        """v6.1 kvm_arch_vcpu_run_map_fp: the VMM task's user_fpsimd_state (one page of its
        task_struct; the simulator's VMM is one task for every VM)."""
        if self._task_fp_pfn is None:
            pfn = self._kernel_alloc(1, "task:fpsimd", SLAB_GROUP)
            try:
                self._kernel_share([pfn])
            except PkvmError:
                self.host_memory.free(pfn)
                raise
            self._task_fp_pfn = pfn
        else:
            self._kernel_share([self._task_fp_pfn])

    def _unshare_task_fp(self) -> None:
        """kvm_vcpu_unshare_task_fp at vCPU destruction; the page goes with the last one."""
        pfn = self._task_fp_pfn
        assert pfn is not None
        self._kernel_unshare([pfn])
        if pfn not in self._kernel_shared:
            self.host_memory.free(pfn)
            self._task_fp_pfn = None

    def destroy_vm(self, handle: int) -> int:
        """Tear a VM down and return everything to the host; returns the number of pages
        given back (slice + donated + memcache + pages it held in the hyp pool)."""
        return self.teardown_vm(handle).pages_returned

    def teardown_vm(self, handle: int) -> TeardownResult:
        """destroy_vm, saying which steps are the kernel's and which the service's.

        The service's clean-up guarantee: a destroyed VM leaves nothing behind. The kernel's
        __pkvm_teardown_vm reclaims the guest's pages and tables, unpins what EL2 pinned for
        the VM and hands the donated pages back; it never unshares what the host shared with
        hyp (the host does that afterwards, page by page). Here those shares are dropped too,
        as that host clean-up would (`host_unshared_pages`)."""
        vm = self._vm(handle)
        del self._vms[handle]
        returned = 0
        unpinned, unshared = len(vm.pins), len(vm.shared)
        # EL2 drops its pins; the service unshares (the host's job in the kernel).
        for pfn in sorted(vm.pins):
            self.vmemmap.set_entry(pfn, refcount=0)
            if self._pins_map:
                self.hyp_stage1.unmap_pages([pfn])
        vm.pins.clear()
        if vm.shared:
            shared = sorted(vm.shared)
            self.host_stage2.set_page_state(shared, STATE_OWNED)
            if not self._pins_map:
                self.hyp_stage1.unmap_pages(shared)
            for pfn in shared:
                del self._hyp_shared[pfn]
            vm.shared.clear()
        # v6.16+: __pkvm_teardown_vm (7.3: __pkvm_finalize_teardown_vm) unpins the host
        # vCPUs and struct kvm (hyp_unpin_shared_mem unmaps at the last pin).
        if self._pins_map and vm.pool is not None:
            self._unpin(vm.struct_pfns)
        # The host kernel's own shares (kvm_arch_vcpu_destroy, kvm_arch_destroy_vm).
        if vm.struct_pfns:
            self._kernel_unshare(vm.struct_pfns)
            objects, vm.slab_objects = vm.slab_objects, []
            while objects:
                self._slab_free(objects.pop())
        if vm.ran and self.build is not None and self.build.shares_task_fpsimd:
            self._unshare_task_fp()
        # Blocks the VM allocated: back to their pools, whatever their refcount.
        for head, (owner, kind) in sorted(self._owners.items()):
            if owner != handle:
                continue
            pool = self.hyp_pool if kind is PoolKind.HYP else vm.pool
            assert pool is not None
            if kind is PoolKind.HYP:
                returned += 1 << pool.page_order(head)
            while pool.put_page(head):
                pass
            del self._owners[head]
        if vm.pool is None:  # no VM at EL2: only a slice
            if vm.slice_base_pfn >= 0:  # -1: refused before its slice was allocated
                self.host_memory.free(vm.slice_base_pfn)
            return TeardownResult(pages_returned=returned + vm.slice_nr_pages,
                                  el2_returned_pages=0, guest_unshared_pages=0,
                                  unpinned_pages=unpinned, host_unshared_pages=unshared)
        # Guest stage-2: pages shared with the guest go back to the host (their share count
        # drops; at 0 the host page is OWNED again), every table back into vm.pool, then the
        # PGD pages.
        assert vm.pgt is not None
        guest_unshared = self._drop_guest_shares(vm.pgt)
        vm.pgt.unmap(0, vm.pgt.ia_size)
        for pfn in vm.pgt.pgd_pfns:
            vm.pool.put_page(pfn)
        # Drain vm.pool: admitted memcache pages leave it, the PGD range is reset.
        for pfn in vm.admitted:
            vm.pool.release_admitted(pfn)
        while (drained := vm.pool.try_alloc_pages(0)) is not None:
            self.vmemmap.set_entry(drained, refcount=0, order=0)
        # Donated pages back to the host (__pkvm_hyp_donate_host: unmapped from EL2's
        # stage-1, annotations reset), then the host's own memcache pages, then the slice.
        hs2 = self.host_stage2
        el2_returned = vm.donated_pages + len(vm.admitted) + len(vm.hyp_memcache)
        for pfn in vm.admitted + vm.hyp_memcache:
            self.physmem.zero_range(pfn, 1)
            self.hyp_stage1.unmap_pages([pfn])
            hs2.set_owner_pages([pfn], OWNER_HOST)
            self.host_memory.free(pfn)
            returned += 1
        for pfn in vm.memcache:  # never donated: the host frees them (free_hyp_memcache)
            self.physmem.zero_range(pfn, 1)
            self.host_memory.free(pfn)
            returned += 1
        self.physmem.zero_range(vm.meta_pfn, vm.meta_pages)
        meta = range(vm.meta_pfn, vm.meta_pfn + vm.meta_pages)
        pgd = range(vm.pgd_base_pfn, vm.pgd_base_pfn + vm.pgd_pages)
        self.hyp_stage1.unmap_pages([*meta, *pgd])
        hs2.set_owner_pages(meta, OWNER_HOST)
        hs2.set_owner_pages(pgd, OWNER_HOST)
        self.host_memory.free(vm.meta_pfn)
        self.host_memory.free(vm.pgd_base_pfn)
        if vm.slice_base_pfn >= 0:  # -1: refused before its slice was allocated
            self.host_memory.free(vm.slice_base_pfn)
        returned += vm.donated_pages + vm.slice_nr_pages
        return TeardownResult(pages_returned=returned, el2_returned_pages=el2_returned,
                              guest_unshared_pages=guest_unshared, unpinned_pages=unpinned,
                              host_unshared_pages=unshared)

    def _drop_guest_shares(self, pgt: Stage2PageTable) -> int:
        """Every guest leaf's host page: host_share_guest_count - 1, OWNED again at 0.
        Returns the pages the host owns again."""
        back_to_host: list[int] = []
        for m in pgt.mappings():
            pfn = m.pte[PTE_PFN]
            self._guest_shared[pfn] -= 1
            if not self._guest_shared[pfn]:
                del self._guest_shared[pfn]
                back_to_host.append(pfn)
        return len(back_to_host)  # OWNED again: a state in the vmemmap, not the stage-2

    def vm(self, handle: int) -> VmInfo:
        """-ENOENT (NotFound) for an unknown handle."""
        return self._vm_info(self._vm(handle))

    def vms(self) -> list[VmInfo]:
        return [self._vm_info(vm) for _h, vm in sorted(self._vms.items())]

    def _vm(self, handle: int) -> GuestVm:
        vm = self._vms.get(handle)
        if vm is None:
            raise NotFound(f"no VM with handle {handle:#x}", reason="UNKNOWN_VM")
        return vm

    @staticmethod
    def _vm_info(vm: GuestVm) -> VmInfo:
        return VmInfo(vm.handle, vm.vmid, vm.name, vm.nr_vcpus, vm.slice_base_pfn,
                      vm.slice_nr_pages, vm.donated_pages)

    # -- pool pages on behalf of a VM (A.5) ------------------------------------------------

    # `pool` is typed `object`: callers pass what a client sent ("hyp", "vm", or anything),
    # and _alloc_target refuses what is not a PoolKind with BAD_POOL, compiled or not (a
    # narrower type would make the compiled core raise TypeError first).
    def alloc_pages(self, handle: int, order: int, pool: object = PoolKind.HYP) -> int:
        """hyp_alloc_pages on the hyp pool (default) or the VM's own pool; the block's owner
        becomes the VM. Returns the head pfn. -EINVAL for order < 0 or > MAX_ORDER; -ENOMEM
        when the pool has no block (including order >= the pool's max_order)."""
        target, owner = self._alloc_target(handle, order, pool)
        pfn = target.alloc_pages(order)
        self._owners[pfn] = owner
        return pfn

    def alloc_pages_run(
        self, handle: int, order: int, pool: object, count: int
    ) -> tuple[list[int], PkvmError | None]:
        """`count` alloc_pages in a row, as an Execute batch runs them: the pfns handed out,
        in order, and the refusal that stopped the run early (returned, not raised). Each
        alloc is exactly alloc_pages; only the per-call lookups are done once."""
        pfns: list[int] = []
        try:
            target, owner = self._alloc_target(handle, order, pool)
            alloc, owners, append = target.try_alloc_pages, self._owners, pfns.append
            for _ in range(count):
                pfn = alloc(order)
                if pfn is None:
                    raise target.exhausted(order)
                owners[pfn] = owner
                append(pfn)
        except PkvmError as error:
            return pfns, error
        return pfns, None

    def _alloc_target(
        self, handle: int, order: int, pool: object
    ) -> tuple[HypPool, tuple[int, PoolKind]]:
        """The pool an alloc_pages draws from, and the owner record of what it hands out."""
        vm = self._vm(handle)
        if not 0 <= order <= self.max_order:
            raise InvalidArgument(f"order must be in 0..{self.max_order}, not {order}",
                                  reason="BAD_ORDER")
        try:
            kind = pool if isinstance(pool, PoolKind) else PoolKind(pool)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise InvalidArgument(f"unknown pool {pool!r}: 'hyp' or 'vm'",
                                  reason="BAD_POOL") from None
        if kind is PoolKind.HYP:
            return self.hyp_pool, (handle, kind)
        self._require(Operation.VMS, "allocate from a VM pool")
        vm_pool = self._el2_part(vm).pool
        assert vm_pool is not None
        return vm_pool, (handle, kind)

    def _owned_block(self, handle: int, pfn: int) -> HypPool:
        """The pool of the block headed by pfn, if VM `handle` allocated it (refusals, in
        order: NotFound for an unknown handle, OutOfRange for a pfn outside RAM, PermissionDenied).

        Invariant: every owner record names a live VM (destroy_vm drops its records), so a
        matching record needs no VM lookup; an unknown handle is still NotFound first.
        """
        owner = self._owners.get(pfn)
        if owner is None or owner[0] != handle:
            self._vm(handle)
            if not self._memblock_of(pfn):  # no RAM there: -ERANGE, as for IPAs (docs/service.md)
                raise OutOfRange(f"pfn {pfn:#x} is outside host RAM", reason="PFN_OUT_OF_RANGE")
            raise PermissionDenied(
                f"pfn {pfn:#x} is not the head of a block VM {handle:#x} allocated",
                reason="NOT_OWNER",
            )
        if owner[1] is PoolKind.HYP:
            return self.hyp_pool
        pool = self._vms[handle].pool
        assert pool is not None
        return pool

    def put_page(self, handle: int, pfn: int) -> int:
        """hyp_put_page on a head the VM owns; returns the refcount after."""
        count = self._owned_block(handle, pfn).put_page(pfn)
        if count == 0:
            del self._owners[pfn]
        return count

    def put_pages_run(self, handle: int, pfns: list[int]) -> tuple[list[int], PkvmError | None]:
        """put_page on each pfn in order, as an Execute batch runs them: the refcounts after,
        and the refusal that stopped the run early (returned, not raised). Blocks of the hyp
        pool owned by `handle` take a short path with the same effect as put_page."""
        counts: list[int] = []
        owners, hyp_owner, put_hyp = self._owners, (handle, PoolKind.HYP), self.hyp_pool.put_page
        append = counts.append
        try:
            for pfn in pfns:
                if owners.get(pfn) == hyp_owner:
                    count = put_hyp(pfn)
                    if count == 0:
                        del owners[pfn]
                    append(count)
                else:
                    append(self.put_page(handle, pfn))
        except PkvmError as error:
            return counts, error
        return counts, None

    def get_page(self, handle: int, pfn: int) -> int:
        """hyp_get_page on a head the VM owns; returns the refcount after."""
        return self._owned_block(handle, pfn).get_page(pfn)

    # -- host <-> hyp sharing (docs/stage2.md, Sharing) ---------------------------------------

    def _share_pages(self, handle: int, pfn: int, nr_pages: int, op: Operation) -> tuple[
            GuestVm, list[int]]:
        self._require(op, op.value)  # before any argument check
        vm = self._vm(handle)
        _check_page_count(nr_pages, minimum=1)
        if not vm.in_slice(pfn, nr_pages):
            raise PermissionDenied(
                f"pages [{pfn:#x}, +{nr_pages}) are not all in VM {handle:#x}'s slice"
                f" [{vm.slice_base_pfn:#x}, +{vm.slice_nr_pages})",
                reason="NOT_IN_SLICE",
            )
        return vm, list(range(pfn, pfn + nr_pages))

    @staticmethod
    def _el2_part(vm: GuestVm) -> GuestVm:
        """The VM, if it exists at EL2 (it ran); else FAILED_PRECONDITION / NOT_RUN."""
        if vm.pool is None:
            raise FailedPrecondition(f"VM {vm.handle:#x} has not run: it does not exist at"
                                     " EL2 yet (run it first)", reason="VM_NOT_RUN")
        return vm

    def _require(self, op: Operation, what: str) -> None:
        """FAILED_PRECONDITION / NOT_IN_PROFILE when the modelled kernel lacks `op`."""
        if op in self.operations:
            return
        self._refuse_unmodelled(op, what)
        kernel = self.config.kernel
        hint = ""
        if kernel.full_vmemmap_extension:
            hint = " (vmemmap_coverage 'all' serves it as an extension of this profile)"
        elif op is Operation.GUEST_SHARE:
            hint = " (profile v6.18 models a kernel that has it)"
        raise FailedPrecondition(
            f"cannot {what}: profile {kernel.profile} models a kernel without it; the first"
            f" kernel that has it is {FIRST_KERNEL[op]}{hint}",
            reason="NOT_IN_PROFILE",
        )

    def _refuse_unmodelled(self, op: Operation, what: str) -> None:
        """FAILED_PRECONDITION / NOT_MODELLED when the kernel has `op` but the core does not
        implement its rules for this version yet (profiles.py unmodelled_operations)."""
        kernel = self.config.kernel
        if op in self.unmodelled_operations:
            raise FailedPrecondition(
                f"cannot {what}: profile {kernel.profile} models a kernel that has it, with"
                " rules the simulator does not implement for this machine (docs/model.md,"
                " 'v6.18/v7.3: run-time rules'); it refuses rather than apply another"
                " version's",
                reason="NOT_MODELLED",
            )

    def host_share(self, handle: int, pfn: int, nr_pages: int = 1, *,
                   page_by_page: bool = False) -> ShareResult:
        """__pkvm_host_share_hyp for each page of [pfn, pfn + nr_pages) in the VM's slice.

        By default all pages are checked before any changes (all or nothing: a deviation,
        the kernel's hypercall takes one page). page_by_page=True does what the host's loop
        does (kvm_share_hyp): one share per page in order, stopping at the first refusal,
        whose pages before it stay shared; the result says how many ended shared and why
        the next one failed. Each share maps the page in EL2's stage-1
        (hyp_complete_share), taking any missing table from the hyp pool."""
        if page_by_page:
            return self._share_page_by_page(handle, pfn, nr_pages)
        vm, pfns = self._share_pages(handle, pfn, nr_pages, Operation.SHARE_HYP)
        hs2 = self.host_stage2
        for q in pfns:
            pte, _level = hs2.host_leaf(q)
            if q in self._guest_shared or not (
                    pte is None or (pte[PTE_KIND] == LEAF and pte[PTE_PROT] == PROT_RWX
                                    and pte[PTE_STATE] == STATE_OWNED)):
                raise PermissionDenied(
                    f"host page {q:#x} is {self._host_state(q).value}, not owned: cannot share",
                    reason="HOST_PAGE_NOT_OWNED",
                )
            if q in self._hyp_shared:
                raise PermissionDenied(f"hyp already maps page {q:#x}", reason="HYP_PAGE_MAPPED")
        if not self._pins_map:
            self.hyp_stage1.check_can_map(pfns)
        hs2.set_page_state(pfns, STATE_SHARED_OWNED)
        if not self._pins_map:  # v6.16+ __pkvm_host_share_hyp maps nothing at EL2
            self.hyp_stage1.map_pages(pfns)
        for q in pfns:
            self._hyp_shared[q] = handle
            vm.shared.add(q)
        return ShareResult(pfn, nr_pages, PageState.SHARED_OWNED, PageState.SHARED_BORROWED,
                           pages_done=nr_pages)

    def _share_page_by_page(self, handle: int, pfn: int, nr_pages: int) -> ShareResult:
        self._share_pages(handle, pfn, nr_pages, Operation.SHARE_HYP)  # the request itself
        for done in range(nr_pages):
            try:
                self.host_share(handle, pfn + done, 1)
            except PkvmError as err:
                return ShareResult(pfn, nr_pages, PageState.SHARED_OWNED,
                                   PageState.SHARED_BORROWED, pages_done=done,
                                   failed_pfn=pfn + done, failed_reason=err.reason,
                                   failed_errno=err.errno_name)
        return ShareResult(pfn, nr_pages, PageState.SHARED_OWNED, PageState.SHARED_BORROWED,
                           pages_done=nr_pages)

    def _host_state(self, pfn: int) -> PageState:
        """The host's state of a page: SHARED_OWNED while guests map it (v6.14+ keeps that
        in the vmemmap), else what its host stage-2 leaf says."""
        if pfn in self._guest_shared:
            return PageState.SHARED_OWNED
        return self.host_stage2.host_state(pfn)

    def host_unshare(self, handle: int, pfn: int, nr_pages: int = 1) -> ShareResult:
        """__pkvm_host_unshare_hyp; -EBUSY if EL2 has any of the pages pinned (6.2+). EL2
        unmaps the pages (hyp_complete_unshare) and gives tables left empty back."""
        vm, pfns = self._share_pages(handle, pfn, nr_pages, Operation.UNSHARE_HYP)
        hs2 = self.host_stage2
        pins = Operation.PIN_SHARED in self.operations  # 5.17-6.1: no hyp_page for host pages
        for q in pfns:
            if hs2.host_state(q) is not PageState.SHARED_OWNED or q in self._guest_shared:
                raise PermissionDenied(
                    f"host page {q:#x} is {hs2.host_state(q).value}, not shared with hyp",
                    reason="HOST_PAGE_NOT_SHARED",
                )
            if pins and self.vmemmap.refcount(q):
                raise Busy(f"page {q:#x} is pinned by EL2 (refcount"
                           f" {self.vmemmap.refcount(q)})", reason="PAGE_PINNED")
            if self._hyp_shared.get(q) != handle:
                raise PermissionDenied(f"hyp does not borrow page {q:#x}",
                                       reason="HYP_PAGE_NOT_BORROWED")
        hs2.set_page_state(pfns, STATE_OWNED)
        if not self._pins_map:  # v6.16+: nothing was mapped (pins are refused above)
            self.hyp_stage1.unmap_pages(pfns)
        for q in pfns:
            del self._hyp_shared[q]
            vm.shared.discard(q)
        return ShareResult(pfn, nr_pages, PageState.OWNED, PageState.NOPAGE,
                           pages_done=nr_pages)

    def pin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        """hyp_pin_shared_mem: EL2 takes a reference on shared pages (blocks unshare)."""
        vm, pfns = self._share_pages(handle, pfn, nr_pages, Operation.PIN_SHARED)
        for q in pfns:
            if self._hyp_shared.get(q) != handle:
                raise PermissionDenied(f"page {q:#x} is not shared with hyp",
                                       reason="PAGE_NOT_SHARED")
            if self.vmemmap.refcount(q) >= self.vmemmap.layout.refcount_max:
                raise WouldPanic(f"pin count of page {q:#x} at the hyp_page limit",
                                 reason="REFCOUNT_OVERFLOW")
        if self._pins_map:  # v6.16+: the first pin of a page maps it (tables from the pool)
            self.hyp_stage1.check_can_map(self._first_pins(pfns))
            self._pin(pfns)
        else:
            for q in pfns:
                self.vmemmap.set_entry(q, refcount=self.vmemmap.refcount(q) + 1)
        for q in pfns:
            vm.pins[q] = vm.pins.get(q, 0) + 1

    def unpin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        vm, pfns = self._share_pages(handle, pfn, nr_pages, Operation.PIN_SHARED)
        for q in pfns:
            if not vm.pins.get(q):
                raise WouldPanic(f"unpin of page {q:#x}, which is not pinned: refcount 0",
                                 reason="PUT_OF_FREE_PAGE")
        if self._pins_map:  # v6.16+ hyp_unpin_shared_mem: the last pin unmaps
            self._unpin(pfns)
        else:
            for q in pfns:
                self.vmemmap.set_entry(q, refcount=self.vmemmap.refcount(q) - 1)
        for q in pfns:
            vm.pins[q] -= 1
            if not vm.pins[q]:
                del vm.pins[q]

    # -- host stage-2 faults (docs/stage2.md) -------------------------------------------

    def host_fault(self, addr: int) -> FaultResult:
        """A host stage-2 fault on `addr` (memory or MMIO, decided by the memblocks)."""
        return self.host_stage2.handle_fault(addr)

    def map_mmio(self, addr: int) -> FaultResult:
        """An MMIO fault on `addr`; -EINVAL if `addr` is memory."""
        if addr >= 0 and self.host_stage2.is_memory(addr):
            raise InvalidArgument(f"{addr:#x} is memory, not MMIO", reason="NOT_MMIO")
        return self.host_stage2.handle_fault(addr)

    def unmap_dev_all(self) -> int:
        """host_stage2_unmap_dev_all on demand; returns the table pages it freed."""
        return self.host_stage2.unmap_dev_all()

    # -- guest stage-2 (docs/stage2.md, VMs; v6.14+ __pkvm_host_share_guest) -----------------------

    def topup_memcache(self, handle: int, nr_pages: int) -> int:
        """The host's topup_hyp_memcache(mc, min_pages = nr_pages): fill the VM's host
        memcache up to nr_pages pages (__topup_hyp_memcache pushes while nr_pages <
        min_pages; a memcache already that full gets nothing); returns its size. It only
        allocates: the pages stay host-owned (the host stage-2 is untouched) until EL2
        refills its own memcache at the next guest map (pkvm_refill_memcache), donating
        them one at a time."""
        self._require(Operation.GUEST_SHARE, "top up a VM memcache")
        vm = self._el2_part(self._vm(handle))
        _check_page_count(nr_pages, minimum=0)
        missing = max(0, nr_pages - len(vm.memcache))
        if missing > self.host_memory.free_pages:
            raise OutOfMemory(f"host RAM has {self.host_memory.free_pages} free pages, the"
                              f" top-up needs {missing}", reason="HOST_MEMORY_EXHAUSTED")
        for _ in range(missing):
            # __get_free_page(GFP_KERNEL_ACCOUNT): with a modelled build, placed as the host
            # kernel's other small allocations are (unmovable pageblocks, ZONE_NORMAL first).
            pfn = (self._kernel_alloc(1, f"hostmc:{handle}", SLAB_GROUP)
                   if self.build is not None else self.host_memory.alloc(1, f"hostmc:{handle}"))
            # push_hyp_memcache: each page holds the address of the one below it.
            head = vm.memcache[-1] if vm.memcache else None
            self.physmem.write(pfn, ("memcache_next", head))
            vm.memcache.append(pfn)
        return len(vm.memcache)

    def guest_map(self, handle: int, ipa: int, pfn: int) -> GuestMapResult:
        """Share a page of the VM's slice with the guest at `ipa`, as v6.14+ does
        (handle___pkvm_host_share_guest: pkvm_refill_memcache, then __pkvm_host_share_guest):

        - the guest IPA must be unmapped (NOPAGE), else -EPERM, even for the same pfn;
        - the host page must be OWNED (it becomes SHARED_OWNED) or already SHARED_OWNED
          with a non-zero guest-share count (shared with guests, not with hyp), else -EPERM;
        - EL2 first refills its memcache from the host's (donating each page), and the
          guest tables come from vm.pool, then from EL2's memcache.

        Everything is checked before anything changes (a refusal changes nothing, including
        the refill the kernel would already have done). Where v6.14 WARNs at EL2 (a page
        shared with hyp; a memcache too short for the guest tables) the machine would
        panic: WouldPanic, nothing changed."""
        self._require(Operation.GUEST_SHARE, "map guest memory")
        vm = self._el2_part(self._vm(handle))
        if not vm.in_slice(pfn):
            raise PermissionDenied(f"pfn {pfn:#x} is not in VM {handle:#x}'s slice",
                                   reason="NOT_IN_SLICE")
        if ipa < 0 or ipa % self.page_size:
            raise InvalidArgument(f"ipa {ipa:#x} is not page aligned", reason="BAD_ADDRESS")
        pgt, mm = vm.pgt, vm.mm
        assert pgt is not None and mm is not None
        if ipa >= pgt.ia_size:
            raise OutOfRange(f"ipa {ipa:#x} beyond the guest's {self.config.ia_bits}-bit space",
                             reason="BEYOND_IPA_SPACE")
        pte, _level, _table = pgt.lookup(ipa)
        if pte is not None:  # __guest_check_page_state_range(ipa, PKVM_NOPAGE)
            raise PermissionDenied(f"guest ipa {ipa:#x} is not unmapped: it maps pfn"
                                   f" {pte[PTE_PFN]:#x}", reason="IPA_MAPPED")
        host_state = self._host_state(pfn)
        if host_state is PageState.SHARED_OWNED and not self._guest_shared.get(pfn):
            if self._pins_map:  # v6.16+: a plain -EPERM
                raise PermissionDenied(f"host page {pfn:#x} is shared with hyp, not with"
                                       " guests", reason="HOST_PAGE_SHARED_WITH_HYP")
            # v6.14-v6.15 __pkvm_host_share_guest: WARN_ON(1) before -EPERM, fatal at EL2.
            raise WouldPanic(f"host page {pfn:#x} is shared with hyp, not with guests: EL2"
                             " WARNs (fatal)", reason="HOST_PAGE_SHARED_WITH_HYP")
        if host_state not in (PageState.OWNED, PageState.SHARED_OWNED):
            raise PermissionDenied(f"host page {pfn:#x} is {host_state.value}: cannot share"
                                   " it with the guest", reason="HOST_PAGE_NOT_OWNED")
        if self._pins_map and self._guest_shared.get(pfn, 0) >= U32_MAX:
            raise Busy(f"host page {pfn:#x} is shared with guests {U32_MAX} times",
                       reason="GUEST_SHARE_COUNT_LIMIT")  # v6.16+: -EBUSY, no WARN
        refill = vm.refill_pages()
        if self._pins_map:
            self._check_guest_memcache(vm, pgt, len(refill))
        plan = pgt.plan_page_maps([ipa], leaf=True)
        vm.require_table_pages(plan.tables, len(refill))
        pgt.check_plan(plan)  # the 2-byte layout's refcount limit, before any change
        self.hyp_stage1.check_can_map(refill)
        # The refill's donations change the host stage-2 (owner annotations). The shared
        # page's host state does not: from v6.14 the host's page states live in the hyp
        # vmemmap (hyp_page.host_state; __host_set_page_state_range maps nothing for a page
        # the host owns), so the host stage-2 is left alone (no block is split).
        if refill:
            self.host_stage2._prepare_page_maps(refill, leaf=True,
                                                what="donate the memcache refill")
            self.host_stage2.set_owner_pages(refill, OWNER_HYP)
        self._refill(vm, refill)
        before = mm.allocated
        ret = pgt.map(ipa, self.page_size, leaf_pte(pfn, PROT_RWX, STATE_SHARED_BORROWED))
        assert ret == OK, "pre-checked guest map failed"
        self._guest_shared[pfn] = self._guest_shared.get(pfn, 0) + 1
        return GuestMapResult(ipa, pfn, 3, mm.allocated - before, refilled_pages=len(refill))

    def _check_guest_memcache(self, vm: GuestVm, pgt: Stage2PageTable, refill: int) -> None:
        """v6.16+ __guest_check_pgtable_memcache: -ENOMEM unless EL2's memcache (after the
        refill) holds kvm_mmu_cache_min_pages = the guest stage-2's levels - 1 pages, checked
        before anything changes, so the map never runs short (no WARN)."""
        min_pages = (4 - pgt.start_level) - 1
        have = len(vm.hyp_memcache) + refill
        if have < min_pages:
            raise OutOfMemory(f"VM {vm.handle:#x}: EL2's memcache would hold {have} page(s),"
                              f" a guest map needs {min_pages} (kvm_mmu_cache_min_pages):"
                              " top up the memcache first", reason="MEMCACHE_TOO_SHORT")

    def _refill(self, vm: GuestVm, pages: list[int]) -> None:
        """refill_memcache after the donations: each page moves from the host's stack to
        EL2's, mapped in EL2's stage-1 (hyp_complete_donation)."""
        self.hyp_stage1.map_pages(pages)
        for pfn in pages:
            popped = vm.memcache.pop()
            assert popped == pfn, "refill pages come off the top of the host's memcache"
            head = vm.hyp_memcache[-1] if vm.hyp_memcache else None
            self.physmem.write(pfn, ("memcache_next", head))
            vm.hyp_memcache.append(pfn)
            self.host_memory.retag(pfn, f"memcache:{vm.handle}")

    # -- read-only views ------------------------------------------------------------------

    def pools(self) -> list[HypPool]:
        """Every pool: hyp, the host stage-2 pool(s), then the VM pools by handle."""
        return [self.hyp_pool, *self.host_pools,
                *(vm.pool for _h, vm in sorted(self._vms.items()) if vm.pool is not None)]

    def statistics(self, *, vm_pools: bool = True) -> HypervisorStatistics:
        """A snapshot; `vm_pools=False` leaves out the per-VM pools, so that it costs
        O(host pools) whatever the number of VMs (the metrics' default)."""
        pools = self.pools() if vm_pools else [self.hyp_pool, *self.host_pools]
        pool_stats = tuple(pool.statistics() for pool in pools)
        vmemmap = self.vmemmap
        return HypervisorStatistics(
            pools=pool_stats,
            vmemmap=VmemmapStatistics(
                layout=vmemmap.layout.name,
                entry_bytes=vmemmap.layout.entry_bytes,
                coverage=self.config.vmemmap_coverage,
                covered_pages=vmemmap.covered_pages,
                modelled_bytes=vmemmap.modelled_bytes,
                stored_bytes=vmemmap.stored_bytes,
                bytes_per_gib=self.reservation.vmemmap_bytes_per_gib,
            ),
            host_stage2=self.host_stage2.statistics(list(pool_stats[1:1 + len(self.host_pools)])),
            nr_vms=len(self._vms),
            shared_pages=len(self._hyp_shared) + len(self._kernel_shared),
            guest_shared_pages=len(self._guest_shared),
            hyp_stage1_table_pages=len(self.hyp_stage1.table_pages()),
            hyp_stage1_boot_table_pages=self.hyp_stage1.boot_tables,
            hyp_mem_pages=self.reservation.hyp_mem_pages,
            carveout_base=self.reservation.carveout_base,
            carveout_bytes=self.reservation.reserved_bytes,
        )

    def _memblock_of(self, pfn: int) -> bool:
        addr = pfn << self.page_shift
        return self.host_stage2.is_memory(addr)

    def _pool_of(self, pfn: int) -> HypPool | None:
        for pool in self.pools():
            if pool.contains(pfn):
                return pool
        return None

    def _block_head(self, pool: HypPool, pfn: int) -> int | None:
        """The head of the (free or held) block holding pfn: the first aligned pfn at or
        below it whose order field says its block reaches pfn."""
        for order in range(pool.max_order):
            head = pfn & ~((1 << order) - 1)
            if not pool.contains(head):
                break
            if pool.page_order(head) == order:
                return head
        return None

    def _owner_of(self, pfn: int) -> tuple[str, str | None]:
        """(owner, pool name) of a page, as page_info reports it."""
        if not self._memblock_of(pfn):
            return "none", None
        pool = self._pool_of(pfn)
        if pool is not None:
            head = self._block_head(pool, pfn)
            if head is not None and pool.is_free(head):
                return "free", pool.name
            if head is not None and head in self._owners:
                return f"vm:{self._owners[head][0]}", pool.name
            if pool.name.startswith("vm/"):
                return f"vm:{pool.name[3:]}", pool.name
            return "hyp", pool.name
        lay = self.carveout
        if lay.base_pfn <= pfn < lay.base_pfn + lay.nr_pages:
            return "hyp", None
        alloc = self.host_memory.allocation_at(pfn)
        if alloc is not None and not alloc.owner.startswith(HOST_OWNED_TAGS):
            return f"vm:{alloc.owner.split(':')[1]}", None
        return "host", None

    def page_info(self, pfn: int) -> PageInfo:
        if pfn < 0:
            raise InvalidArgument(f"pfn {pfn:#x} is negative", reason="BAD_PFN")
        covered = self.vmemmap.covers(pfn)
        refcount = self.vmemmap.refcount(pfn) if covered else None
        order: int | None = None
        if covered:
            order = self.vmemmap.order(pfn)
            if order == self.vmemmap.layout.no_order:
                order = None
        owner, pool = self._owner_of(pfn)
        if owner == "none":
            host_state, hyp_state = PageState.NOPAGE, PageState.NOPAGE
        else:
            host_state = self._host_state(pfn)
            if pfn in self._hyp_shared or pfn in self._kernel_shared:
                hyp_state = PageState.SHARED_BORROWED
            elif owner == "host":
                hyp_state = PageState.NOPAGE
            else:
                hyp_state = PageState.OWNED
        return PageInfo(pfn, covered, refcount, order, owner, pool, host_state, hyp_state)

    # -- records, read-only (audit, the service's persistence) ----------------------------------

    @property
    def vm_table(self) -> Mapping[int, GuestVm]:
        """handle -> VM, in creation order (the live objects: do not mutate)."""
        return self._vms

    def guest_vm(self, handle: int) -> GuestVm:
        """The live record of one VM (do not mutate); -ENOENT (NotFound) for an unknown handle."""
        return self._vm(handle)

    @property
    def vms_created(self) -> int:
        """VMs created since boot: the next handle is VM_HANDLE_OFFSET + this."""
        return self._vms_created

    @property
    def owners(self) -> Mapping[int, tuple[int, PoolKind]]:
        """Block head pfn -> (VM handle, pool) of every block a VM holds."""
        return self._owners

    @property
    def hyp_shared(self) -> Mapping[int, int]:
        """pfn -> VM handle of the slice pages shared with hyp."""
        return self._hyp_shared

    @property
    def guest_shared(self) -> Mapping[int, int]:
        """pfn -> host_share_guest_count (v6.14+)."""
        return self._guest_shared

    @property
    def kernel_shared(self) -> Mapping[int, int]:
        """Host-kernel struct pages shared with hyp -> share count (v6.1, v6.12 builds)."""
        return self._kernel_shared

    @property
    def task_fp_pfn(self) -> int | None:
        """The VMM task's FP/SIMD state page shared with hyp, while a VM has run."""
        return self._task_fp_pfn

    @property
    def pins_map(self) -> bool:
        """v6.16+: a share maps nothing at EL2, the first pin of a page maps it."""
        return self._pins_map

    # -- state (core/state_file.py) --------------------------------------------------------

    def state(self) -> tuple[dict[str, Any], dict[str, list[int]]]:
        """Every piece of mutable state, each core object writing its own part: the
        "machine" section of a state file (JSON values) but its "config" (state_file adds
        it first), and the integer streams (state_values.STREAMS, in that order) that hold
        the large homogeneous data. The vmemmap entries have their own sections
        (`vmemmap_blobs`)."""
        streams: dict[str, list[int]] = {name: [] for name in STREAMS}
        out: dict[str, Any] = {
            "vms_created": self._vms_created,
            "vmemmap": [{"base_pfn": seg.base_pfn, "nr_pages": seg.nr_pages,
                         "item_bytes": seg.item_bytes}
                        for seg in self.vmemmap.segments],
            "physmem": self._pages_state(streams["physmem"]),
            "pools": {pool.name: pool.state(streams["pools"])
                      for pool in (self.hyp_pool, *self.host_pools)},
            "host_stage2": self.host_stage2.state(),
            "host_memory": self.host_memory.state(streams["host_memory"]),
            "vms": [vm.state(streams["vms"]) for vm in self._vms.values()],
            "hyp_stage1": self.hyp_stage1.state(streams["hyp_stage1"]),
            "task_fp_pfn": self._task_fp_pfn,
        }
        records = streams["records"]
        put_list(records, list(self._owners))
        put_list(records, [handle for handle, _kind in self._owners.values()])
        put_list(records, [_POOL_KIND_CODES[kind] for _handle, kind in self._owners.values()])
        put_pairs(records, self._hyp_shared)
        put_pairs(records, self._guest_shared)
        put_pairs(records, self._kernel_shared)
        return out, streams

    def _pages_state(self, out: list[int]) -> list[Any]:
        """Every written page, in order, appended to `out`: a table page with its entries,
        any other content as (pfn, PAGE_JSON) and its value in the returned JSON list."""
        physmem = self.physmem
        other: list[Any] = []
        for pfn in physmem.written_pfns():
            content = physmem.read(pfn)
            if not put_table_page(out, pfn, content):
                out.append(pfn)
                out.append(PAGE_JSON)
                other.append(encode_value(content))
        return other

    def vmemmap_blobs(self) -> list[bytes]:
        """Each vmemmap segment's packed entries, little-endian (one state-file section each)."""
        return [seg.export_bytes() for seg in self.vmemmap.segments]

    def restore_state(self, m: Mapping[str, Any], vmemmap_blobs: Sequence[bytes | SparseBytes],
                      streams: Mapping[str, IntsIn] | None = None) -> None:
        """Overwrite this freshly booted machine's mutable state with `state()`'s (and the
        vmemmap with `vmemmap_blobs`); `streams` are a version-2 file's integer streams,
        None for a version-1 file (everything in `m`). The caller audits. Raises
        ValueError, LookupError, TypeError or PkvmError for a document that does not fit
        this configuration."""
        if streams is not None:
            m = self._unpack_records(m, streams)
        # VM pools first: hyp_pool_init needs their PGD ranges' entries zero, as at boot.
        vms_in = None if streams is None else streams["vms"]
        vms = [self._rebuild_vm(vm_state, vms_in) for vm_state in m["vms"]]
        self._load_vmemmap(m["vmemmap"], vmemmap_blobs)
        physmem = self.physmem
        for pfn in list(physmem.written_pfns()):  # in place: pools and tables hold it
            physmem.zero_range(pfn, 1)
        if streams is None:
            for pfn, value in m["physmem"]:
                physmem.write(int(pfn), decode_page(value))
        else:
            self._load_pages(m["physmem"], streams["physmem"])
        pools = {pool.name: pool for pool in (self.hyp_pool, *self.host_pools)}
        if set(pools) != set(m["pools"]):
            raise ValueError(f"pools {sorted(m['pools'])} in the file, {sorted(pools)} at boot")
        for name, pool_state in m["pools"].items():
            pool = pools[name]
            if streams is not None:
                pool_state = pool.take_state(pool_state, streams["pools"])
            pool.restore(pool_state)
        for vm, vm_pool_state in vms:
            if vm.pool is not None and vm_pool_state is not None:
                vm.pool.restore(vm_pool_state)
        self.host_stage2.restore(m["host_stage2"])
        if streams is None:
            self.host_memory.restore(m["host_memory"])
        else:
            self.host_memory.restore_packed(m["host_memory"], streams["host_memory"])
        self._vms = {vm.handle: vm for vm, _pool_state in vms}
        if streams is None:
            self._owners = {int(pfn): (int(handle), PoolKind(kind))
                            for pfn, handle, kind in m["owners"]}
        else:  # built by _unpack_records, without an Enum lookup per record
            self._owners = dict(m["owners"])
        self._hyp_shared = {int(pfn): int(handle) for pfn, handle in m["hyp_shared"]}
        self._vms_created = int(m["vms_created"])
        self.rebuild_slabs()
        self._check_handle_counter()
        self._restore_optional_state(m, legacy=streams is None)
        for stream in (streams or {}).values():
            stream.finish()

    @staticmethod
    def _unpack_records(m: Mapping[str, Any], streams: Mapping[str, IntsIn]) -> dict[str, Any]:
        """A version-2 machine section with what its "records" and "hyp_stage1" streams
        hold put back where version 1 had it (owners, shares, EL2's stage-1)."""
        records = streams["records"]
        pfns, handles, codes = records.take_list(), records.take_list(), records.take_list()
        return {
            **m,
            "owners": {pfn: (handle, _POOL_KINDS[code])
                       for pfn, handle, code in zip(pfns, handles, codes, strict=True)},
            "hyp_shared": records.take_pairs(),
            "guest_shared": records.take_pairs(),
            "kernel_shared": records.take_pairs(),
            "hyp_stage1": HypStage1.take_state(m["hyp_stage1"], streams["hyp_stage1"]),
        }

    def _load_pages(self, other: Sequence[Any], pages: IntsIn) -> None:
        """Write the pages of a version-2 "physmem" stream (and of the JSON list for the
        pages that are not tables), in their saved order."""
        physmem = self.physmem
        others = iter(other)
        while not pages.at_end():
            pfn, entries = pages.take_page()
            physmem.write(pfn, decode_page(next(others)) if entries is None else entries)
        if next(others, None) is not None:
            raise ValueError("physmem: more JSON pages than the stream names")

    def _rebuild_vm(self, state: Mapping[str, Any],
                    ints: IntsIn | None) -> tuple[GuestVm, Mapping[str, Any] | None]:
        """A VM from its saved fields (`ints`: a version-2 file's "vms" stream), and its
        pool's saved state (version 1's form); its pool is initialised over the PGD range
        as at creation (the vmemmap and free lists are then overwritten with the file's)."""
        vm = GuestVm.from_state(state, ints)
        pool_state = state["pool"]
        if "ran" not in state:  # files from before VMs had two steps: a VM at EL2 had run
            vm.ran = pool_state is not None
        if pool_state is None:
            return vm, None
        vm.pool = HypPool(self.vmemmap, self.physmem, vm.pgd_base_pfn, vm.pgd_pages, 0,
                          page_shift=self.page_shift, max_order_cap=self.max_order,
                          max_order_formula="v5.17", name=f"vm/{vm.handle}")
        if ints is not None:
            pool_state = vm.pool.take_state(pool_state, ints)
        vm.mm = GuestMmOps(vm, self.physmem, self.vmemmap.layout.refcount_max)
        vm.mm.allocated = int(state["tables_allocated"])
        vm.pgt = Stage2PageTable(self.geometry, self.config.ia_bits, self.physmem, vm.mm,
                                 [int(pfn) for pfn in state["pgd_pfns"]],
                                 on_refcount_limit=self.host_stage2.count_refcount_limit)
        return vm, pool_state

    def _load_vmemmap(self, segments: Sequence[Mapping[str, Any]],
                      blobs: Sequence[bytes | SparseBytes]) -> None:
        live = self.vmemmap.segments
        if [(s["base_pfn"], s["nr_pages"]) for s in segments] != [
                (s.base_pfn, s.nr_pages) for s in live]:
            raise ValueError("the file's vmemmap segments differ from the configuration's")
        for seg, blob in zip(live, blobs, strict=True):  # in place: the pools index them
            if isinstance(blob, bytes):
                seg.import_bytes(blob)
            else:  # a version-2 file's stored chunks, read in place
                seg.import_spans(blob.raw_bytes, blob.span)  # (len() fails past 2**63)

    def _check_handle_counter(self) -> None:
        """Handles are never reused (the next is VM_HANDLE_OFFSET + VMs ever created): a
        counter at or below a live VM's or a page owner's handle would hand one out again."""
        handles = set(self._vms) | {handle for handle, _kind in self._owners.values()}
        next_handle = VM_HANDLE_OFFSET + self._vms_created
        if handles and max(handles) >= next_handle:
            raise ValueError(f"vms_created {self._vms_created} would give handle"
                             f" {next_handle:#x} again, but VM {max(handles):#x} exists")

    def _restore_optional_state(self, m: Mapping[str, Any], *, legacy: bool) -> None:
        """Parts older files lack (written before the model had them): such a file leaves
        the part as a fresh boot has it. `legacy`: a version-1 file, which may hold guest
        shares the way the model kept them before."""
        if "hyp_stage1" in m:
            s1_state = m["hyp_stage1"]
            if self.hyp_stage1.va_layout is not None and s1_state.get("va") != "linear":
                # Written before EL2's boot was modelled (v6.1/v6.12): its tables are keyed
                # by PA and nothing was charged at boot. Restore that machine as it was.
                self.hyp_stage1 = self._legacy_stage1()
            self.hyp_stage1.restore(s1_state)
        if "guest_shared" in m:
            self._guest_shared.clear()
            self._guest_shared.update({int(pfn): int(count) for pfn, count in m["guest_shared"]})
            # Files from before guest shares kept the host state in the vmemmap (as v6.14
            # does) marked those pages SHARED_OWNED in the host stage-2: make them OWNED.
            # (Version 2 was never written by such a model.)
            marked = [] if not legacy else [
                pfn for pfn in sorted(self._guest_shared)
                if self.host_stage2.host_state(pfn) is PageState.SHARED_OWNED]
            if marked:
                self.host_stage2.set_page_state(marked, STATE_OWNED)
        if "kernel_shared" in m:
            self._kernel_shared.clear()
            self._kernel_shared.update({int(pfn): int(count)
                                        for pfn, count in m["kernel_shared"]})
            task_fp_pfn = m.get("task_fp_pfn")
            self._task_fp_pfn = None if task_fp_pfn is None else int(task_fp_pfn)

    def _legacy_stage1(self) -> HypStage1:
        """EL2's stage-1 as files written before the boot model had it: hyp VA = PA, the
        carve-out mapped at boot, no boot table charged to the hyp pool (such files also say
        hyp_s1_early_used_pages 0)."""
        if self.hyp_pool.reserved_pages:
            raise ValueError("a file from before the boot model must have no early pages")
        lay = self.carveout
        return HypStage1(self.page_shift, self.hyp_pool,
                         [(lay.base_pfn, lay.base_pfn + lay.nr_pages)])

    def audit(self) -> None:
        """Prove the whole-machine invariants (ownership, pool sums, table refcounts,
        no host mapping of hyp memory, shared-state consistency); AssertionError if not."""
        from .audit import audit

        audit(self)

    def canonical_dump(self, *, host_tables: bool = False) -> dict[str, Any]:
        """A deterministic, JSON-serialisable picture of the whole state, for comparing.

        By default the host stage-2 is described by what it means, not by how it is laid out:
        its owner annotations and non-default page states, as merged address runs. The host
        stage-2's table pages and the host_s2 pool(s) holding them are left out because the
        kernel never gives back idmap tables (a mapping made lazily, or the empty tables a
        donation's annotation leaves behind, stay until an MMIO recycle), so a VM's life
        changes them without changing any owner or state. `audit()` proves those pools lose
        nothing. host_tables=True adds the raw tables and pools.
        """
        host_pool_ranges = [(p.base_pfn, p.end_pfn) for p in self.host_pools]

        def outside_host_pools(pfn: int) -> bool:
            return not any(lo <= pfn < hi for lo, hi in host_pool_ranges)

        pools = [self.hyp_pool, *(vm.pool for _h, vm in sorted(self._vms.items())
                                   if vm.pool is not None)]
        if host_tables:
            pools[1:1] = self.host_pools
        dump: dict[str, Any] = {
            "config": _jsonable(asdict(self.config)),
            "carveout": [(r.name, r.base_pfn, r.nr_pages) for r in self.carveout.regions],
            "pools": {pool.name: _pool_dump(pool) for pool in pools},
            "host_stage2": self._host_semantic_runs(),
            "vmemmap_sha256": self._vmemmap_digest([] if host_tables else host_pool_ranges),
            "physmem": sorted((pfn, repr(self.physmem.read(pfn)))
                              for pfn in self.physmem.written_pfns()
                              if host_tables or outside_host_pools(pfn)),
            "host_memory": {
                "free": self.host_memory.free_ranges(),
                "allocations": sorted((a.base_pfn, a.nr_pages, a.owner)
                                      for a in self.host_memory.allocations.values()),
            },
            "vms": [
                {**asdict(self._vm_info(vm)), "memcache": list(vm.memcache),
                 "hyp_memcache": list(vm.hyp_memcache),
                 "admitted": list(vm.admitted), "pins": sorted(vm.pins.items()),
                 "guest_tables": sorted(vm.pgt.table_pages()) if vm.pgt else []}
                for _h, vm in sorted(self._vms.items())
            ],
            "owners": sorted((pfn, h, kind.value) for pfn, (h, kind) in self._owners.items()),
            "hyp_shared": sorted(self._hyp_shared.items()),
            "guest_shared": sorted(self._guest_shared.items()),
            "hyp_stage1_tables": self.hyp_stage1.dump(),
        }
        if host_tables:
            pgt = self.host_stage2.pgt
            dump["host_tables"] = sorted(pgt.table_pages())
            dump["host_leaves"] = [(m.start, m.end, m.level, list(m.pte))
                                   for m in pgt.mappings()]
        return dump

    def _host_semantic_runs(self) -> list[tuple[int, int, str]]:
        runs: list[list[Any]] = []
        for m in self.host_stage2.pgt.mappings():
            if m.pte[PTE_KIND] == ANNOTATED:
                what = f"owner:{m.pte[PTE_OWNER]}"
            elif m.pte[PTE_KIND] == LEAF and m.pte[PTE_STATE] != STATE_OWNED:
                what = f"state:{m.pte[PTE_STATE]}"
            else:
                continue
            if runs and runs[-1][1] == m.start and runs[-1][2] == what:
                runs[-1][1] = m.end
            else:
                runs.append([m.start, m.end, what])
        return [(s, e, w) for s, e, w in runs]

    def _vmemmap_digest(self, exclude: list[tuple[int, int]]) -> str:
        digest = hashlib.sha256()
        for seg in self.vmemmap.segments:
            cuts = [seg.base_pfn]
            for lo, hi in sorted(exclude):
                lo, hi = max(lo, seg.base_pfn), min(hi, seg.end_pfn)
                if lo < hi:
                    cuts += [lo, hi]
            cuts.append(seg.end_pfn)
            for a, b in zip(cuts[::2], cuts[1::2], strict=True):
                digest.update(seg.range_bytes(a, b))
        return digest.hexdigest()


def _boot_stage1(config: SimConfig, layout: CarveoutLayout) -> HypStage1:
    """EL2's boot stage-1 (recreate_hyp_mappings) where the profile's boot is modelled
    (core/el2_boot.py); else the carve-out mapped at VA = PA, as before."""
    shift = config.geometry.page_shift
    vmemmap = layout.region("vmemmap")
    boot = machine_boot(config, layout.base_pfn << shift, layout.nr_pages << shift,
                        vmemmap.base_pfn << shift)
    if boot is None:
        return HypStage1(shift, None, [(layout.base_pfn, layout.base_pfn + layout.nr_pages)])
    va_layout, mappings = boot
    return HypStage1(shift, None, va_bits=va_layout.va_bits, boot=mappings,
                     va_layout=va_layout)


def _pool_dump(pool: HypPool) -> dict[str, Any]:
    free = sorted((pfn, order) for order, heads in pool.free_lists().items() for pfn in heads)
    stats = pool.statistics()
    return {
        "base_pfn": pool.base_pfn,
        "nr_pages": pool.nr_pages,
        "reserved": pool.reserved_pages,
        "admitted": stats.admitted_pages,
        "free_blocks": free,
        "held_blocks": list(pool.held_blocks()),
    }


def _subtract(ranges: list[tuple[int, int]], base: int, nr: int) -> list[tuple[int, int]]:
    """(base, nr) ranges minus [base, base + nr)."""
    out: list[tuple[int, int]] = []
    cut_end = base + nr
    for start, n in ranges:
        end = start + n
        if end <= base or start >= cut_end:
            out.append((start, n))
            continue
        if start < base:
            out.append((start, base - start))
        if end > cut_end:
            out.append((cut_end, end - cut_end))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value"):
        return value.value
    return value


# Owner records in a version-2 file: a block's pool as a number (its index here).
_POOL_KINDS = (PoolKind.HYP, PoolKind.VM)
_POOL_KIND_CODES = {kind: code for code, kind in enumerate(_POOL_KINDS)}

__all__ = ["Hypervisor"]


def _check_page_count(nr_pages: int, *, minimum: int) -> None:
    if not minimum <= nr_pages <= MAX_PAGES_PER_CALL:
        raise InvalidArgument(
            f"nr_pages must be in {minimum}..{MAX_PAGES_PER_CALL} per call, not {nr_pages}",
            reason="BAD_SIZE",
        )
