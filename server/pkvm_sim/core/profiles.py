"""The kernel profiles: one frozen record per modelled kernel version (the `PROFILES` registry).

A profile decides everything that differs between kernel versions; the rest of the core asks
the record (`profile_spec(config.profile)`) instead of testing which version it runs, so a new
profile is a new record here plus the code for what is really new in it.

    profile  struct hyp_page  host stage-2 pools         -ENOMEM on a host fault
    -------  ---------------  -------------------------  ------------------------------------
    v5.13    32 B (layout 32) host_s2_mem + host_s2_dev  MMIO faults recycle MMIO and retry;
                                                         a memory fault's -ENOMEM is fatal
    v5.14    4 B  (layout 4)  host_s2 (one pool)         any fault recycles MMIO and retries

This module depends on nothing of ours (layouts are named, see layout.LAYOUTS), so every other
module of the core, and the CLI, can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "PROFILES",
    "HostS2Pool",
    "KernelProfile",
    "Profile",
    "profile_help",
    "profile_names",
    "profile_spec",
]


class Profile(StrEnum):
    """The name of a modelled kernel version (a key of PROFILES)."""

    V5_13 = "v5.13"
    V5_14 = "v5.14"


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
    max_order_formula: str  # hyp_pool_init's max_order: 'v5.14' or 'v5.17'
    max_order_inclusive: bool  # MAX_ORDER is a valid order (from v6.4); False: exclusive
    kernel_refs: tuple[str, ...]  # where the kernel decides what this record says

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
            kernel_refs=(
                "arch/arm64/kvm/hyp/reserved_mem.c kvm_hyp_reserve",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_idmap",
            ),
        ),
        KernelProfile(
            profile=Profile.V5_14,
            summary="after 'Reduce hyp_vmemmap overhead': 4-byte hyp_page, "
            "one host stage-2 pool",
            default_layout="4",
            host_s2_pools=(_MERGED_POOL,),
            max_order_formula="v5.14",
            max_order_inclusive=False,
            kernel_refs=(
                "arch/arm64/kvm/hyp/reserved_mem.c kvm_hyp_reserve",
                "arch/arm64/kvm/hyp/nvhe/setup.c divide_memory_pool",
                "arch/arm64/kvm/hyp/nvhe/mem_protect.c host_stage2_idmap",
            ),
        ),
    )
}


def profile_spec(profile: Profile | str) -> KernelProfile:
    """The record of a profile; ValueError naming the known ones for an unknown name."""
    try:
        return PROFILES[Profile(profile)]
    except ValueError:
        raise ValueError(
            f"unknown profile {profile!r}: choose one of {', '.join(profile_names())}"
        ) from None


def profile_names() -> tuple[str, ...]:
    """Profile names in registry order (oldest first): CLI choices and help."""
    return tuple(p.value for p in PROFILES)


def profile_help() -> str:
    """'v5.13|v5.14': the metavar the CLIs show."""
    return "|".join(profile_names())
