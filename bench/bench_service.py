"""Benchmark: the real pkvm-sim service against a trivial echo service with the same server
settings, driven by the same client in the same run (a benchmark, not a test).

    python bench/bench_service.py                  # about two minutes
    python bench/bench_service.py --rounds 1       # quicker, noisier

Phases, each against every server (each runs in its own process; the client is this
process): the real service, an echo service built like it (grpc.aio, same settings), and,
for reference, an echo service in the former flavour (sync, 16 worker threads). They
alternate phase by phase for --rounds rounds and the medians are
compared, so that drift on a shared machine hits both sides alike: each phase runs against
the echo and the real service back to back, echo first in even rounds and real first in
odd ones (a load that rises or falls during a round then favours neither), and against the
sync echo after them:
  1. unary: 64 concurrent VMs, each looping AllocPages(order 0) + PutPage pairs;
  2. Execute: 8 streams, batches of 1, 64 and 1024 operations (an alloc batch, then a put
     batch of the pfns it returned);
  3. the in-process core: the same alloc-1024-then-put-1024 loop on Hypervisor directly
     (once per round, after the round's service phases).
It prints ops/s, p50/p99 latency per call (unary) or per batch (Execute) and the ratios.
Targets: unary real/echo >= 0.9; Execute(1024) real / in-process core >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

KINDS = ("echo", "real", "echo-sync")  # echo: the real server's flavour; echo-sync: reference
NR_VMS = 64
NR_STREAMS = 8
BATCH_SIZES = (1, 64, 1024)
EXTRA_HYP_PAGES = 1 << 16  # room for 8 streams x 1024 pages (hyp_pool_extra_pages knob)


# -- servers (run in a child process) ------------------------------------------------------------


class EchoServicer(pb2_grpc.HypervisorServiceServicer):
    """Does no work: the cost of gRPC itself with the same messages (sync flavour)."""

    def __init__(self) -> None:
        self._next = 0x1000

    def CreateVM(self, request: Any, context: Any) -> Any:
        self._next += 1
        return pb2.CreateVMResponse(vm=pb2.VM(handle=self._next), token="echo")

    def DestroyVM(self, request: Any, context: Any) -> Any:
        return pb2.DestroyVMResponse()

    def AllocPages(self, request: Any, context: Any) -> Any:
        return pb2.AllocPagesResponse(pfn=request.handle, order=request.order)

    def PutPage(self, request: Any, context: Any) -> Any:
        return pb2.PutPageResponse(refcount=0)

    def Execute(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        for request in request_iterator:
            n = len(request.ops)
            yield pb2.ExecuteResponse(
                batch_id=request.batch_id, codes=[0] * n, values=list(request.arg0),
                completed=n,
            )


class AsyncEchoServicer(pb2_grpc.HypervisorServiceServicer):
    """The echo servicer for the asyncio server (the real service's flavour)."""

    def __init__(self) -> None:
        self._next = 0x1000

    async def CreateVM(self, request: Any, context: Any) -> Any:
        self._next += 1
        return pb2.CreateVMResponse(vm=pb2.VM(handle=self._next), token="echo")

    async def DestroyVM(self, request: Any, context: Any) -> Any:
        return pb2.DestroyVMResponse()

    async def AllocPages(self, request: Any, context: Any) -> Any:
        return pb2.AllocPagesResponse(pfn=request.handle, order=request.order)

    async def PutPage(self, request: Any, context: Any) -> Any:
        return pb2.PutPageResponse(refcount=0)

    async def Execute(self, request_iterator: Any, context: Any) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            n = len(request.ops)
            await context.write(pb2.ExecuteResponse(
                batch_id=request.batch_id, codes=[0] * n, values=list(request.arg0),
                completed=n,
            ))


def start_aio_echo(servicer: Any, settings: Any) -> tuple[int, Callable[..., None]]:
    """Serve `servicer` the way the real server is built (grpc.aio on its own event-loop
    thread, the same channel options); return the bound port and a stop function."""
    import grpc.aio
    from pkvm_sim.service.server import EventLoopThread

    runner = EventLoopThread()

    async def build() -> tuple[Any, int]:
        server = grpc.aio.server(options=settings.grpc_options())
        pb2_grpc.add_HypervisorServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        bound = server.add_insecure_port(settings.listen)
        await server.start()
        return server, bound

    aio_server, port = runner.call(build())

    def stop(grace: float | None = 0) -> None:
        runner.call(aio_server.stop(grace))
        runner.close()

    return port, stop


def serve(kind: str) -> None:
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.service.limits import Limits
    from pkvm_sim.service.server import ServerSettings, start

    # The default limits, except that each stream's VM may hold its 1024 pages.
    settings = ServerSettings(listen="127.0.0.1:0", metrics_listen=None,
                              limits=Limits(quota_hyp_pages=0))
    if kind == "real":
        # The switch interval is the FairLock's business (shorter while its worker has work).
        service = start(SimConfig(hyp_pool_extra_pages=EXTRA_HYP_PAGES), settings)
        port = service.port
        stop = service.stop
    elif kind == "echo":  # the real server's construction (grpc.aio), echo servicer
        port, stop = start_aio_echo(AsyncEchoServicer(), settings)
    else:  # echo-sync: the former flavour (ThreadPoolExecutor, 16 workers), for reference
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers),
            options=settings.grpc_options(),
        )
        pb2_grpc.add_HypervisorServiceServicer_to_server(EchoServicer(), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(settings.listen)
        server.start()

        def stop(grace: float | None = 0) -> None:
            server.stop(grace).wait()

    print(port, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    stop(0)


class ServerProcess:
    """A benchmark server in a child process: `script --serve KIND` prints its port, then
    serves until its stdin closes (each benchmark script has such a `--serve` mode)."""

    def __init__(self, kind: str, script: str = __file__) -> None:
        self.process = subprocess.Popen(
            [sys.executable, script, "--serve", kind],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        self.target = f"127.0.0.1:{int(self.process.stdout.readline())}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


# -- client ---------------------------------------------------------------------------------------


@dataclass
class Figures:
    ops: int
    seconds: float
    latencies: list[float]

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1e3 if data else float("nan")

    def line(self, label: str, unit: str) -> str:
        return (f"  {label:<22} {self.ops_per_s:>12,.0f} ops/s   p50 {self.percentile(0.5):7.3f} ms"
                f"   p99 {self.percentile(0.99):7.3f} ms  (per {unit})")


def median_figures(figures: list[Figures]) -> Figures:
    """The run with the median throughput (its latencies come with it)."""
    return sorted(figures, key=lambda f: f.ops_per_s)[len(figures) // 2]


def create_vms(stub: Any, n: int) -> list[tuple[int, tuple[tuple[str, str], ...]]]:
    vms: list[tuple[int, tuple[tuple[str, str], ...]]] = []
    for _ in range(n):
        created = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4))
        vms.append((created.vm.handle, (("authorization", f"Bearer {created.token}"),)))
    return vms


def bench_unary(target: str, seconds: float) -> Figures:
    """64 VMs, each keeping one AllocPages/PutPage chain in flight (futures + callbacks)."""
    channel = grpc.insecure_channel(target)
    stub = pb2_grpc.HypervisorServiceStub(channel)  # type: ignore[no-untyped-call]
    vms = create_vms(stub, NR_VMS)
    latencies: list[float] = []
    counts = [0]
    lock = threading.Lock()
    stop_at = [float("inf")]
    finished = threading.Semaphore(0)

    def chain(handle: int, md: Any) -> None:
        def alloc() -> None:
            if time.perf_counter() >= stop_at[0]:
                finished.release()
                return
            t0 = time.perf_counter()
            f = stub.AllocPages.future(pb2.AllocPagesRequest(handle=handle, order=0), metadata=md)
            f.add_done_callback(lambda fut: put(fut, t0))

        def put(fut: Any, t0: float) -> None:
            t1 = time.perf_counter()
            pfn = fut.result().pfn
            f = stub.PutPage.future(pb2.PutPageRequest(handle=handle, pfn=pfn), metadata=md)
            f.add_done_callback(lambda fut2: done(fut2, t0, t1))

        def done(fut: Any, t0: float, t1: float) -> None:
            t2 = time.perf_counter()
            fut.result()
            with lock:
                counts[0] += 2
                latencies.append(t1 - t0)
                latencies.append(t2 - t1)
            alloc()

        alloc()

    # warm up, then measure
    start = time.perf_counter()
    stop_at[0] = start + seconds + 0.5
    for handle, md in vms:
        chain(handle, md)
    time.sleep(0.5)
    with lock:
        counts[0] = 0
        latencies.clear()
    t_start = time.perf_counter()
    for _ in vms:
        finished.acquire()
    elapsed = time.perf_counter() - t_start
    for handle, md in vms:
        stub.DestroyVM(pb2.DestroyVMRequest(handle=handle), metadata=md)
    channel.close()
    return Figures(counts[0], elapsed, latencies)


def bench_execute(target: str, batch: int, seconds: float) -> Figures:
    """NR_STREAMS streams, each alternating an alloc batch and a put batch of `batch` ops."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 4 << 20)])
    stub = pb2_grpc.HypervisorServiceStub(channel)  # type: ignore[no-untyped-call]
    vms = create_vms(stub, NR_STREAMS)
    latencies: list[float] = []
    counts = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(NR_STREAMS + 1)
    stop_at = [0.0]

    def worker(handle: int, md: Any) -> None:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        responses = stub.Execute(iter(requests.get, None), metadata=md)
        alloc = pb2.ExecuteRequest(handle=handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * batch)
        put_ops = [pb2.BATCH_OP_PUT_PAGE] * batch
        local: list[float] = []
        ops = 0
        barrier.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            requests.put(alloc)
            pfns = next(responses).values
            t1 = time.perf_counter()
            requests.put(pb2.ExecuteRequest(handle=handle, ops=put_ops, arg0=pfns))
            next(responses)
            t2 = time.perf_counter()
            local += (t1 - t0, t2 - t1)
            ops += 2 * batch
        requests.put(None)
        list(responses)
        with lock:
            counts[0] += ops
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=vm) for vm in vms]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t_start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    for handle, md in vms:
        stub.DestroyVM(pb2.DestroyVMRequest(handle=handle), metadata=md)
    channel.close()
    return Figures(counts[0], elapsed, latencies)


def bench_core(seconds: float, batch: int = BATCH_SIZES[-1], *, runs: bool = False) -> Figures:
    """The Execute phase's workload on the in-process core (no gRPC, no lock): allocate
    `batch` order-0 pages, then put them all, again and again. With `runs`, through the
    run methods the service uses for runs of identical batch operations; without, one
    alloc_pages/put_page call per operation (the plain API an in-process user calls)."""
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.hypervisor import Hypervisor
    from pkvm_sim.core.model import PoolKind

    hv = Hypervisor.boot(SimConfig(hyp_pool_extra_pages=EXTRA_HYP_PAGES))
    handle = hv.create_vm(nr_vcpus=1, slice_pages=4).handle
    alloc, put = hv.alloc_pages, hv.put_page
    ops = 0
    t_start = time.perf_counter()
    deadline = t_start + seconds
    hyp = PoolKind.HYP
    while time.perf_counter() < deadline:
        if runs:
            pfns, _ = hv.alloc_pages_run(handle, 0, hyp, batch)
            hv.put_pages_run(handle, pfns)
        else:
            pfns = [alloc(handle, 0, hyp) for _ in range(batch)]
            for pfn in pfns:
                put(handle, pfn)
        ops += 2 * batch
    return Figures(ops, time.perf_counter() - t_start, [])


def phase_order(round_number: int) -> tuple[str, ...]:
    """The servers in the order a round's phases measure them: echo and real back to back,
    their order swapped every round, then the sync echo (a reference only)."""
    pair = ("echo", "real") if round_number % 2 == 0 else ("real", "echo")
    return (*pair, "echo-sync")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median)")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    rounds = args.rounds
    print(f"pkvm-sim service benchmark ({os.cpu_count()} CPUs, {args.seconds:g} s per phase,"
          f" {rounds} alternating rounds; figures are medians)")
    phases: list[tuple[str, Callable[[str], Figures]]] = [
        ("unary", lambda target: bench_unary(target, args.seconds)),
        *((f"execute{b}", lambda target, b=b: bench_execute(target, b, args.seconds / 2))
          for b in BATCH_SIZES),
    ]
    runs: dict[tuple[str, str], list[Figures]] = {}
    cores: list[Figures] = []
    core_runs_figures: list[Figures] = []
    servers = {kind: ServerProcess(kind) for kind in KINDS}
    try:
        # Echo and real alternate phase by phase, so drift on a shared machine hits both;
        # the in-process core is measured in every round too, not once after all of them.
        for round_number in range(rounds):
            for phase, run in phases:
                for kind in phase_order(round_number):
                    runs.setdefault((kind, phase), []).append(run(servers[kind].target))
            cores.append(bench_core(args.seconds / 2))
            core_runs_figures.append(bench_core(args.seconds / 2, runs=True))
    finally:
        for server in servers.values():
            server.close()
    results = {key: median_figures(figs) for key, figs in runs.items()}
    for kind in servers:
        print(f"{kind} service")
        print(results[(kind, "unary")].line(f"unary ({NR_VMS} VMs)", "call"))
        for batch in BATCH_SIZES:
            print(results[(kind, f"execute{batch}")].line(f"Execute batch {batch}", "batch"))
    core = median_figures(cores)
    core_runs = median_figures(core_runs_figures)
    print("in-process core")
    print(f"  alloc {BATCH_SIZES[-1]} + put {BATCH_SIZES[-1]}    {core.ops_per_s:>12,.0f} ops/s"
          "   (one call per operation)")
    print(f"  the same via run methods  {core_runs.ops_per_s:>12,.0f} ops/s"
          "   (what Execute uses for runs of identical ops)")

    unary_ratio = results[("real", "unary")].ops_per_s / results[("echo", "unary")].ops_per_s
    flavour = results[("echo", "unary")].ops_per_s / results[("echo-sync", "unary")].ops_per_s
    print("ratios (of medians)")
    print(f"  unary real/echo            {unary_ratio:6.2f}   (target >= 0.9)")
    print(f"  unary echo aio/echo sync   {flavour:6.2f}   (the cost of the asyncio flavour)")
    for batch in BATCH_SIZES:
        real = results[("real", f"execute{batch}")].ops_per_s
        echo = results[("echo", f"execute{batch}")].ops_per_s
        print(f"  Execute {batch:>4} real/echo       {real / echo:6.2f}"
              f"   real/core {real / core.ops_per_s:6.2f}"
              f"   real/core-runs {real / core_runs.ops_per_s:6.2f}"
              + ("   (target >= 0.5)" if batch == BATCH_SIZES[-1] else ""))
    largest = BATCH_SIZES[-1]
    real = results[("real", f"execute{largest}")].ops_per_s
    bound = echo_plus_core(results[("echo", f"execute{largest}")].ops_per_s,
                           core_runs.ops_per_s)
    print(f"  Execute {largest:>4} if a batch took the echo's time plus the core's runs':"
          f" {bound:,.0f} ops/s, {bound / core_runs.ops_per_s:.2f} of core-runs;"
          f" real is {real / bound:.2f} of that")
    return 0


def echo_plus_core(echo_ops_per_s: float, core_ops_per_s: float) -> float:
    """Ops/s of a service whose batch takes the echo service's time plus the core's run
    methods' time in process: what the real service would reach if it added nothing to
    gRPC's work and the core's. A reference, not a strict bound: gRPC's own threads work
    without the GIL and may overlap the core a little (docs/service.md, "Where an Execute
    batch spends its time")."""
    return 1 / (1 / echo_ops_per_s + 1 / core_ops_per_s)


if __name__ == "__main__":
    sys.exit(main())
