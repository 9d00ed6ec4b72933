"""Benchmark: `pkvm-sim load` with 1, 16, 64 and 256 VMs, workloads churn and mixed, against
the real service and against an echo service that does no work, in the same run (a benchmark,
not a test).

    python bench/bench_load.py                 # about 2 minutes
    python bench/bench_load.py --seconds 2     # quicker, noisier

Both servers run in child processes with the same server settings; the load tool runs here,
in process, through its runner API (exactly what the CLI runs). Each (VMs, workload) pair runs
against echo, then real, then echo again, and the two echo runs are averaged, so drift on a
shared machine hits both sides alike. Printed per pair: ops/s and p99 latency (all operations
together) for real and echo, and real/echo. Echo is the ceiling of a Python asyncio client
(docs/performance.md: the client, not the server, is the limit), so real/echo says how much of the
tool's capacity the simulator's own work costs.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pkvm.v1 import hypervisor_pb2 as pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import AsyncEchoServicer, ServerProcess, start_aio_echo  # noqa: E402

VM_COUNTS = (1, 16, 64, 256)
WORKLOADS = ("churn", "mixed")
SLICE_PAGES = 64  # 256 VMs x 64 pages fit the default 4 GiB machine many times over
EXTRA_HYP_PAGES = 1 << 16  # room for 256 VMs holding blocks (hyp_pool_extra_pages knob)


class LoadEchoServicer(AsyncEchoServicer):
    """bench_service's echo servicer (grpc.aio, as the real service) plus every RPC the load
    workloads call, each answering at once."""

    async def CreateVM(self, request: Any, context: Any) -> Any:
        response = await super().CreateVM(request, context)
        response.vm.slice_base_pfn = 0x80000
        response.vm.slice_nr_pages = request.slice_pages
        return response

    async def Reserve(self, request: Any, context: Any) -> Any:
        return pb2.ReserveResponse(page_size=4096)

    async def GetStats(self, request: Any, context: Any) -> Any:
        return pb2.GetStatsResponse()

    async def GetPage(self, request: Any, context: Any) -> Any:
        return pb2.GetPageResponse(refcount=2)

    async def HostShare(self, request: Any, context: Any) -> Any:
        return pb2.HostShareResponse(pfn=request.pfn, nr_pages=1)

    async def HostUnshare(self, request: Any, context: Any) -> Any:
        return pb2.HostUnshareResponse(pfn=request.pfn, nr_pages=1)

    async def PinShared(self, request: Any, context: Any) -> Any:
        return pb2.PinSharedResponse()

    async def UnpinShared(self, request: Any, context: Any) -> Any:
        return pb2.UnpinSharedResponse()

    async def MapMMIO(self, request: Any, context: Any) -> Any:
        return pb2.MapMMIOResponse()

    async def TopupMemcache(self, request: Any, context: Any) -> Any:
        return pb2.TopupMemcacheResponse(memcache_pages=request.nr_pages)

    async def GuestMap(self, request: Any, context: Any) -> Any:
        return pb2.GuestMapResponse(ipa=request.ipa, pfn=request.pfn, level=3)


def serve(kind: str) -> None:
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.service.limits import Limits
    from pkvm_sim.service.server import ServerSettings, start

    # Default limits, except the per-VM hyp page quota: 256 VMs may hold what they churn.
    settings = ServerSettings(listen="127.0.0.1:0", metrics_listen=None, vm_lease_seconds=0,
                              limits=Limits(quota_hyp_pages=0))
    sys.setswitchinterval(0.001)  # as `pkvm-sim serve` does, for both servers
    if kind == "real":
        service = start(SimConfig(hyp_pool_extra_pages=EXTRA_HYP_PAGES), settings)
        port, stop = service.port, service.stop
    else:  # the real server's construction (grpc.aio), with the echo servicer
        port, stop = start_aio_echo(LoadEchoServicer(), settings)

    print(port, flush=True)
    sys.stdin.read()
    stop(0)


@dataclass
class Figures:
    ops_per_s: float
    p99_ms: float
    unexpected: int


def measure(target: str, vms: int, workload_name: str, seconds: float) -> Figures:
    from pkvm_sim.tools.load.runner import Shape, run_load
    from pkvm_sim.tools.load.workloads import load_workload

    shape = Shape(target=target, vms=vms, connections=max(1, vms // 64), duration=seconds,
                  total=None, rps=0.0, warmup=1.0, seed=1, batch=0, slice_pages=SLICE_PAGES,
                  max_ops=0, timeout=30.0, connect_timeout=10.0, sample_interval=1.0,
                  progress="none", progress_interval=5.0)
    workload = load_workload(workload_name, 0x0900_0000, 0x7000_0000)
    result = run_load(shape, workload)
    overall = result.recorder.overall()
    _expected, unexpected = result.recorder.split_outcomes()
    return Figures(result.recorder.measured_ops / result.measured_s,
                   overall.get_value_at_percentile(99.0) / 1000, sum(unexpected.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    parser.add_argument("--serve", choices=("real", "echo"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    real, echo = (ServerProcess(kind, script=__file__) for kind in ("real", "echo"))
    try:
        print(f"pkvm-sim load, {args.seconds:g} s measured per run after 1 s warm-up,"
              f" closed loop, {SLICE_PAGES}-page slices; echo = same tool, no server work")
        print(f"{'VMs':>5} {'workload':<9} {'real ops/s':>11} {'real p99':>10}"
              f" {'echo ops/s':>11} {'echo p99':>10} {'real/echo':>10}")
        for vms in VM_COUNTS:
            for workload in WORKLOADS:
                before = measure(echo.target, vms, workload, args.seconds)
                fig = measure(real.target, vms, workload, args.seconds)
                after = measure(echo.target, vms, workload, args.seconds)
                echo_rate = (before.ops_per_s + after.ops_per_s) / 2
                echo_p99 = (before.p99_ms + after.p99_ms) / 2
                note = f"  ({fig.unexpected} unexpected!)" if fig.unexpected else ""
                print(f"{vms:>5} {workload:<9} {fig.ops_per_s:>11,.0f} {fig.p99_ms:>8.2f}ms"
                      f" {echo_rate:>11,.0f} {echo_p99:>8.2f}ms"
                      f" {fig.ops_per_s / echo_rate:>10.2f}{note}", flush=True)
    finally:
        real.close()
        echo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
