"""pkvm_client: the Python SDK of the pkvm-sim gRPC service.

    from pkvm_client import Hypervisor, Pool

    with Hypervisor("localhost:50051") as hv:
        with hv.create_vm(nr_vcpus=1, slice_pages=256) as vm:
            pfn = vm.alloc_pages(order=0, pool=Pool.HYP, timeout=2.0)
            vm.put_page(pfn)
        print(hv.stats().pool("hyp").free_pages)

The surface is what `__all__` lists (a test pins it):

- connections and VMs: `Hypervisor` / `VM` / `BatchStream` and their asyncio twins
  `AsyncHypervisor` / `AsyncVM` / `AsyncBatchStream` (`AsyncVMCreation` is what
  `AsyncHypervisor.create_vm` returns: `async with hv.create_vm(...) as vm`);
- batches: `Batch`, `BatchResult`, `MAX_BATCH_OPS`;
- results, frozen dataclasses whose attributes are named as the protocol's fields (`_types`):
  `VmInfo`, `Fault`, `ShareResult`, `GuestMapping`, `Stats`, `PoolStats`, `VmemmapStats`,
  `HostStage2Stats`, `PageInfo`, `Reservation`, `CarveoutRegion`, `SavedState`, `MemoryMap`,
  `MemoryRegion`, `PoolMap`; enums `Pool`, `PageState`, `FaultOutcome`;
- errors: `PkvmError` and its subclasses, drawn as a tree in `pkvm_client._errors`.

Every call takes `timeout=` (seconds; None = no deadline; left out = the client's `timeout`).
Depends only on the generated protocol (`pkvm.v1`) and grpcio, never on the simulator.
"""

from ._aio import AsyncBatchStream, AsyncHypervisor, AsyncVM, AsyncVMCreation
from ._batch import MAX_BATCH_OPS, Batch, BatchResult
from ._client import VM, BatchStream, Hypervisor
from ._errors import (
    AlreadyExistsError,
    AuthenticationError,
    BusyError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    OutOfMemoryError,
    OutOfRangeError,
    PermissionDeniedError,
    PkvmError,
    TransportError,
    WouldPanicError,
)
from ._types import (
    CarveoutRegion,
    Fault,
    FaultOutcome,
    GuestMapping,
    HostStage2Stats,
    MemoryMap,
    MemoryRegion,
    PageInfo,
    PageState,
    Pool,
    PoolMap,
    PoolStats,
    Reservation,
    SavedState,
    ShareResult,
    Stats,
    VmemmapStats,
    VmInfo,
)

__all__ = [
    "MAX_BATCH_OPS",
    "VM",
    "AlreadyExistsError",
    "AsyncBatchStream",
    "AsyncHypervisor",
    "AsyncVM",
    "AsyncVMCreation",
    "AuthenticationError",
    "Batch",
    "BatchResult",
    "BatchStream",
    "BusyError",
    "CarveoutRegion",
    "FailedPreconditionError",
    "Fault",
    "FaultOutcome",
    "GuestMapping",
    "HostStage2Stats",
    "Hypervisor",
    "InvalidArgumentError",
    "MemoryMap",
    "MemoryRegion",
    "NotFoundError",
    "OutOfMemoryError",
    "OutOfRangeError",
    "PageInfo",
    "PageState",
    "PermissionDeniedError",
    "PkvmError",
    "Pool",
    "PoolMap",
    "PoolStats",
    "Reservation",
    "SavedState",
    "ShareResult",
    "Stats",
    "TransportError",
    "VmInfo",
    "VmemmapStats",
    "WouldPanicError",
]
