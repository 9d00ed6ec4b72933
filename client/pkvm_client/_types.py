"""What the SDK's calls return: enums and frozen dataclasses, never raw protobuf messages.

Every attribute has the name of the `pkvm.v1` field it comes from, so a figure reads the same
in the SDK, the protocol and `grpcurl` output::

    stats = hv.stats()                        # Stats
    hyp = stats.pool("hyp")                   # PoolStats
    hyp.free_pages, hyp.free_blocks_per_order
    vm.host_share(pfn).host_state             # PageState.SHARED_OWNED

The enums are `IntEnum`s whose values are the protocol's, so they compare equal to the
generated constants (`PageState.OWNED == pb2.PAGE_STATE_OWNED`).
"""

from __future__ import annotations

import enum
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal, TypeVar, cast

# -- enums ---------------------------------------------------------------------------------------

PoolName = Literal["hyp", "vm"]


class Pool(enum.IntEnum):
    """The pool `alloc_pages` draws from (the protocol's PoolKind)."""

    HYP = 1  # the EL2 stage-1 pool (hpool), shared by every VM
    VM = 2  # the calling VM's own stage-2 pool

    @classmethod
    def of(cls, pool: Pool | PoolName) -> Pool:
        """`pool` as a Pool: a Pool, or its lower-case name 'hyp' / 'vm' (ValueError else)."""
        if isinstance(pool, Pool):  # the common case first: batches call this per operation
            return pool
        if isinstance(pool, str):
            try:
                return cls[pool.upper()]
            except KeyError:
                raise ValueError(f"pool must be 'hyp' or 'vm', not {pool!r}") from None
        return cls(pool)


class PageState(enum.IntEnum):
    """The state of a page in one component's stage-2 (SEMANTICS 4.2)."""

    UNSPECIFIED = 0
    OWNED = 1
    SHARED_OWNED = 2
    SHARED_BORROWED = 3
    NOPAGE = 4  # no access


class FaultOutcome(enum.IntEnum):
    """How a host stage-2 fault ended."""

    UNSPECIFIED = 0
    MAPPED = 1  # a new leaf was installed
    SPURIOUS = 2  # -EAGAIN: already mapped identically
    FATAL = 3  # the real hypervisor would panic; nothing was changed


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmInfo:
    """One VM as the hypervisor knows it (`vm.info`). Its slice of host RAM is its VMM's
    memory: [slice_base_pfn, slice_base_pfn + slice_nr_pages)."""

    handle: int
    vmid: int = 0
    name: str = ""
    nr_vcpus: int = 0
    slice_base_pfn: int = 0
    slice_nr_pages: int = 0
    donated_pages: int = 0  # host pages donated to hyp at creation


@dataclass(frozen=True)
class Fault:
    """The result of a host stage-2 fault (`map_mmio`, `host_fault`). A FATAL outcome is
    reported here, with `errno_name` and `reason`, not raised."""

    addr: int
    is_memory: bool
    outcome: FaultOutcome
    range_start: int  # the mapped block [range_start, range_end)
    range_end: int
    level: int  # page-table level of the leaf
    recycled: bool  # MMIO mappings were recycled (unmap_dev_all) to make room
    recycled_pages: int
    tables_allocated: int  # table pages taken from the pool by this fault
    errno_name: str  # FATAL only
    reason: str  # FATAL only


@dataclass(frozen=True)
class ShareResult:
    """The pages' states after `host_share` / `host_unshare`."""

    pfn: int
    nr_pages: int
    host_state: PageState
    hyp_state: PageState
    pages_done: int  # pages the call changed: nr_pages, or fewer with page_by_page
    failed_pfn: int | None  # page_by_page: the first page refused (None: none was)
    failed_reason: str  # its refusal reason, e.g. HOST_PAGE_NOT_OWNED ('' if none)
    failed_errno: str  # its errno name, e.g. EPERM ('' if none)


