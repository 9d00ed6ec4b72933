"""Benchmark: what the SDK adds on top of the raw generated stub (a benchmark, not a test).

    python bench/bench_sdk.py                # about 20 seconds
    python bench/bench_sdk.py --calls 500    # quicker, noisier

Against one real service (started in a child process), the same calls are made through the
raw stub (the baseline) and through `pkvm_client`, alternating round by round so that drift
on a shared machine hits both alike; medians of the rounds are compared:
  1. AllocPages + PutPage pairs (the SDK resolves the deadline and maps errors; returns ints);
  2. GetStats (the SDK also converts the response into frozen dataclasses);
  3. the conversion alone: `from_message(Stats, response)` without the network.
It prints microseconds per call and the SDK/raw ratios. Phase 3 is the SDK's own cost of
typed results; the round-trip ratios of 1 and 2 are only as steady as the machine is idle.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_client import Hypervisor, Stats
from pkvm_client._types import from_message

SERVER = """
import sys
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.server import ServerSettings, start
running = start(SimConfig(), ServerSettings(listen="127.0.0.1:0", metrics_listen=None))
print(running.target, flush=True)
sys.stdin.read()
running.stop(0)
"""


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per phase and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        target = server.stdout.readline().strip()
        run(target, args.calls, args.rounds)
    finally:
        server.communicate("")


def run(target: str, calls: int, rounds: int) -> None:
    with Hypervisor(target) as hv, hv.create_vm(slice_pages=4) as vm:
        stub = pb2_grpc.HypervisorServiceStub(hv.channel)  # type: ignore[no-untyped-call]
        md = (("authorization", f"Bearer {vm.token}"),)
        alloc = pb2.AllocPagesRequest(handle=vm.handle, order=0)

        def raw_pair() -> None:
            pfn = stub.AllocPages(alloc, metadata=md, timeout=30.0).pfn
            stub.PutPage(pb2.PutPageRequest(handle=vm.handle, pfn=pfn), metadata=md,
                         timeout=30.0)

        def sdk_pair() -> None:
            vm.put_page(vm.alloc_pages())

        def raw_stats() -> object:
            return stub.GetStats(pb2.GetStatsRequest(), timeout=30.0)

        response = raw_stats()
        phases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "alloc+put pair": (raw_pair, sdk_pair),
            "GetStats": (raw_stats, hv.stats),
            "Stats conversion only": (lambda: response,
                                      lambda: from_message(Stats, response)),
        }
        for fn, _ in phases.values():  # warm up the channel and the conversion plans
            per_call_us(fn, 50)
        for _, fn in phases.values():
            per_call_us(fn, 50)
        print(f"{rounds} rounds of {calls} calls; medians in microseconds per call")
        print(f"{'phase':<24}{'raw stub':>12}{'SDK':>12}{'SDK/raw':>10}")
        for name, (raw, sdk) in phases.items():
            raw_us: list[float] = []
            sdk_us: list[float] = []
            for i in range(rounds):  # alternate which side goes first
                first, second = (raw_us, raw), (sdk_us, sdk)
                for times, fn in (first, second) if i % 2 == 0 else (second, first):
                    times.append(per_call_us(fn, calls))
            r, s = statistics.median(raw_us), statistics.median(sdk_us)
            ratio = f"{s / r:>10.2f}" if name != "Stats conversion only" else f"{'':>10}"
            print(f"{name:<24}{r:>12.1f}{s:>12.1f}{ratio}")


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as error:
        sys.exit(f"bench failed: {error}")
