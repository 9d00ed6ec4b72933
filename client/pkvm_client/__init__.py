"""pkvm_client: the Python SDK of the pkvm-sim gRPC service.

    from pkvm_client import Hypervisor

    with Hypervisor("localhost:50051") as hv:
        with hv.create_vm(nr_vcpus=1, slice_pages=256) as vm:
            pfn = vm.alloc_pages(order=0)
            vm.put_page(pfn)
        print(hv.stats())

Depends only on the generated protocol (`pkvm.v1`) and grpcio, never on the simulator.
See `pkvm_client._errors` for the exception hierarchy.
"""

from ._aio import AsyncBatchStream, AsyncHypervisor, AsyncVM
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

__all__ = [
    "MAX_BATCH_OPS",
    "VM",
    "AlreadyExistsError",
    "AsyncBatchStream",
    "AsyncHypervisor",
    "AsyncVM",
    "AuthenticationError",
    "Batch",
    "BatchResult",
    "BatchStream",
    "BusyError",
    "FailedPreconditionError",
    "Hypervisor",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfMemoryError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "PkvmError",
    "TransportError",
    "WouldPanicError",
]
