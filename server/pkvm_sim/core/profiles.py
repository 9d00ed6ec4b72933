"""The kernel profiles: one frozen record per modelled kernel version (the `PROFILES` registry).

A profile decides everything that differs between kernel versions; the rest of the core asks
the record (`profile_spec(config.profile)`) instead of testing which version it runs, so a new
profile is a new record here plus the code for what is really new in it.

    profile  struct hyp_page  host stage-2 pools         -ENOMEM on a host fault
    -------  ---------------  -------------------------  ------------------------------------
    v5.13    32 B (layout 32) host_s2_mem + host_s2_dev  MMIO faults recycle MMIO and retry;
                                                         a memory fault's -ENOMEM is fatal
    v5.14    4 B  (layout 4)  host_s2 (one pool)         any fault recycles MMIO and retries
    v6.1     4 B  (layout 4)  host_s2 (one pool)         any fault recycles MMIO and retries
    v6.12    4 B  (layout 4)  host_s2 (one pool)         any fault recycles MMIO and retries
    v6.18    8 B  (layout 8)  host_s2 (one pool)         any fault recycles MMIO and retries
    v7.3     8 B  (layout 8)  host_s2 (one pool)         any fault recycles MMIO and retries

What the reservation (kvm_hyp_reserve) adds up, per profile:

    profile  table levels  vmemmap reserved for                VM table  FF-A proxy  max_order
    -------  ------------  ----------------------------------  --------  ----------  ---------
    v5.13    4             the carve-out (fixed point)         -         -           v5.14
    v5.14    4             the carve-out (fixed point)         -         -           v5.14
    v6.1     4             the carve-out (fixed point)         -         -           v5.17
    v6.12    5 (LPA2)      all memory, region by region        255 ptrs  2 + desc    v6.4
    v6.18    5 (LPA2)      all memory, region by region        255 ptrs  2 + desc    v6.4
    v7.3     5 (LPA2)      all memory, region by region        255 ptrs  2 + desc    v6.4

v6.18 and v7.3 reserve by v6.12's formula with an 8-byte struct hyp_page (v6.14 added the host
page state and the guest-share count to it): 1 MiB more per GiB of RAM with 4K pages.
Their run-time rules (v6.16+) need the build's struct sizes: they are served on a machine
whose build is modelled (el2_boot.KERNEL_IMAGES: the 4K Debian builds) and refused
NOT_MODELLED elsewhere (`unmodelled_operations`, docs/model.md "v6.18/v7.3: run-time
rules"), never served with an older kernel's rules.

This module depends on nothing of ours (layouts are named, see layout.LAYOUTS), so every other
module of the core, and the CLI, can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "MAX_ORDER_FORMULAS",
    "FIRST_KERNEL",
    "KVM_MAX_PVMS",
    "PROFILES",
    "HostRangeSearch",
    "HostS2Pool",
    "VmemmapReservation",
    "KernelProfile",
    "REMOVED_PROFILES",
    "Operation",
    "Profile",
    "kernel_profile_names",
    "version_key",
    "profile_help",
    "profiles_epilog",
    "profile_names",
    "profile_spec",
]


# hyp_pool_init's max_order, as the number of free lists of a pool of n pages (see
# hyp_pool.pool_max_order): 'v5.14' min(MAX_ORDER, get_order(n pages)), MAX_ORDER exclusive;
# 'v5.17' ("Fix hyp_pool max order") get_order(n + 1 pages); 'v6.4' (MAX_ORDER inclusive,
# later MAX_PAGE_ORDER) min(MAX_PAGE_ORDER, get_order(n pages)) + 1 lists.
MAX_ORDER_FORMULAS = ("v5.14", "v5.17", "v6.4")


class Profile(StrEnum):
    """The name of a modelled kernel version (a key of PROFILES)."""

    V5_13 = "v5.13"
    V5_14 = "v5.14"
    V6_1 = "v6.1"
    V6_12 = "v6.12"
    V6_18 = "v6.18"
    V7_3 = "v7.3"


# Profiles that existed and were removed, with what a state file naming one restores as and
# why (core/state_file.py). v6.12+guest-share was v6.12's reservation (4-byte hyp_page) with
# v6.14's guest sharing: no kernel ever had both, so it went when v6.18 came.
REMOVED_PROFILES: dict[str, tuple[str, str]] = {
    "v6.12+guest-share": (
        "v6.12",
        "profile v6.12+guest-share was removed: it mixed v6.12's reservation (4-byte "
        "struct hyp_page) with the guest sharing of v6.14+, which no kernel has; v6.18 "
        "models a kernel with guest sharing",
    ),
}


class VmemmapReservation(StrEnum):
    """What part of memory kvm_hyp_reserve budgets hyp_page entries for."""

    CARVEOUT = "carveout"  # the carve-out's own pages, by fixed point (up to v6.1)
    ALL_MEMORY = "all-memory"  # every memblock, region by region (from v6.2)


class Operation(StrEnum):
    """An EL2 memory operation that exists from some kernel version on (FIRST_KERNEL)."""

    SHARE_HYP = "share pages with hyp"  # __pkvm_host_share_hyp
    UNSHARE_HYP = "unshare pages"  # __pkvm_host_unshare_hyp
    PIN_SHARED = "pin shared pages"  # hyp_pin_shared_mem / hyp_unpin_shared_mem (-EBUSY)
    VMS = "create VMs at EL2"  # __pkvm_init_vm, __pkvm_init_vcpu, __pkvm_teardown_vm
    GUEST_SHARE = "map guest memory"  # __pkvm_host_share_guest + pkvm_refill_memcache


# The first mainline kernel that has each operation (the table of docs/model.md).
FIRST_KERNEL: dict[Operation, str] = {
    Operation.SHARE_HYP: "v5.15",
    Operation.UNSHARE_HYP: "v5.17",
    Operation.PIN_SHARED: "v6.2",
    Operation.VMS: "v6.2",
    Operation.GUEST_SHARE: "v6.14",
}

# arch/arm64/include/asm/kvm_pkvm.h (v6.2 to v6.12): the hyp VM table has this many slots.
KVM_MAX_PVMS = 255


def version_key(name: str) -> tuple[int, ...]:
    """(6, 12) for 'v6.12' or 'v6.12+guest-share': the kernel version a profile models."""
    return tuple(int(part) for part in name.lstrip("v").split("+")[0].split("."))


class HostRangeSearch(StrEnum):
    """How a host stage-2 fault chooses the range it maps around the faulting address."""

    # v5.13/v5.14 kvm_pgtable_stage2_find_range: the largest block, from the top level down,
    # that lies in the address's memory region or MMIO gap and whose existing leaves are all
    # compatible (a block may replace a table of compatible leaves)
    LARGEST_COMPATIBLE = "largest-compatible"
    # v6.x host_stage2_adjust_range: start at the level where the walk met the empty entry and
    # go down until the granule fits the region and the NEXT level supports blocks; the range
    # is then mapped with the largest leaves that fit (a level-0 or, with 16K/64K pages, a
    # level-1 range is mapped by many level-1 or level-2 blocks in one fault)
    FROM_EMPTY_ENTRY = "from-empty-entry"
    # v6.16+ host_stage2_adjust_range ("KVM: arm64: Adjust range correctly during host
    # stage-2 faults", e728e705802f; the level-3 fallback 8531d5a83d8e, backported to 6.18
    # stable after 6.18.15, only matters for regions that are not page aligned): from the
    # level where the walk met the empty entry down, the first level that supports block
    # mappings and whose granule lies in the region; the page at level 3 otherwise. The
    # range is that one block.
    FIRST_FITTING_BLOCK = "first-fitting-block"


@dataclass(frozen=True)
class HostS2Pool:
    """One host stage-2 page-table pool of a profile, and what its budget is made of.

    pages = T * hyp_tables_for_memory + PGD_MAX * pgd_pages + G * gib_allowances, where T is
    the hyp page-table budget for all memory and G the 1 GiB allowance (reservation.py)."""

    name: str  # the carve-out region and pool name: 'host_s2', 'host_s2_mem', 'host_s2_dev'
    hyp_tables_for_memory: bool  # + T
    pgd_pages: bool  # + the concatenated PGD allowance (16)
    gib_allowances: int  # + G times this
    memory_faults: bool  # memory faults, the PGD and annotations take tables from this pool
    mmio_faults: bool  # MMIO faults take tables from this pool
    recycles_mmio: bool  # -ENOMEM here unmaps all MMIO and retries the map once


@dataclass(frozen=True)
class KernelProfile:
    """What one kernel version decides for the model (its facts, not code paths)."""

    profile: Profile
    summary: str  # one line for --help and docs
    default_layout: str  # struct hyp_page layout name (layout.LAYOUTS)
    host_s2_pools: tuple[HostS2Pool, ...]  # in carve-out (bump) order
    max_order_formula: str  # hyp_pool_init's max_order: 'v5.14', 'v5.17' or 'v6.4'
    max_order_inclusive: bool  # MAX_ORDER is a valid order (from v6.4); False: exclusive
    kernel_refs: tuple[str, ...]  # where the kernel decides what this record says
    # -- kvm_hyp_reserve -----------------------------------------------------------------
    hyp_pgtable_levels: int = 4  # levels __hyp_pgtable_max_pages provisions per mapping
    vmemmap_reservation: VmemmapReservation = VmemmapReservation.CARVEOUT
    vm_table_entries: int = 0  # KVM_MAX_PVMS pointers in the hyp VM table (0: no table)
    ffa_mailbox_pages: int = 0  # FF-A proxy: RX + TX mailbox pages (0: no FF-A proxy)
    ffa_descriptor_bytes: int = 0  # FF-A proxy: the largest fragmented descriptor buffered
    # -- host stage-2 ------------------------------------------------------------------
    host_s2_range_search: HostRangeSearch = HostRangeSearch.LARGEST_COMPATIBLE
    # A host fault on an annotated (non-host-owned) entry: False, the hypervisor panics
    # (BUG_ON in handle_host_mem_abort up to 6.18); True, EL2 injects a data abort back
    # into the host (host_inject_mem_abort, 7.x) and survives.
    annotated_fault_injects_abort: bool = False
    # -- quirks config.faithful_bugs reproduces (only where this version has them) --------
    range_is_memory_off_by_one: bool = False  # tests the exclusive end (fixed in v5.14)
    # -- what was checked against a booted kernel (tests/kernel, pkvm-sim kernel-check) ----
    booted_page_sizes: tuple[str, ...] = ()  # Debian kernels exist and were booted for these

    @property
    def has_ffa_proxy(self) -> bool:
        return self.ffa_mailbox_pages > 0

    # -- which EL2 operations exist (sharing helper) -------------------------------------
    # Operations modelled beyond the kernel version, turned on knowingly (an extension
    # profile; none is registered today).
    extra_operations: frozenset[Operation] = frozenset()
    # Operations this kernel has whose rules need a modelled build (el2_boot.KERNEL_IMAGES):
    # refused NOT_MODELLED on a machine without one, rather than served with another
    # version's rules; served where the build is modelled (Hypervisor.operations).
    unmodelled_operations: frozenset[Operation] = frozenset()
    # True for v5.13/v5.14: with vmemmap_coverage 'all' (the quick-start default) these
    # profiles also serve every later EL2 operation, with the later kernels' rules, on this
    # version's allocator and reservation (the v6.2 machine). With 'carveout' they
    # are exactly their kernel: no sharing, no VMs at EL2.
    full_vmemmap_extension: bool = False

    @property
    def is_extension(self) -> bool:
        """True for a profile that models more than any released kernel: reservation
        comparisons and kernel checks skip it, its base profile stands for it."""
        return bool(self.extra_operations)

    def native_operations(self) -> frozenset[Operation]:
        """The EL2 operations the modelled kernel has (FIRST_KERNEL)."""
        version = version_key(self.profile.value)
        return frozenset(op for op, first in FIRST_KERNEL.items()
                         if version >= version_key(first))

    def operations(self, vmemmap_coverage: str) -> frozenset[Operation]:
        """The EL2 operations this profile serves under a vmemmap coverage."""
        if self.full_vmemmap_extension and vmemmap_coverage == "all":
            return frozenset(Operation)
        served = self.native_operations() | self.extra_operations
        return served - self.unmodelled_operations

    @property
    def split_host_s2_pools(self) -> bool:
        """True when memory and MMIO faults draw their tables from different pools."""
        return len(self.host_s2_pools) > 1

    def host_s2_pool_for(self, *, is_memory: bool) -> HostS2Pool:
        """The pool a host fault on memory (or MMIO) allocates its tables from."""
        for pool in self.host_s2_pools:
            if pool.memory_faults if is_memory else pool.mmio_faults:
                return pool
        raise AssertionError(f"profile {self.profile} has no pool for this fault")


_MERGED_POOL = HostS2Pool(
    "host_s2", hyp_tables_for_memory=True, pgd_pages=True, gib_allowances=1,
    memory_faults=True, mmio_faults=True, recycles_mmio=True,
)

def _today(profile: Profile, *, summary: str, injects_abort: bool) -> KernelProfile:
    """v6.18 and v7.3: kvm_hyp_reserve as in v6.12 (arch/arm64/kvm/pkvm.c and
    asm/kvm_pkvm.h: 5-level budgets, vmemmap region by region, VM table, FF-A proxy with the
    same descriptor bound; pkvm_selftest_pages() is 0 without CONFIG_NVHE_EL2_DEBUG, which
    Debian's kernels do not set), with STRUCT_HYP_PAGE_SIZE 8 (nvhe/memory.h)."""
    return KernelProfile(
        profile=profile,
        summary=summary,
        default_layout="8",
        host_s2_pools=(_MERGED_POOL,),
        max_order_formula="v6.4",
        max_order_inclusive=True,
        kernel_refs=(
            "arch/arm64/kvm/pkvm.c kvm_hyp_reserve",
            "arch/arm64/include/asm/kvm_pkvm.h hyp_vmemmap_pages, hyp_vm_table_pages, "
            "hyp_ffa_proxy_pages, pkvm_selftest_pages",
            "arch/arm64/kvm/hyp/include/nvhe/memory.h struct hyp_page (8 bytes)",
            "arch/arm64/kvm/hyp/hyp-constants.c STRUCT_HYP_PAGE_SIZE",
            "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
            "arch/arm64/kvm/hyp/nvhe/page_alloc.c hyp_pool_init (MAX_PAGE_ORDER)",
            "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_adjust_range",
        ),
        hyp_pgtable_levels=5,
        vmemmap_reservation=VmemmapReservation.ALL_MEMORY,
        vm_table_entries=255,
        ffa_mailbox_pages=2,
        ffa_descriptor_bytes=48 + 32 + 16 + 2048 * 16,  # as v6.12 (include/linux/arm_ffa.h)
        host_s2_range_search=HostRangeSearch.FIRST_FITTING_BLOCK,
        annotated_fault_injects_abort=injects_abort,
        booted_page_sizes=("4K", "16K"),
        # v6.16+: a host share no longer maps the page at EL2 (hyp_pin_shared_mem does, on
        # the first pin); VM creation donates and pins by the build's struct sizes; the VM
        # slot is taken at KVM_CREATE_VM. The core applies these rules where the build is
        # modelled (Hypervisor: build.share_maps_at_el2 False); on any other machine (16K
        # pages today) the operations are refused NOT_MODELLED.
        unmodelled_operations=frozenset(Operation),
    )


PROFILES: dict[Profile, KernelProfile] = {
    spec.profile: spec
    for spec in (
        KernelProfile(
            profile=Profile.V5_13,
            summary="before 'Reduce hyp_vmemmap overhead': 32-byte hyp_page, "
            "separate memory and MMIO host stage-2 pools",
            default_layout="32",
            host_s2_pools=(
                HostS2Pool("host_s2_mem", hyp_tables_for_memory=True, pgd_pages=True,
                           gib_allowances=0, memory_faults=True, mmio_faults=False,
                           recycles_mmio=False),
                HostS2Pool("host_s2_dev", hyp_tables_for_memory=False, pgd_pages=False,
                           gib_allowances=1, memory_faults=False, mmio_faults=True,
                           recycles_mmio=True),
            ),
            max_order_formula="v5.14",
            max_order_inclusive=False,
            full_vmemmap_extension=True,
            kernel_refs=(
                "arch/arm64/kvm/hyp/reserved_mem.c kvm_hyp_reserve",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_idmap",
            ),
            # "KVM: arm64: Fix off-by-one in range_is_memory" (tests end - 1) was merged for
            # v5.14 and backported to 5.13.12: only v5.13.0 to 5.13.11 have it.
            range_is_memory_off_by_one=True,
        ),
        KernelProfile(
            profile=Profile.V5_14,
            summary="after 'Reduce hyp_vmemmap overhead': 4-byte hyp_page, "
            "one host stage-2 pool",
            default_layout="4",
            host_s2_pools=(_MERGED_POOL,),
            max_order_formula="v5.14",
            max_order_inclusive=False,
            full_vmemmap_extension=True,
            kernel_refs=(
                "arch/arm64/kvm/hyp/reserved_mem.c kvm_hyp_reserve",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_idmap",
            ),
        ),
        KernelProfile(
            profile=Profile.V6_1,
            summary="LTS 6.1: reservation as v5.14 (4 levels, carve-out vmemmap), "
            "hyp_pool max_order from 'Fix hyp_pool max order' (v5.17)",
            default_layout="4",
            host_s2_pools=(_MERGED_POOL,),
            max_order_formula="v5.17",
            max_order_inclusive=False,
            kernel_refs=(
                "arch/arm64/kvm/pkvm.c kvm_hyp_reserve",
                "arch/arm64/include/asm/kvm_pkvm.h hyp_s1_pgtable_pages, host_s2_pgtable_pages",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/page_alloc.c hyp_pool_init",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_adjust_range",
            ),
            host_s2_range_search=HostRangeSearch.FROM_EMPTY_ENTRY,
            booted_page_sizes=("4K",),
        ),
        KernelProfile(
            profile=Profile.V6_12,
            summary="LTS 6.12: 5-level table budgets, vmemmap for all memory region by "
            "region, VM table, FF-A proxy pages; MAX_PAGE_ORDER inclusive",
            default_layout="4",
            host_s2_pools=(_MERGED_POOL,),
            max_order_formula="v6.4",
            max_order_inclusive=True,
            kernel_refs=(
                "arch/arm64/kvm/pkvm.c kvm_hyp_reserve",
                "arch/arm64/include/asm/kvm_pkvm.h hyp_vmemmap_pages, hyp_vm_table_pages, "
                "hyp_ffa_proxy_pages",
                "arch/arm64/include/asm/kvm_pgtable.h KVM_PGTABLE_FIRST_LEVEL (-1)",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/page_alloc.c hyp_pool_init (MAX_PAGE_ORDER)",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_adjust_range",
            ),
            hyp_pgtable_levels=5,
            vmemmap_reservation=VmemmapReservation.ALL_MEMORY,
            vm_table_entries=255,
            ffa_mailbox_pages=2,
            # sizeof(ffa_mem_region) 48 + sizeof(ffa_mem_region_attributes) 32 (with the
            # 16-byte impdef field) + sizeof(ffa_composite_mem_region) 16
            # + SG_MAX_SEGMENTS (2048) * sizeof(ffa_mem_region_addr_range) 16
            ffa_descriptor_bytes=48 + 32 + 16 + 2048 * 16,
            host_s2_range_search=HostRangeSearch.FROM_EMPTY_ENTRY,
            booted_page_sizes=("4K", "16K"),
        ),
        _today(
            Profile.V6_18,
            summary="LTS 6.18 (Android's next GKI): v6.12's reservation with an 8-byte "
            "hyp_page (host state + guest-share count); guest sharing at EL2",
            injects_abort=False,  # the host-side protected-guest series is not in 6.18
        ),
        _today(
            Profile.V7_3,
            summary="7.3: as v6.18 for the reservation and the hyp_page; guest sharing by "
            "range, donation to protected guests from the host side",
            injects_abort=True,  # 7.3 nvhe/mem_protect.c handle_host_mem_abort
        ),
    )
}


def profile_spec(profile: Profile | str) -> KernelProfile:
    """The record of a profile; ValueError naming the known ones for an unknown name."""
    try:
        return PROFILES[Profile(profile)]
    except (ValueError, KeyError):
        raise ValueError(
            f"unknown profile {profile!r}: choose one of {', '.join(profile_names())}"
        ) from None


def profile_names() -> tuple[str, ...]:
    """Profile names in registry order (oldest first): CLI choices and help."""
    return tuple(p.value for p in PROFILES)


def kernel_profile_names() -> tuple[str, ...]:
    """Profiles that are a released kernel (no extension profiles), oldest first."""
    return tuple(p.value for p, spec in PROFILES.items() if not spec.is_extension)


def profiles_epilog() -> str:
    """One line per profile (name: summary), for the CLIs' --help."""
    width = max(len(name) for name in profile_names())
    return "profiles:\n" + "\n".join(
        f"  {spec.profile.value:<{width}} {spec.summary}" for spec in PROFILES.values()
    )


def profile_help() -> str:
    """'v5.13|v5.14': the metavar the CLIs show."""
    return "|".join(profile_names())
