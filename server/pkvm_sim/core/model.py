"""Plain result types of the simulated hypervisor's public API.

All are frozen dataclasses holding ints, strings and enums only, so the service, the
metrics collector and the CLI render the same figures without recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, final

from .hyp_pool import PoolStatistics
from .records import ValueRecord


class PoolKind(StrEnum):
    """Which pool a client allocation draws from."""

    HYP = "hyp"  # the EL2 stage-1 pool (hpool)
    VM = "vm"  # the calling VM's own stage-2 pool


class PageState(StrEnum):
    """Page state of one component (docs/stage2.md, Sharing); NOPAGE = no access."""

    OWNED = "owned"
    SHARED_OWNED = "shared_owned"
    SHARED_BORROWED = "shared_borrowed"
    NOPAGE = "nopage"


class FaultOutcome(StrEnum):
    MAPPED = "mapped"  # a new leaf was installed
    SPURIOUS = "spurious"  # -EAGAIN: already mapped identically
    FATAL = "fatal"  # the real hypervisor would panic; nothing was changed, except after
    # -ENOMEM (errno_name 'ENOMEM', or a refcount limit met on the retry): partial edits and
    # the MMIO recycle stay (3.5), as `reason` says


@dataclass(frozen=True)
class VmInfo:
    handle: int  # 0x1000, 0x1001, ...: never reused within a machine's lifetime
    vmid: int  # table index + 1 (VMID 0 is the host)
    name: str
    nr_vcpus: int
    slice_base_pfn: int  # the VM's slice of host RAM: its VMM's memory
    slice_nr_pages: int
    donated_pages: int  # host pages donated to hyp at creation (metadata + guest PGD)


@final
class FaultResult(ValueRecord):
    """Outcome of a host stage-2 fault (host_fault) or an MMIO fault (map_mmio). Built by
    keyword only, as every result record here with more than a few fields; read-only.

    A ValueRecord (records.py), not a frozen dataclass: one is built per fault, and the
    dataclass's __init__ was most of a spurious fault's cost in the compiled core."""

    _FIELDS = ("addr", "is_memory", "outcome", "range_start", "range_end", "level",
               "recycled", "recycled_pages", "tables_allocated", "errno_name", "reason")
    __slots__ = _FIELDS
    # (the service's result-to-message conversion finds the fields with dir(): the slots)

    def __init__(self, *, addr: int, is_memory: bool, outcome: FaultOutcome, range_start: int,
                 range_end: int, level: int, recycled: bool = False, recycled_pages: int = 0,
                 tables_allocated: int = 0, errno_name: str | None = None,
                 reason: str | None = None) -> None:
        self.addr: Final = addr
        self.is_memory: Final = is_memory
        self.outcome: Final = outcome
        # the mapped block [range_start, range_end); equals addr's page if fatal
        self.range_start: Final = range_start
        self.range_end: Final = range_end
        self.level: Final = level  # page-table level of the leaf (1, 2 or 3)
        self.recycled: Final = recycled  # unmap_dev_all ran to make room
        self.recycled_pages: Final = recycled_pages  # table pages that recycle freed
        # table pages this fault added that are still in use (a table the first attempt
        # took and the recycle freed is not counted; one taken again once)
        self.tables_allocated: Final = tables_allocated
        self.errno_name: Final = errno_name  # for FATAL: 'EEXIST', 'ENOMEM', ...
        self.reason: Final = reason  # for FATAL: human-readable cause



@dataclass(frozen=True)
class ShareResult:
    pfn: int
    nr_pages: int
    host_state: PageState  # of the pages the call changed
    hyp_state: PageState
    pages_done: int = 0  # pages the call changed: nr_pages, or fewer page by page
    failed_pfn: int | None = None  # page by page: the page whose share was refused
    failed_reason: str | None = None  # its refusal reason (e.g. HOST_PAGE_NOT_OWNED)
    failed_errno: str | None = None  # its errno name (e.g. 'EPERM')


@dataclass(frozen=True, kw_only=True)
class TeardownResult:
    """What destroying a VM gave back, the kernel's steps apart from the service's."""

    pages_returned: int  # everything: slice, donated, memcache and hyp pool pages
    el2_returned_pages: int  # __pkvm_teardown_vm: donated metadata + PGD + memcache pages
    guest_unshared_pages: int  # host pages shared with the guest, OWNED again (reclaim)
    unpinned_pages: int  # pages EL2 had pinned for the VM, unpinned
    host_unshared_pages: int  # the service's clean-up: hyp shares dropped (in the kernel
    # the host unshares them itself after the teardown)


@dataclass(frozen=True)
class GuestMapResult:
    ipa: int
    pfn: int
    level: int
    tables_allocated: int
    refilled_pages: int = 0  # host memcache pages EL2 took (donated) before mapping


@dataclass(frozen=True)
class PageInfo:
    pfn: int
    covered: bool  # the vmemmap has an entry for this pfn
    refcount: int | None  # None when not covered
    order: int | None  # None for tails / uncovered (HYP_NO_ORDER)
    owner: str  # 'host', 'hyp', 'vm:<handle>', 'free', 'none' (not memory)
    pool: str | None  # the pool this page belongs to, if any
    host_state: PageState
    hyp_state: PageState


@dataclass(frozen=True)
class VmemmapStatistics:
    layout: str  # '32', '4' or '2'
    entry_bytes: int
    coverage: str  # 'carveout' or 'all'
    covered_pages: int
    modelled_bytes: int  # what EL2 spends
    stored_bytes: int  # what the simulator spends
    bytes_per_gib: int  # modelled cost per GiB covered


@dataclass(frozen=True)
class HostStage2Statistics:
    faults_memory: int
    faults_mmio: int
    spurious_faults: int
    fatal_faults: int
    mmio_recycles: int  # unmap_dev_all runs
    mmio_recycled_pages: int  # table pages those runs freed
    map_failures: int  # faults that failed with -ENOMEM even after recycling
    table_pages: int  # table pages currently in use (PGD included)
    refcount_limit_hits: int  # refusals at the hyp_page refcount limit of a table page
    # (host or guest stage-2: faults, donations, shares, top-ups, guest maps), once each


@dataclass(frozen=True)
class HypervisorStatistics:
    pools: tuple[PoolStatistics, ...]
    vmemmap: VmemmapStatistics
    host_stage2: HostStage2Statistics
    nr_vms: int
    shared_pages: int  # pages hyp borrows (shared with hyp)
    hyp_mem_pages: int
    carveout_base: int
    carveout_bytes: int
    guest_shared_pages: int = 0  # host pages shared with guests (v6.14+ guest maps)
    hyp_stage1_table_pages: int = 0  # hyp pool pages in EL2 stage-1 tables for shares/donations
    # hyp pool pages in EL2's boot stage-1 (root included): early-allocator pages reserved at
    # hyp_pool_init plus the fixmap's (0 where the profile's boot is not modelled)
    hyp_stage1_boot_table_pages: int = 0
