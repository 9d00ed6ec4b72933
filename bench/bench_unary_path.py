"""Benchmark: the Python a unary call runs in the service, in process, without gRPC.

    python bench/bench_unary_path.py              # about 20 seconds
    python bench/bench_unary_path.py --calls 5000 --repeats 3

The handlers the server registers for AllocPages and PutPage (`decoding.add_servicer`: the
request parser and the servicer's one coroutine per method, which counts its own metrics)
are called directly on an event loop with a stand-in for gRPC's servicer context, pair
after pair, as the 64-VM phase of `bench/bench_service.py` calls them, next to coroutines
that answer like that benchmark's echo service. What this leaves out is gRPC itself (the
same for both) and the machine's state: on the project's loaded 2-vCPU machines a
microsecond here was several in the server, where the interpreter shares the caches with
gRPC's core and other processes (docs/service.md, "Where a unary call spends its time").
Prints the best of --repeats runs of each, in µs per call, and their difference.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import InstrumentedServer, RpcStats
from pkvm_sim.service.decoding import add_servicer
from pkvm_sim.service.servicer import HypervisorServicer

Handler = Callable[[Any, Any], Awaitable[Any]]
PEER = "ipv4:127.0.0.1:50412"
USER_AGENT = "grpc-python/1.85.3 grpc-c/51.0.0 (linux; chttp2)"


class Registry:
    """Takes the handlers `add_servicer` registers (a grpc.aio server's two ways in)."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update(handlers)


class Context:
    """What the handlers use of grpc.aio's servicer context, answered from Python."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata
        self._trailers: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return PEER

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailers = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers

    def code(self) -> None:
        return None

    async def abort(self, code: Any, details: str = "", metadata: Any = ()) -> None:
        raise RuntimeError(f"refused: {code} {details}")


async def echo_alloc(request: Any, context: Any) -> Any:
    return pb2.AllocPagesResponse(pfn=request.handle, order=request.order)


async def echo_put(request: Any, context: Any) -> Any:
    return pb2.PutPageResponse(refcount=0)


async def pairs(alloc: Any, put: Any, handle: int, metadata: tuple[tuple[str, str], ...],
                calls: int, *, echo: bool) -> float:
    """µs per call of `calls` AllocPages + PutPage pairs: parse, handle, serialize."""
    alloc_parse = pb2.AllocPagesRequest.FromString if echo else alloc.request_deserializer
    put_parse = pb2.PutPageRequest.FromString if echo else put.request_deserializer
    alloc_call: Handler = echo_alloc if echo else alloc.unary_unary
    put_call: Handler = echo_put if echo else put.unary_unary
    alloc_body = pb2.AllocPagesRequest(handle=handle, order=0).SerializeToString()
    started = time.process_time()
    for _ in range(calls):
        pfn = (await alloc_call(alloc_parse(alloc_body), Context(metadata))).pfn
        body = pb2.PutPageRequest(handle=handle, pfn=pfn).SerializeToString()
        (await put_call(put_parse(body), Context(metadata))).SerializeToString()
    return (time.process_time() - started) / (2 * calls) * 1e6


async def measure(calls: int, repeats: int) -> tuple[float, float]:
    config = SimConfig()
    servicer = HypervisorServicer(Hypervisor.boot(config), config)
    registry = Registry()
    # The service's unary handlers count themselves; anything the registration wraps counts
    # in these stats (as every handler did before they did).
    add_servicer(servicer, InstrumentedServer(registry, RpcStats()))  # type: ignore[arg-type]
    handlers = registry.handlers
    created = await handlers["CreateVM"].unary_unary(
        pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4), Context(()))
    handle = created.vm.handle
    metadata = (("user-agent", USER_AGENT), ("authorization", f"Bearer {created.token}"))
    alloc, put = handlers["AllocPages"], handlers["PutPage"]
    gc.freeze()  # the booted simulator, as the server does (server.tune_gc)
    echo = real = float("inf")
    for _ in range(repeats):  # alternating, so that drift hits both
        echo = min(echo, await pairs(alloc, put, handle, metadata, calls, echo=True))
        real = min(real, await pairs(alloc, put, handle, metadata, calls, echo=False))
    return echo, real


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="pairs per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (best kept)")
    args = parser.parse_args()
    echo, real = asyncio.run(measure(args.calls, args.repeats))
    print(f"unary call, in process (best of {args.repeats} x {args.calls} pairs)")
    print(f"  echo handler      {echo:6.2f} µs per call")
    print(f"  service handler   {real:6.2f} µs per call")
    print(f"  the service's own {real - echo:6.2f} µs per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
