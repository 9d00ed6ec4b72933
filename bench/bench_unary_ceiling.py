"""Benchmark: how close to the echo service a unary call of ours can get at best.

    python bench/bench_unary_ceiling.py              # about two minutes
    python bench/bench_unary_ceiling.py --rounds 12  # steadier medians

`bench/bench_service.py` compares the real service's 64-VM unary load (AllocPages + PutPage
pairs) with an echo service's (target: real/echo >= 0.9). This splits the gap. Four servers,
each in its own process, measured one after the other in every round (the order reversed
every other round, so that drift hits all alike):

  echo      the echo service (bench_service's: grpc.aio, the real server's settings)
  echo+io   the echo service doing, per call, what the service must ask of gRPC: set the
            instance-id trailer (every response carries it: docs/state-file.md), read the
            call's peer (its tenant) and its metadata (the VM's bearer token)
  bare      the real server, with AllocPages and PutPage reduced to what no implementation
            of them can skip: echo+io, the token check (and lease renewal), the operation
            under the simulator lock, its reply. No tenant gate, fair turns, admission
            count, metrics or operation counts: what the service's bookkeeping would cost
            if compiling it made it free
  real      the real service

It prints each one's ops/s and the server process's CPU time per call (all its threads,
from /proc; each phase's VM set-up and warm-up included), as medians over the rounds, and
their ratios to echo. The bookkeeping's share of the gap is bare - real; what the service's
features ask of gRPC, echo - echo+io.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import TYPE_CHECKING, Any

import bench_service as bs
from pkvm.v1 import hypervisor_pb2 as pb2

if TYPE_CHECKING:
    from pkvm_sim.service.servicer import HypervisorServicer

KINDS = ("echo", "echo+io", "bare", "real")
TRAILER = (("pkvm-instance-id", "0" * 32),)  # the real one's shape: 32 hex digits
BARE_METHODS = ("AllocPages", "PutPage")


class EchoWithIo(bs.AsyncEchoServicer):
    """The echo service, asking of gRPC per call what the real one asks."""

    async def AllocPages(self, request: Any, context: Any) -> Any:
        _ask_like_the_service(context, TRAILER)
        return pb2.AllocPagesResponse(pfn=request.handle, order=request.order)

    async def PutPage(self, request: Any, context: Any) -> Any:
        _ask_like_the_service(context, TRAILER)
        return pb2.PutPageResponse(refcount=0)


def _ask_like_the_service(context: Any, trailer: Any) -> str | None:
    """What the service asks of gRPC per call: sends `trailer`, reads the peer (the
    tenant); returns the bearer token."""
    from pkvm_sim.service.auth import bearer_token

    context.set_trailing_metadata(trailer)
    context.peer()
    return bearer_token(context.invocation_metadata())


def bare_servicer_class() -> type[HypervisorServicer]:
    """HypervisorServicer whose AllocPages and PutPage do only what cannot be skipped."""
    from pkvm_sim.service.servicer import HypervisorServicer

    class BareServicer(HypervisorServicer):
        def unary_handler(self, operation: Any) -> Any:
            if operation.rpc not in BARE_METHODS:
                return super().unary_handler(operation)
            run, read_args, reply = operation.run, operation.read_args, operation.replier
            machine, tokens, lock = self.machine, self.tokens, self.lock
            trailer = self.instance_metadata

            async def handler(request: Any, context: Any) -> Any:
                tokens.check(request.handle, _ask_like_the_service(context, trailer))
                with lock:
                    result = run(machine, *read_args(request))
                return reply(machine, request, result)

            return handler

    return BareServicer


def serve(kind: str) -> None:
    if kind == "echo+io":
        from pkvm_sim.service.limits import Limits
        from pkvm_sim.service.server import ServerSettings

        settings = ServerSettings(listen="127.0.0.1:0", metrics_listen=None,
                                  limits=Limits(quota_hyp_pages=0))
        port, stop = bs.start_aio_echo(EchoWithIo(), settings)
        print(port, flush=True)
        sys.stdin.read()  # until the parent closes our stdin
        stop(0)
        return
    if kind == "bare":
        from pkvm_sim.service import server

        # This child process serves nothing else: start() builds the bare servicer.
        server.HypervisorServicer = bare_servicer_class()  # type: ignore[attr-defined]
        kind = "real"
    bs.serve(kind)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid`, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (medians)")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    print(f"unary ceiling ({os.cpu_count()} CPUs, {bs.NR_VMS} VMs, {args.seconds:g} s per "
          f"phase, {args.rounds} rounds; medians)")
    servers = {kind: bs.ServerProcess(kind, __file__) for kind in KINDS}
    rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cpu_per_call: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for round_number in range(args.rounds):
            for kind in KINDS if round_number % 2 == 0 else reversed(KINDS):
                pid = servers[kind].process.pid
                before = cpu_seconds(pid)
                figures = bs.bench_unary(servers[kind].target, args.seconds)
                cpu_per_call[kind].append((cpu_seconds(pid) - before) / figures.ops)
                rates[kind].append(figures.ops_per_s)
    finally:
        for server in servers.values():
            server.close()
    echo_rate = statistics.median(rates["echo"])
    echo_cpu = statistics.median(cpu_per_call["echo"])
    for kind in KINDS:
        rate, cpu = statistics.median(rates[kind]), statistics.median(cpu_per_call[kind])
        print(f"  {kind:<8} {rate:>8,.0f} calls/s  {rate / echo_rate:5.2f} of echo"
              f"   server CPU {cpu * 1e6:6.0f} µs per call  ({cpu / echo_cpu:4.2f} of echo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