@dataclass(frozen=True)
class GuestMapping:
    """A page mapped at an IPA of the guest stage-2 (`guest_map`)."""

    ipa: int
    pfn: int
    level: int
    tables_allocated: int
    refilled_pages: int  # host memcache pages EL2 took (donated) before the map


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of one hyp_pool."""

    name: str  # "hyp", "host_s2" | "host_s2_mem", "host_s2_dev", "vm/<handle>"
    base_pfn: int
    nr_pages: int  # the pool's range
    admitted_pages: int  # pages outside the range given to the pool later (memcache)
    reserved_pages: int
    free_pages: int
    allocated_pages: int
    max_order: int
    free_blocks_per_order: tuple[int, ...]  # index = order
    alloc_failures: int
    total_pages: int  # nr_pages + admitted_pages


@dataclass(frozen=True)
class VmemmapStats:
    """What the vmemmap costs EL2 (`modelled_bytes`) and the simulator (`stored_bytes`)."""

    layout: str  # "32", "4" or "2": bytes per struct hyp_page
    entry_bytes: int
    coverage: str  # "carveout" or "all"
    covered_pages: int
    modelled_bytes: int
    stored_bytes: int
    bytes_per_gib: int


@dataclass(frozen=True)
class HostStage2Stats:
    """Counters of the host stage-2: faults, MMIO recycling, table pages."""

    faults_memory: int
    faults_mmio: int
    spurious_faults: int
    fatal_faults: int
    mmio_recycles: int
    mmio_recycled_pages: int
    map_failures: int
    table_pages: int
    refcount_limit_hits: int


@dataclass(frozen=True)
class Stats:
    """`hv.stats()`: pools, vmemmap, host stage-2 and carve-out figures, taken together."""

    pools: tuple[PoolStats, ...]
    vmemmap: VmemmapStats
    host_stage2: HostStage2Stats
    nr_vms: int
    shared_pages: int
    hyp_mem_pages: int
    carveout_base: int
    carveout_bytes: int
    instance_id: str  # the server process's id: new at every start (docs/state-file.md)

    def pool(self, name: str) -> PoolStats:
        """The pool called `name` ("hyp", "host_s2", "vm/<handle>"...); KeyError if none."""
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


@dataclass(frozen=True)
class PageInfo:
    """The vmemmap entry and page states of one pfn (`hv.page_info(pfn)`)."""

    pfn: int
    covered: bool  # the vmemmap has an entry for this pfn
    refcount: int | None  # None when not covered
    order: int | None  # None for tails and uncovered pfns (HYP_NO_ORDER)
    owner: str  # "host", "hyp", "vm:<handle>", "free", "none"
    pool: str  # empty when the page belongs to no pool
    host_state: PageState
    hyp_state: PageState


@dataclass(frozen=True)
class CarveoutRegion:
    """One region of the carve-out as EL2's early allocator hands it out."""

    name: str  # "vmemmap", "hyp", "host_s2" | "host_s2_mem", "host_s2_dev", "slack"
    base_pfn: int
    nr_pages: int


@dataclass(frozen=True)
class Reservation:
    """The carve-out report (kvm_hyp_reserve) of the server's configuration (`hv.reserve()`)."""

    hyp_s1_pgtable_pages: int
    host_s2_pgtable_pages: int
    vmemmap_pages: int
    hyp_mem_pages: int
    reserved_bytes: int
    vmemmap_bytes_per_gib: int
    profile: str
    page_size: int
    hyp_page_layout: str
    carveout_base: int
    regions: tuple[CarveoutRegion, ...]


@dataclass(frozen=True)
class MemoryRegion:
    """One RAM region of the host's memory map, in bytes."""

    base: int
    size: int


@dataclass(frozen=True)
class PoolMap:
    """A pool's layout: [base_pfn, base_pfn + nr_pages), of which the first reserved_pages
    are reserved, free blocks where listed, every other page allocated."""

    name: str
    base_pfn: int
    nr_pages: int
    reserved_pages: int
    free_block_pfns: tuple[int, ...]  # block heads, ascending
    free_block_orders: tuple[int, ...]  # the order of the block at the same index
    admitted_pages: int  # pages outside the range given to the pool later (memcache)


@dataclass(frozen=True)
class MemoryMap:
    """Where RAM, the carve-out and the pools' free blocks are (`hv.memory_map()`)."""

    page_size: int
    memblocks: tuple[MemoryRegion, ...]
    carveout_base: int  # bytes
    carveout_bytes: int
    carveout: tuple[CarveoutRegion, ...]  # in placement order
    pools: tuple[PoolMap, ...]


@dataclass(frozen=True)
class SavedState:
    """What `hv.save_state()` wrote: the server's --state-file (docs/state-file.md)."""

    path: str
    size_bytes: int
    seconds: float  # calls waited only while the state was copied, not for the write
    nr_vms: int
    format_version: int
    instance_id: str  # the server that saved it


# -- protobuf message -> result ------------------------------------------------------------------

R = TypeVar("R")
_Convert = Callable[[Any], Any]


def from_message(cls: type[R], message: Any) -> R:
    """The dataclass `cls` built from a protobuf message with the same field names."""
    plan = _plan(cast(Any, cls))
    return cls(**{name: convert(message) for name, convert in plan})


@functools.cache
def _plan(cls: Any) -> tuple[tuple[str, _Convert], ...]:
    """Per field of `cls`: how to read it from a message (worked out once per class)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _reader(f.name, hints[f.name])) for f in fields(cls))


def _reader(name: str, hint: Any) -> _Convert:
    args = typing.get_args(hint)
    if type(None) in args:  # `int | None`: a proto3 optional field
        return lambda m: getattr(m, name) if m.HasField(name) else None
    if typing.get_origin(hint) is tuple:
        item = args[0]
        if isinstance(item, type) and is_dataclass(item):
            return lambda m: tuple(from_message(item, x) for x in getattr(m, name))
        return lambda m: tuple(getattr(m, name))
    if isinstance(hint, type) and is_dataclass(hint):
        return lambda m: from_message(hint, getattr(m, name))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return lambda m: hint(getattr(m, name))
    return lambda m: getattr(m, name)


# -- per-call timeouts -----------------------------------------------------------------------------


class UseClientDefault:
    """The type of `USE_CLIENT_DEFAULT`: a call's `timeout=` left out, so the client's
    `timeout` applies (`timeout=None` means no deadline at all)."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


USE_CLIENT_DEFAULT = UseClientDefault()
Timeout = float | None | UseClientDefault


def resolve_timeout(timeout: Timeout, default: float | None) -> float | None:
    """The deadline in seconds a call gets: its own `timeout`, else the client's."""
    return default if isinstance(timeout, UseClientDefault) else timeout
