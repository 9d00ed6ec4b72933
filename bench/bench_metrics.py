"""Benchmark: what metrics cost the others (a benchmark, not a test).

    python bench/bench_metrics.py            # about 30 s

1. The RPC interceptor: sequential unary calls to a trivial echo server over loopback, with
   and without `AioServerMetricsInterceptor` (the service's grpc.aio flavour), alternated
   for --rounds rounds (medians compared).
2. A scrape at 1, 1000 and 4096 VMs, default and with per-VM series: the time the snapshot
   holds the simulator lock, the whole render, and the series count.
Targets: interceptor throughput >= 0.9x without; snapshot under the lock and series count flat
in the number of VMs by default.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from typing import Any

import grpc
import grpc.aio
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import (
    AioServerMetricsInterceptor,
    RpcStats,
    SimInfo,
    build_registry,
    locked_snapshot,
    take_snapshot,
)
from pkvm_sim.service.server import carveout_parts
from prometheus_client import generate_latest

CALLS = 3000


def _identity(data: bytes) -> bytes:
    return data


async def _calls_per_second(with_metrics: bool) -> float:
    """Sequential unary calls to a trivial grpc.aio echo server (the service's flavour) from
    a grpc.aio client on the same loop."""
    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    interceptors = [AioServerMetricsInterceptor(RpcStats())] if with_metrics else []
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/bench.Echo/Echo", _identity, _identity)
            for _ in range(200):
                await call(b"x")
            start = time.perf_counter()
            for _ in range(CALLS):
                await call(b"x")
            return CALLS / (time.perf_counter() - start)
    finally:
        await server.stop(0)


def calls_per_second(with_metrics: bool) -> float:
    return asyncio.run(_calls_per_second(with_metrics))


def bench_interceptor(rounds: int) -> None:
    plain, metered = [], []
    for _ in range(rounds):
        plain.append(calls_per_second(False))
        metered.append(calls_per_second(True))
    a, b = statistics.median(plain), statistics.median(metered)
    print(f"interceptor: {a:,.0f} calls/s without, {b:,.0f} with: ratio {b / a:.3f} "
          f"(target >= 0.9; {rounds} rounds, {CALLS} sequential calls each)")


class _FakeContext:
    def code(self) -> None:
        return None


def bench_wrapper_cpu() -> None:
    """The aio interceptor's own CPU per unary call, without gRPC's noise around it."""
    async def echo(request: bytes, context: object) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo, _identity, _identity)
    interceptor = AioServerMetricsInterceptor(RpcStats())
    details = type("Details", (), {"method": "/bench.Echo/Echo", "invocation_metadata": ()})()
    context = _FakeContext()
    n = 200_000

    async def plain() -> Any:
        return handler

    async def metered() -> Any:
        async def continuation(_details: Any) -> Any:
            return handler
        return await interceptor.intercept_service(continuation, details)

    async def per_call(make: Any) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await (await make()).unary_unary(b"x", context)
        return (time.perf_counter() - start) / n

    timings = {name: asyncio.run(per_call(make))
               for name, make in (("plain", plain), ("metered", metered))}
    extra = (timings["metered"] - timings["plain"]) * 1e6
    print(f"interceptor CPU: {extra:.2f} us per unary call (look-up, wrapper, counters, "
          f"histogram); docs/performance.md: an aio server spends about 160 us per call")


def bench_scrape() -> None:
    config = SimConfig()
    hv = Hypervisor.boot(config)
    lock = threading.Lock()
    print("VMs   per-VM  snapshot under lock (ms)  render (ms)  series")
    created = 0
    for target in (1, 1000, 4096):
        while created < target:
            hv.create_vm(nr_vcpus=1, slice_pages=1, name=None)
            created += 1
        for per_vm in (False, True):
            held = []
            for _ in range(20):
                start = time.perf_counter()
                with lock:
                    take_snapshot(hv, None, per_vm=per_vm)
                held.append(time.perf_counter() - start)
            registry = build_registry(locked_snapshot(lock, hv, None, per_vm=per_vm),
                                      carveout_parts=carveout_parts(config),
                                      info=SimInfo.of(config), rpc_stats=RpcStats())
            renders = []
            for _ in range(5):
                start = time.perf_counter()
                text = generate_latest(registry)
                renders.append(time.perf_counter() - start)
            series = sum(1 for line in text.decode().splitlines() if not line.startswith("#"))
            held_ms = statistics.median(held) * 1e3
            render_ms = statistics.median(renders) * 1e3
            print(f"{target:<5} {'yes' if per_vm else 'no':<7} {held_ms:>24.3f}  "
                  f"{render_ms:>11.1f}  {series:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bench_wrapper_cpu()
    bench_interceptor(args.rounds)
    bench_scrape()


if __name__ == "__main__":
    main()
