"""Helpers for the many-tenant tests: services with chosen limits, heavy batches, timing."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.limits import Limits
from pkvm_sim.service.server import RunningService, ServerSettings, start

Stub = pb2_grpc.HypervisorServiceStub


def serve(limits: Limits | None = None, **settings: Any) -> RunningService:
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "metrics_listen": None}
    values.update(settings)
    return start(SimConfig(), ServerSettings(limits=limits or Limits(), **values))


def heavy_batch(vm: pb2.VM, nr_ops: int = 4096, pages: int = 256) -> pb2.ExecuteRequest:
    """The heaviest work the default limits accept: share and unshare `pages` pages,
    alternately, `nr_ops` times (about 3 ms per operation here)."""
    ops = [pb2.BATCH_OP_HOST_SHARE, pb2.BATCH_OP_HOST_UNSHARE] * (nr_ops // 2 + 1)
    ops = ops[:nr_ops]
    return pb2.ExecuteRequest(handle=vm.handle, ops=ops, arg0=[vm.slice_base_pfn] * nr_ops,
                              arg1=[pages] * nr_ops)


class OpenStream:
    """An Execute stream fed from a queue: open until `close()`."""

    def __init__(self, stub: Stub, metadata: Any = (), timeout: float | None = None) -> None:
        self.requests: queue.SimpleQueue[pb2.ExecuteRequest | None] = queue.SimpleQueue()
        self.call = stub.Execute(iter(self.requests.get, None), metadata=metadata,
                                 timeout=timeout)

    def send(self, request: pb2.ExecuteRequest) -> pb2.ExecuteResponse:
        self.requests.put(request)
        response: pb2.ExecuteResponse = next(self.call)
        return response

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    """(code, ErrorInfo reason) of a call that must fail."""
    from google.rpc import error_details_pb2  # type: ignore[import-untyped]
    from grpc_status import rpc_status  # type: ignore[import-untyped]

    try:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        reason = ""
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
        return error.code(), reason
    raise AssertionError("the call succeeded")


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start
