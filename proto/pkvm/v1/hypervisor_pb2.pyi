from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PoolKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOL_KIND_UNSPECIFIED: _ClassVar[PoolKind]
    POOL_KIND_HYP: _ClassVar[PoolKind]
    POOL_KIND_VM: _ClassVar[PoolKind]

class PageState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAGE_STATE_UNSPECIFIED: _ClassVar[PageState]
    PAGE_STATE_OWNED: _ClassVar[PageState]
    PAGE_STATE_SHARED_OWNED: _ClassVar[PageState]
    PAGE_STATE_SHARED_BORROWED: _ClassVar[PageState]
    PAGE_STATE_NOPAGE: _ClassVar[PageState]

class FaultOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAULT_OUTCOME_UNSPECIFIED: _ClassVar[FaultOutcome]
    FAULT_OUTCOME_MAPPED: _ClassVar[FaultOutcome]
    FAULT_OUTCOME_SPURIOUS: _ClassVar[FaultOutcome]
    FAULT_OUTCOME_FATAL: _ClassVar[FaultOutcome]

class BatchOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BATCH_OP_UNSPECIFIED: _ClassVar[BatchOp]
    BATCH_OP_ALLOC_PAGES: _ClassVar[BatchOp]
    BATCH_OP_PUT_PAGE: _ClassVar[BatchOp]
    BATCH_OP_GET_PAGE: _ClassVar[BatchOp]
    BATCH_OP_HOST_SHARE: _ClassVar[BatchOp]
    BATCH_OP_HOST_UNSHARE: _ClassVar[BatchOp]
    BATCH_OP_MAP_MMIO: _ClassVar[BatchOp]
    BATCH_OP_HOST_FAULT: _ClassVar[BatchOp]
    BATCH_OP_TOPUP_MEMCACHE: _ClassVar[BatchOp]
    BATCH_OP_GUEST_MAP: _ClassVar[BatchOp]
POOL_KIND_UNSPECIFIED: PoolKind
POOL_KIND_HYP: PoolKind
POOL_KIND_VM: PoolKind
PAGE_STATE_UNSPECIFIED: PageState
PAGE_STATE_OWNED: PageState
PAGE_STATE_SHARED_OWNED: PageState
PAGE_STATE_SHARED_BORROWED: PageState
PAGE_STATE_NOPAGE: PageState
FAULT_OUTCOME_UNSPECIFIED: FaultOutcome
FAULT_OUTCOME_MAPPED: FaultOutcome
FAULT_OUTCOME_SPURIOUS: FaultOutcome
FAULT_OUTCOME_FATAL: FaultOutcome
BATCH_OP_UNSPECIFIED: BatchOp
BATCH_OP_ALLOC_PAGES: BatchOp
BATCH_OP_PUT_PAGE: BatchOp
BATCH_OP_GET_PAGE: BatchOp
BATCH_OP_HOST_SHARE: BatchOp
BATCH_OP_HOST_UNSHARE: BatchOp
BATCH_OP_MAP_MMIO: BatchOp
BATCH_OP_HOST_FAULT: BatchOp
BATCH_OP_TOPUP_MEMCACHE: BatchOp
BATCH_OP_GUEST_MAP: BatchOp

