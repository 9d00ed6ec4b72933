"""Another tenant's latency under each attack shape, against the same tenant alone, in the
same run (issue 20, items 13-15).

    python bench/bench_attacks.py [--pairs 400] [--shapes long,small,unary,h2flood,stats]

The server is `pkvm-sim serve` in its own process (default limits, except that the attacker's
VMs may hold any number of hyp pages). Tenant B (this process, one call at a time) measures
AllocPages+PutPage pairs alone, then under each attack, which runs in a second process on
its own connection(s), to 127.0.0.1 only, for as long as B measures:

- long:    one Execute stream of 4096-operation batches, 256-page share/unshare each;
- small:   16 Execute streams (4 VMs) of 1-operation 256-page share/unshare batches;
- unary:   8 threads of unary 256-page HostShare/HostUnshare;
- h2flood: raw HTTP/2 HEADERS for GetStats with no body, without credentials, on one
           connection, as fast as it can send them;
- stats:   16 threads of GetStats with 1000 VMs on the server.

Prints p50/p99/max per shape and the p99 ratio to B alone. Targets: ratio <= 3, no call of
B over 250 ms.

It also prints the machine's floor, which is no attack: B measured while one, then two
processes spin on the CPU without touching the server (`cpu1`, `cpu2`). On a 2-core machine
the attacker's client and the server it keeps busy fill both cores in every shape but
`long`, where the attacker's client mostly waits. So `cpu2` is what B would see under those
shapes from the operating system's scheduler alone, from a server that spent no time on the
attack at all. `cpu1` is the same floor for `long`. The floors are references: the verdict
is on the attack shapes only. `--attacker-nice 19` runs the attacking and spinning processes
at the lowest priority, the closest this machine comes to an attacker on another machine
(its client's CPU then yields to B's and the server's).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from bench_tenancy import bearer, measure_b, start_server, stop_server, summary
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PAGES = 256  # the server's default max_pages_per_op: the heaviest single operation
Stub = pb2_grpc.HypervisorServiceStub


def share_batch(vm: Any, nr_ops: int) -> pb2.ExecuteRequest:
    ops = ([pb2.BATCH_OP_HOST_SHARE, pb2.BATCH_OP_HOST_UNSHARE] * nr_ops)[:max(nr_ops, 1)]
    return pb2.ExecuteRequest(handle=vm.vm.handle, ops=ops,
                              arg0=[vm.vm.slice_base_pfn] * len(ops), arg1=[PAGES] * len(ops))


def new_vm(stub: Any, slice_pages: int = 2 * PAGES) -> Any:
    return stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=slice_pages), timeout=30)


def stream_batches(stub: Any, vm: Any, batch: pb2.ExecuteRequest, running: Any) -> None:
    def requests() -> Any:
        while running.value:
            yield batch

    try:
        for _response in stub.Execute(requests(), metadata=bearer(vm.token)):
            pass
    except grpc.RpcError:
        pass  # the server or the bench ends it


def attack_long(stub: Any, running: Any) -> None:
    vm = new_vm(stub)
    stream_batches(stub, vm, share_batch(vm, 4096), running)


def attack_small(stub: Any, running: Any) -> None:
    vms = [new_vm(stub) for _ in range(4)]
    threads = [threading.Thread(target=_small_stream, args=(stub, vm, running))
               for vm in vms for _ in range(4)]  # 4 streams per VM: max_streams_per_vm
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _small_stream(stub: Any, vm: Any, running: Any) -> None:
    share = pb2.ExecuteRequest(handle=vm.vm.handle, ops=[pb2.BATCH_OP_HOST_SHARE],
                               arg0=[vm.vm.slice_base_pfn], arg1=[PAGES])
    unshare = pb2.ExecuteRequest(handle=vm.vm.handle, ops=[pb2.BATCH_OP_HOST_UNSHARE],
                                 arg0=[vm.vm.slice_base_pfn], arg1=[PAGES])

    def requests() -> Any:
        while running.value:
            yield share
            yield unshare

    try:
        for _response in stub.Execute(requests(), metadata=bearer(vm.token)):
            pass
    except grpc.RpcError:
        pass


def attack_unary(stub: Any, running: Any) -> None:
    def flood() -> None:
        vm = new_vm(stub)
        md, base = bearer(vm.token), vm.vm.slice_base_pfn
        while running.value:
            try:
                stub.HostShare(pb2.HostShareRequest(handle=vm.vm.handle, pfn=base,
                                                    nr_pages=PAGES), metadata=md, timeout=30)
                stub.HostUnshare(pb2.HostUnshareRequest(handle=vm.vm.handle, pfn=base,
                                                        nr_pages=PAGES), metadata=md,
                                 timeout=30)
            except grpc.RpcError:
                pass

    _threads(flood, 8)


def attack_h2flood(target: str, running: Any) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.service.attack_helpers import RawH2  # noqa: PLC0415

    conn = RawH2(int(target.rsplit(":", 1)[1]))
    conn.settings_seen.wait(30)
    sent = 0
    while running.value and not conn.closed.is_set():
        conn.open_streams(500, "/pkvm.v1.HypervisorService/GetStats", first_id=1 + 2 * sent)
        sent += 500
        if sent > 1_000_000_000:
            break
    conn.close()


def attack_stats(stub: Any, running: Any) -> None:
    def flood() -> None:
        while running.value:
            with contextlib.suppress(grpc.RpcError):
                stub.GetStats(pb2.GetStatsRequest(), timeout=30)

    _threads(flood, 16)


def spin(running: Any) -> None:
    """Burn one CPU until `running` is cleared; touches nothing else (the floor)."""
    while running.value:
        for _ in range(10_000):
            pass


def _threads(fn: Callable[[], None], count: int) -> None:
    threads = [threading.Thread(target=fn) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


FLOORS = {"cpu1": 1, "cpu2": 2}  # reference shapes: how many processes spin


def attacker(shape: str, target: str, running: Any, niceness: int = 0) -> None:
    """The attack, in its own process, until `running` is cleared."""
    os.nice(niceness)
    if shape in FLOORS:
        spin(running)
        return
    if shape == "h2flood":
        attack_h2flood(target, running)
        return
    with grpc.insecure_channel(target) as channel:
        stub = Stub(channel)  # type: ignore[no-untyped-call]
        {"long": attack_long, "small": attack_small, "unary": attack_unary,
         "stats": attack_stats}[shape](stub, running)


def measure_under(shape: str, target: str, stub: Any, vm: Any, pairs: int,
                  niceness: int) -> dict[str, float]:
    """B's figures while `shape` runs in its own process(es)."""
    spawn = multiprocessing.get_context("spawn")  # no fork after gRPC started
    running = spawn.Value("b", 1)
    processes = [spawn.Process(target=attacker, args=(shape, target, running, niceness))
                 for _ in range(FLOORS.get(shape, 1))]
    for process in processes:
        process.start()
    time.sleep(2.0)  # the attack is under way
    try:
        return summary(measure_b(stub, vm, pairs))
    finally:
        running.value = 0
        for process in processes:
            process.join(120)
            if process.is_alive():
                process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--shapes", default="long,small,unary,h2flood,stats")
    parser.add_argument("--floors", default="cpu1,cpu2",
                        help="reference shapes that only spin on the CPU ('' for none)")
    parser.add_argument("--attacker-nice", type=int, default=0,
                        help="the attacking (and spinning) processes' niceness")
    args = parser.parse_args()
    floors = [shape for shape in args.floors.split(",") if shape]
    shapes = args.shapes.split(",")
    process, target = start_server("--quota-hyp-pages", "0", "--max-vms", "2048")
    worst_ratio, worst_ms, floor_ratio = 0.0, 0.0, 0.0
    try:
        with grpc.insecure_channel(target) as channel:
            stub = Stub(channel)  # type: ignore[no-untyped-call]
            vm = new_vm(stub, 64)
            measure_b(stub, vm, 50)  # warm up
            alone = summary(measure_b(stub, vm, args.pairs))
            print(f"B alone: p50 {alone['p50_ms']:.2f} ms, p99 {alone['p99_ms']:.2f} ms, "
                  f"max {alone['max_ms']:.1f} ms", flush=True)
            for shape in floors + shapes:
                if shape == "stats":
                    for _ in range(1000 - 1):
                        new_vm(stub, 1)
                under = measure_under(shape, target, stub, vm, args.pairs, args.attacker_nice)
                ratio = under["p99_ms"] / alone["p99_ms"]
                label = "floor" if shape in FLOORS else "attack"
                if label == "attack":
                    worst_ratio = max(worst_ratio, ratio)
                    worst_ms = max(worst_ms, under["max_ms"])
                else:
                    floor_ratio = max(floor_ratio, ratio)
                print(f"{label} {shape:8s}: p50 {under['p50_ms']:.2f} ms, p99 "
                      f"{under['p99_ms']:.2f} ms, max {under['max_ms']:.1f} ms | p99 ratio "
                      f"{ratio:.2f}", flush=True)
    finally:
        stop_server(process)
    verdict = "ok" if worst_ratio <= 3 and worst_ms <= 250 else "MISSED"
    print(f"attacks: worst p99 ratio {worst_ratio:.2f} (target <= 3), slowest call of B "
          f"{worst_ms:.1f} ms (target <= 250): {verdict}")
    if floor_ratio > 3:
        print(f"note: processes that only spin put B's p99 at {floor_ratio:.2f}x on this "
              "machine: the 3x target is below its floor (the attacker's client shares B's "
              "CPUs)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