class VM(_message.Message):
    __slots__ = ("handle", "vmid", "name", "nr_vcpus", "slice_base_pfn", "slice_nr_pages", "donated_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    VMID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NR_VCPUS_FIELD_NUMBER: _ClassVar[int]
    SLICE_BASE_PFN_FIELD_NUMBER: _ClassVar[int]
    SLICE_NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    DONATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: int
    vmid: int
    name: str
    nr_vcpus: int
    slice_base_pfn: int
    slice_nr_pages: int
    donated_pages: int
    def __init__(self, handle: _Optional[int] = ..., vmid: _Optional[int] = ..., name: _Optional[str] = ..., nr_vcpus: _Optional[int] = ..., slice_base_pfn: _Optional[int] = ..., slice_nr_pages: _Optional[int] = ..., donated_pages: _Optional[int] = ...) -> None: ...

class CreateVMRequest(_message.Message):
    __slots__ = ("nr_vcpus", "slice_pages", "name", "lease_seconds")
    NR_VCPUS_FIELD_NUMBER: _ClassVar[int]
    SLICE_PAGES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    nr_vcpus: int
    slice_pages: int
    name: str
    lease_seconds: float
    def __init__(self, nr_vcpus: _Optional[int] = ..., slice_pages: _Optional[int] = ..., name: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class CreateVMResponse(_message.Message):
    __slots__ = ("vm", "token", "lease_seconds")
    VM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm: VM
    token: str
    lease_seconds: float
    def __init__(self, vm: _Optional[_Union[VM, _Mapping]] = ..., token: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class DestroyVMRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: int
    def __init__(self, handle: _Optional[int] = ...) -> None: ...

class DestroyVMResponse(_message.Message):
    __slots__ = ("pages_returned",)
    PAGES_RETURNED_FIELD_NUMBER: _ClassVar[int]
    pages_returned: int
    def __init__(self, pages_returned: _Optional[int] = ...) -> None: ...

class RenewVMRequest(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: int
    def __init__(self, handle: _Optional[int] = ...) -> None: ...

class RenewVMResponse(_message.Message):
    __slots__ = ("expires_in_ms", "lease_seconds")
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    expires_in_ms: int
    lease_seconds: float
    def __init__(self, expires_in_ms: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class AllocPagesRequest(_message.Message):
    __slots__ = ("handle", "order", "pool")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    handle: int
    order: int
    pool: PoolKind
    def __init__(self, handle: _Optional[int] = ..., order: _Optional[int] = ..., pool: _Optional[_Union[PoolKind, str]] = ...) -> None: ...

class AllocPagesResponse(_message.Message):
    __slots__ = ("pfn", "order")
    PFN_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    pfn: int
    order: int
    def __init__(self, pfn: _Optional[int] = ..., order: _Optional[int] = ...) -> None: ...

class PutPageRequest(_message.Message):
    __slots__ = ("handle", "pfn")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ...) -> None: ...

class PutPageResponse(_message.Message):
    __slots__ = ("refcount",)
    REFCOUNT_FIELD_NUMBER: _ClassVar[int]
    refcount: int
    def __init__(self, refcount: _Optional[int] = ...) -> None: ...

class GetPageRequest(_message.Message):
    __slots__ = ("handle", "pfn")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ...) -> None: ...

class GetPageResponse(_message.Message):
    __slots__ = ("refcount",)
    REFCOUNT_FIELD_NUMBER: _ClassVar[int]
    refcount: int
    def __init__(self, refcount: _Optional[int] = ...) -> None: ...

class HostShareRequest(_message.Message):
    __slots__ = ("handle", "pfn", "nr_pages", "page_by_page")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_BY_PAGE_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    nr_pages: int
    page_by_page: bool
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ..., page_by_page: _Optional[bool] = ...) -> None: ...

class HostShareResponse(_message.Message):
    __slots__ = ("pfn", "nr_pages", "host_state", "hyp_state", "pages_done", "failed_pfn", "failed_reason", "failed_errno")
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    HOST_STATE_FIELD_NUMBER: _ClassVar[int]
    HYP_STATE_FIELD_NUMBER: _ClassVar[int]
    PAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_PFN_FIELD_NUMBER: _ClassVar[int]
    FAILED_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_ERRNO_FIELD_NUMBER: _ClassVar[int]
    pfn: int
    nr_pages: int
    host_state: PageState
    hyp_state: PageState
    pages_done: int
    failed_pfn: int
    failed_reason: str
    failed_errno: str
    def __init__(self, pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ..., host_state: _Optional[_Union[PageState, str]] = ..., hyp_state: _Optional[_Union[PageState, str]] = ..., pages_done: _Optional[int] = ..., failed_pfn: _Optional[int] = ..., failed_reason: _Optional[str] = ..., failed_errno: _Optional[str] = ...) -> None: ...

class HostUnshareRequest(_message.Message):
    __slots__ = ("handle", "pfn", "nr_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    nr_pages: int
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class HostUnshareResponse(_message.Message):
    __slots__ = ("pfn", "nr_pages", "host_state", "hyp_state", "pages_done", "failed_pfn", "failed_reason", "failed_errno")
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    HOST_STATE_FIELD_NUMBER: _ClassVar[int]
    HYP_STATE_FIELD_NUMBER: _ClassVar[int]
    PAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_PFN_FIELD_NUMBER: _ClassVar[int]
    FAILED_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILED_ERRNO_FIELD_NUMBER: _ClassVar[int]
    pfn: int
    nr_pages: int
    host_state: PageState
    hyp_state: PageState
    pages_done: int
    failed_pfn: int
    failed_reason: str
    failed_errno: str
    def __init__(self, pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ..., host_state: _Optional[_Union[PageState, str]] = ..., hyp_state: _Optional[_Union[PageState, str]] = ..., pages_done: _Optional[int] = ..., failed_pfn: _Optional[int] = ..., failed_reason: _Optional[str] = ..., failed_errno: _Optional[str] = ...) -> None: ...

class PinSharedRequest(_message.Message):
    __slots__ = ("handle", "pfn", "nr_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    nr_pages: int
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class PinSharedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnpinSharedRequest(_message.Message):
    __slots__ = ("handle", "pfn", "nr_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: int
    pfn: int
    nr_pages: int
    def __init__(self, handle: _Optional[int] = ..., pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class UnpinSharedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Fault(_message.Message):
    __slots__ = ("addr", "is_memory", "outcome", "range_start", "range_end", "level", "recycled", "recycled_pages", "tables_allocated", "errno_name", "reason")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    IS_MEMORY_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    RANGE_START_FIELD_NUMBER: _ClassVar[int]
    RANGE_END_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_FIELD_NUMBER: _ClassVar[int]
    RECYCLED_PAGES_FIELD_NUMBER: _ClassVar[int]
    TABLES_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    ERRNO_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    addr: int
    is_memory: bool
    outcome: FaultOutcome
    range_start: int
    range_end: int
    level: int
    recycled: bool
    recycled_pages: int
    tables_allocated: int
    errno_name: str
    reason: str
    def __init__(self, addr: _Optional[int] = ..., is_memory: _Optional[bool] = ..., outcome: _Optional[_Union[FaultOutcome, str]] = ..., range_start: _Optional[int] = ..., range_end: _Optional[int] = ..., level: _Optional[int] = ..., recycled: _Optional[bool] = ..., recycled_pages: _Optional[int] = ..., tables_allocated: _Optional[int] = ..., errno_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class MapMMIORequest(_message.Message):
    __slots__ = ("addr",)
    ADDR_FIELD_NUMBER: _ClassVar[int]
    addr: int
    def __init__(self, addr: _Optional[int] = ...) -> None: ...

class MapMMIOResponse(_message.Message):
    __slots__ = ("fault",)
    FAULT_FIELD_NUMBER: _ClassVar[int]
    fault: Fault
    def __init__(self, fault: _Optional[_Union[Fault, _Mapping]] = ...) -> None: ...

class HostFaultRequest(_message.Message):
    __slots__ = ("addr",)
    ADDR_FIELD_NUMBER: _ClassVar[int]
    addr: int
    def __init__(self, addr: _Optional[int] = ...) -> None: ...

class HostFaultResponse(_message.Message):
    __slots__ = ("fault",)
    FAULT_FIELD_NUMBER: _ClassVar[int]
    fault: Fault
    def __init__(self, fault: _Optional[_Union[Fault, _Mapping]] = ...) -> None: ...

class TopupMemcacheRequest(_message.Message):
    __slots__ = ("handle", "nr_pages")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    handle: int
    nr_pages: int
    def __init__(self, handle: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class TopupMemcacheResponse(_message.Message):
    __slots__ = ("memcache_pages",)
    MEMCACHE_PAGES_FIELD_NUMBER: _ClassVar[int]
    memcache_pages: int
    def __init__(self, memcache_pages: _Optional[int] = ...) -> None: ...

class GuestMapRequest(_message.Message):
    __slots__ = ("handle", "ipa", "pfn")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    IPA_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    handle: int
    ipa: int
    pfn: int
    def __init__(self, handle: _Optional[int] = ..., ipa: _Optional[int] = ..., pfn: _Optional[int] = ...) -> None: ...

class GuestMapResponse(_message.Message):
    __slots__ = ("ipa", "pfn", "level", "tables_allocated", "refilled_pages")
    IPA_FIELD_NUMBER: _ClassVar[int]
    PFN_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TABLES_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    REFILLED_PAGES_FIELD_NUMBER: _ClassVar[int]
    ipa: int
    pfn: int
    level: int
    tables_allocated: int
    refilled_pages: int
    def __init__(self, ipa: _Optional[int] = ..., pfn: _Optional[int] = ..., level: _Optional[int] = ..., tables_allocated: _Optional[int] = ..., refilled_pages: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolStats(_message.Message):
    __slots__ = ("name", "base_pfn", "nr_pages", "admitted_pages", "reserved_pages", "free_pages", "allocated_pages", "max_order", "free_blocks_per_order", "alloc_failures", "total_pages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_PAGES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_ORDER_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_PER_ORDER_FIELD_NUMBER: _ClassVar[int]
    ALLOC_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_pfn: int
    nr_pages: int
    admitted_pages: int
    reserved_pages: int
    free_pages: int
    allocated_pages: int
    max_order: int
    free_blocks_per_order: _containers.RepeatedScalarFieldContainer[int]
    alloc_failures: int
    total_pages: int
    def __init__(self, name: _Optional[str] = ..., base_pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ..., admitted_pages: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., free_pages: _Optional[int] = ..., allocated_pages: _Optional[int] = ..., max_order: _Optional[int] = ..., free_blocks_per_order: _Optional[_Iterable[int]] = ..., alloc_failures: _Optional[int] = ..., total_pages: _Optional[int] = ...) -> None: ...

class VmemmapStats(_message.Message):
    __slots__ = ("layout", "entry_bytes", "coverage", "covered_pages", "modelled_bytes", "stored_bytes", "bytes_per_gib")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ENTRY_BYTES_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    COVERED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MODELLED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_GIB_FIELD_NUMBER: _ClassVar[int]
    layout: str
    entry_bytes: int
    coverage: str
    covered_pages: int
    modelled_bytes: int
    stored_bytes: int
    bytes_per_gib: int
    def __init__(self, layout: _Optional[str] = ..., entry_bytes: _Optional[int] = ..., coverage: _Optional[str] = ..., covered_pages: _Optional[int] = ..., modelled_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., bytes_per_gib: _Optional[int] = ...) -> None: ...

class HostStage2Stats(_message.Message):
    __slots__ = ("faults_memory", "faults_mmio", "spurious_faults", "fatal_faults", "mmio_recycles", "mmio_recycled_pages", "map_failures", "table_pages", "refcount_limit_hits")
    FAULTS_MEMORY_FIELD_NUMBER: _ClassVar[int]
    FAULTS_MMIO_FIELD_NUMBER: _ClassVar[int]
    SPURIOUS_FAULTS_FIELD_NUMBER: _ClassVar[int]
    FATAL_FAULTS_FIELD_NUMBER: _ClassVar[int]
    MMIO_RECYCLES_FIELD_NUMBER: _ClassVar[int]
    MMIO_RECYCLED_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAP_FAILURES_FIELD_NUMBER: _ClassVar[int]
    TABLE_PAGES_FIELD_NUMBER: _ClassVar[int]
    REFCOUNT_LIMIT_HITS_FIELD_NUMBER: _ClassVar[int]
    faults_memory: int
    faults_mmio: int
    spurious_faults: int
    fatal_faults: int
    mmio_recycles: int
    mmio_recycled_pages: int
    map_failures: int
    table_pages: int
    refcount_limit_hits: int
    def __init__(self, faults_memory: _Optional[int] = ..., faults_mmio: _Optional[int] = ..., spurious_faults: _Optional[int] = ..., fatal_faults: _Optional[int] = ..., mmio_recycles: _Optional[int] = ..., mmio_recycled_pages: _Optional[int] = ..., map_failures: _Optional[int] = ..., table_pages: _Optional[int] = ..., refcount_limit_hits: _Optional[int] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("pools", "vmemmap", "host_stage2", "nr_vms", "shared_pages", "hyp_mem_pages", "carveout_base", "carveout_bytes", "instance_id")
    POOLS_FIELD_NUMBER: _ClassVar[int]
    VMEMMAP_FIELD_NUMBER: _ClassVar[int]
    HOST_STAGE2_FIELD_NUMBER: _ClassVar[int]
    NR_VMS_FIELD_NUMBER: _ClassVar[int]
    SHARED_PAGES_FIELD_NUMBER: _ClassVar[int]
    HYP_MEM_PAGES_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_BASE_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedCompositeFieldContainer[PoolStats]
    vmemmap: VmemmapStats
    host_stage2: HostStage2Stats
    nr_vms: int
    shared_pages: int
    hyp_mem_pages: int
    carveout_base: int
    carveout_bytes: int
    instance_id: str
    def __init__(self, pools: _Optional[_Iterable[_Union[PoolStats, _Mapping]]] = ..., vmemmap: _Optional[_Union[VmemmapStats, _Mapping]] = ..., host_stage2: _Optional[_Union[HostStage2Stats, _Mapping]] = ..., nr_vms: _Optional[int] = ..., shared_pages: _Optional[int] = ..., hyp_mem_pages: _Optional[int] = ..., carveout_base: _Optional[int] = ..., carveout_bytes: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class GetPageInfoRequest(_message.Message):
    __slots__ = ("pfn",)
    PFN_FIELD_NUMBER: _ClassVar[int]
    pfn: int
    def __init__(self, pfn: _Optional[int] = ...) -> None: ...

class GetPageInfoResponse(_message.Message):
    __slots__ = ("pfn", "covered", "refcount", "order", "owner", "pool", "host_state", "hyp_state")
    PFN_FIELD_NUMBER: _ClassVar[int]
    COVERED_FIELD_NUMBER: _ClassVar[int]
    REFCOUNT_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    HOST_STATE_FIELD_NUMBER: _ClassVar[int]
    HYP_STATE_FIELD_NUMBER: _ClassVar[int]
    pfn: int
    covered: bool
    refcount: int
    order: int
    owner: str
    pool: str
    host_state: PageState
    hyp_state: PageState
    def __init__(self, pfn: _Optional[int] = ..., covered: _Optional[bool] = ..., refcount: _Optional[int] = ..., order: _Optional[int] = ..., owner: _Optional[str] = ..., pool: _Optional[str] = ..., host_state: _Optional[_Union[PageState, str]] = ..., hyp_state: _Optional[_Union[PageState, str]] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CarveoutRegion(_message.Message):
    __slots__ = ("name", "base_pfn", "nr_pages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_pfn: int
    nr_pages: int
    def __init__(self, name: _Optional[str] = ..., base_pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("hyp_s1_pgtable_pages", "host_s2_pgtable_pages", "vmemmap_pages", "hyp_mem_pages", "reserved_bytes", "vmemmap_bytes_per_gib", "profile", "page_size", "hyp_page_layout", "carveout_base", "regions")
    HYP_S1_PGTABLE_PAGES_FIELD_NUMBER: _ClassVar[int]
    HOST_S2_PGTABLE_PAGES_FIELD_NUMBER: _ClassVar[int]
    VMEMMAP_PAGES_FIELD_NUMBER: _ClassVar[int]
    HYP_MEM_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VMEMMAP_BYTES_PER_GIB_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    HYP_PAGE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_BASE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
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
    regions: _containers.RepeatedCompositeFieldContainer[CarveoutRegion]
    def __init__(self, hyp_s1_pgtable_pages: _Optional[int] = ..., host_s2_pgtable_pages: _Optional[int] = ..., vmemmap_pages: _Optional[int] = ..., hyp_mem_pages: _Optional[int] = ..., reserved_bytes: _Optional[int] = ..., vmemmap_bytes_per_gib: _Optional[int] = ..., profile: _Optional[str] = ..., page_size: _Optional[int] = ..., hyp_page_layout: _Optional[str] = ..., carveout_base: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[CarveoutRegion, _Mapping]]] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("handle", "ops", "arg0", "arg1", "stop_on_error", "batch_id")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    ARG0_FIELD_NUMBER: _ClassVar[int]
    ARG1_FIELD_NUMBER: _ClassVar[int]
    STOP_ON_ERROR_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    handle: int
    ops: _containers.RepeatedScalarFieldContainer[BatchOp]
    arg0: _containers.RepeatedScalarFieldContainer[int]
    arg1: _containers.RepeatedScalarFieldContainer[int]
    stop_on_error: bool
    batch_id: int
    def __init__(self, handle: _Optional[int] = ..., ops: _Optional[_Iterable[_Union[BatchOp, str]]] = ..., arg0: _Optional[_Iterable[int]] = ..., arg1: _Optional[_Iterable[int]] = ..., stop_on_error: _Optional[bool] = ..., batch_id: _Optional[int] = ...) -> None: ...

class BatchError(_message.Message):
    __slots__ = ("index", "reason", "message", "would_panic", "errno")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    WOULD_PANIC_FIELD_NUMBER: _ClassVar[int]
    ERRNO_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    message: str
    would_panic: bool
    errno: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., would_panic: _Optional[bool] = ..., errno: _Optional[str] = ...) -> None: ...

class ExecuteResponse(_message.Message):
    __slots__ = ("batch_id", "codes", "values", "errors", "completed")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    batch_id: int
    codes: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedCompositeFieldContainer[BatchError]
    completed: int
    def __init__(self, batch_id: _Optional[int] = ..., codes: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[_Union[BatchError, _Mapping]]] = ..., completed: _Optional[int] = ...) -> None: ...

class GetMemoryMapRequest(_message.Message):
    __slots__ = ("pools",)
    POOLS_FIELD_NUMBER: _ClassVar[int]
    pools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pools: _Optional[_Iterable[str]] = ...) -> None: ...

class MemoryRegion(_message.Message):
    __slots__ = ("base", "size")
    BASE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    base: int
    size: int
    def __init__(self, base: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class PoolMap(_message.Message):
    __slots__ = ("name", "base_pfn", "nr_pages", "reserved_pages", "free_block_pfns", "free_block_orders", "admitted_pages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_PFN_FIELD_NUMBER: _ClassVar[int]
    NR_PAGES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_PAGES_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCK_PFNS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCK_ORDERS_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_PAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    base_pfn: int
    nr_pages: int
    reserved_pages: int
    free_block_pfns: _containers.RepeatedScalarFieldContainer[int]
    free_block_orders: _containers.RepeatedScalarFieldContainer[int]
    admitted_pages: int
    def __init__(self, name: _Optional[str] = ..., base_pfn: _Optional[int] = ..., nr_pages: _Optional[int] = ..., reserved_pages: _Optional[int] = ..., free_block_pfns: _Optional[_Iterable[int]] = ..., free_block_orders: _Optional[_Iterable[int]] = ..., admitted_pages: _Optional[int] = ...) -> None: ...

class GetMemoryMapResponse(_message.Message):
    __slots__ = ("page_size", "memblocks", "carveout_base", "carveout_bytes", "carveout", "pools")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMBLOCKS_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_BASE_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CARVEOUT_FIELD_NUMBER: _ClassVar[int]
    POOLS_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    memblocks: _containers.RepeatedCompositeFieldContainer[MemoryRegion]
    carveout_base: int
    carveout_bytes: int
    carveout: _containers.RepeatedCompositeFieldContainer[CarveoutRegion]
    pools: _containers.RepeatedCompositeFieldContainer[PoolMap]
    def __init__(self, page_size: _Optional[int] = ..., memblocks: _Optional[_Iterable[_Union[MemoryRegion, _Mapping]]] = ..., carveout_base: _Optional[int] = ..., carveout_bytes: _Optional[int] = ..., carveout: _Optional[_Iterable[_Union[CarveoutRegion, _Mapping]]] = ..., pools: _Optional[_Iterable[_Union[PoolMap, _Mapping]]] = ...) -> None: ...

class SaveStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveStateResponse(_message.Message):
    __slots__ = ("path", "size_bytes", "seconds", "nr_vms", "format_version", "instance_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    NR_VMS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    size_bytes: int
    seconds: float
    nr_vms: int
    format_version: int
    instance_id: str
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., nr_vms: _Optional[int] = ..., format_version: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...
