"""`pkvm-sim loadgen`: many concurrent client VMs against a running pkvm-sim service.

Each client VM is one asyncio task with its own VM (slice of host RAM, token). It runs a
seeded random mix until the deadline or its operation budget:

    alloc   hyp_alloc_pages of order 0 (60%) or 1..3, kept until a later put
    put     hyp_put_page of a block it holds
    getput  a get then a put on a block it holds (refcount 2 -> 1)
    share   host_share of a slice page, or host_unshare of one it shared
    guest   guest_map of a slice page at the next IPA, topping the memcache up when asked
    mmio    a host MMIO fault at a random page of --mmio-window

With --batch N each VM instead streams Execute batches: N order-0 allocs, then N puts of
what came back. What the kernel answers under pressure (out of memory, memcache empty, ...)
is an *outcome*, counted per kind; a transport error or an unexpected refusal is a failure.
At the end every VM is destroyed and the hyp pool's free pages must be back where they
started: loadgen doubles as a leak check and exits 1 if anything leaked or failed.

The run is bounded in time (--duration, at most 600 s) and operations (--max-ops per VM).
It uses only the SDK (`pkvm_client`), never the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pkvm_client import (
    AsyncHypervisor,
    AsyncVM,
    Batch,
    OutOfMemoryError,
    PkvmError,
)

MAX_DURATION_S = 600.0
ORDERS = (0, 0, 0, 0, 0, 0, 1, 1, 2, 3)
EXPECTED_REFUSALS = {  # (operation, SDK error class): what a loaded pool legitimately answers
    ("alloc", "OutOfMemoryError"),
    ("guest", "OutOfMemoryError"),
    ("guest", "AlreadyExistsError"),
    # v6.14 rules: a page shared with hyp is not guest-mapped, a guest-mapped one not
    # shared with hyp, and a mapped IPA is not mapped again (-EPERM)
    ("guest", "PermissionDeniedError"),
    ("share", "PermissionDeniedError"),
    ("mmio", "OutOfMemoryError"),
    ("mmio", "InvalidArgumentError"),  # the window overlaps RAM
    ("share", "OutOfMemoryError"),
}


@dataclass
class VmTally:
    """What one client VM did and saw."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    ops: int = 0

    def record(self, op: str, seconds: float, outcome: str = "ok", count: int = 1) -> None:
        self.latencies[op].append(seconds)
        self.count(op, outcome, count)

    def count(self, op: str, outcome: str, count: int = 1) -> None:
        self.outcomes[(op, outcome)] += count
        self.ops += count


@dataclass
class ClientState:
    vm: AsyncVM
    rnd: random.Random
    held: list[int] = field(default_factory=list)
    shared: set[int] = field(default_factory=set)
    next_ipa: int = 0


async def _timed(tally: VmTally, op: str, call: Any, count: int = 1) -> Any:
    start = time.perf_counter()
    try:
        result = await call
    except PkvmError as error:
        tally.record(op, time.perf_counter() - start, type(error).__name__, count)
        return error
    tally.record(op, time.perf_counter() - start, "ok", count)
    return result


async def _unary_step(state: ClientState, tally: VmTally, mmio_window: tuple[int, int],
                      page_size: int) -> None:
    vm, rnd = state.vm, state.rnd
    roll = rnd.random()
    if state.held and (roll < 0.30 or len(state.held) > 256):
        pfn = state.held.pop(rnd.randrange(len(state.held)))
        await _timed(tally, "put", vm.put_page(pfn))
    elif roll < 0.65:
        pfn = await _timed(tally, "alloc", vm.alloc_pages(rnd.choice(ORDERS)))
        if isinstance(pfn, int):
            state.held.append(pfn)
    elif roll < 0.75 and state.held:
        pfn = rnd.choice(state.held)
        await _timed(tally, "getput", vm.get_page(pfn))
        await _timed(tally, "getput", vm.put_page(pfn))
    elif roll < 0.87:
        pfn = vm.info.slice_base_pfn + rnd.randrange(vm.info.slice_nr_pages)
        if pfn in state.shared:
            if not isinstance(await _timed(tally, "share", vm.host_unshare(pfn)), PkvmError):
                state.shared.discard(pfn)
        elif not isinstance(await _timed(tally, "share", vm.host_share(pfn)), PkvmError):
            state.shared.add(pfn)
    elif roll < 0.95:
        pfn = vm.info.slice_base_pfn + rnd.randrange(vm.info.slice_nr_pages)
        ipa, state.next_ipa = state.next_ipa, state.next_ipa + page_size
        result = await _timed(tally, "guest", vm.guest_map(ipa, pfn))
        if isinstance(result, OutOfMemoryError):
            await _timed(tally, "topup", vm.topup_memcache(8))
    else:
        lo, hi = mmio_window
        addr = lo + rnd.randrange(max(1, (hi - lo) // page_size)) * page_size
        await _timed(tally, "mmio", vm.map_mmio(addr))


async def _batch_step(vm: AsyncVM, stream: Any, tally: VmTally, size: int) -> None:
    allocs = Batch()
    for _ in range(size):
        allocs.alloc_pages(0)
    start = time.perf_counter()
    result = await stream.execute(allocs)
    tally.latencies["batch_alloc"].append(time.perf_counter() - start)
    puts = Batch()
    for value in result:
        if isinstance(value, PkvmError):
            tally.count("alloc", type(value).__name__)
        else:
            tally.count("alloc", "ok")
            puts.put_page(value)
    if len(puts):
        start = time.perf_counter()
        for value in await stream.execute(puts):
            tally.count("put", type(value).__name__ if isinstance(value, PkvmError) else "ok")
        tally.latencies["batch_put"].append(time.perf_counter() - start)


async def _client(hv: AsyncHypervisor, index: int, args: argparse.Namespace,
                  deadline: float, page_size: int) -> VmTally:
    tally = VmTally()
    rnd = random.Random(args.seed * 1_000_003 + index)
    async with await hv.create_vm(nr_vcpus=1, slice_pages=args.slice_pages,
                                  name=f"loadgen-{index}") as vm:
        state = ClientState(vm, rnd)
        if args.batch:
            async with vm.stream() as stream:
                while time.monotonic() < deadline and tally.ops < args.max_ops:
                    await _batch_step(vm, stream, tally, args.batch)
            return tally
        window = (args.mmio_base, args.mmio_base + args.mmio_window)
        while time.monotonic() < deadline and tally.ops < args.max_ops:
            await _unary_step(state, tally, window, page_size)
        for pfn in state.held:  # leave the hyp pool as we found it, then destroy
            await vm.put_page(pfn)
    return tally


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(tallies: list[VmTally], elapsed: float, pools_before: dict[str, int],
              pools_after: dict[str, int], vms_after: int) -> dict[str, Any]:
    latencies: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter[tuple[str, str]] = Counter()
    for tally in tallies:
        outcomes.update(tally.outcomes)
        for op, values in tally.latencies.items():
            latencies[op].extend(values)
    ops = sum(t.ops for t in tallies)
    failures = {f"{op}:{kind}": n for (op, kind), n in outcomes.items()
                if kind != "ok" and (op, kind) not in EXPECTED_REFUSALS}
    leaked = {name: pools_before[name] - pools_after.get(name, 0)
              for name in ("hyp",) if pools_before.get(name) != pools_after.get(name)}
    return {
        "vms": len(tallies),
        "seconds": round(elapsed, 3),
        "operations": ops,
        "ops_per_second": round(ops / elapsed, 1) if elapsed else 0.0,
        "latency_ms": {op: {"calls": len(v), "p50": round(_percentile(v, 50) * 1e3, 3),
                            "p99": round(_percentile(v, 99) * 1e3, 3)}
                       for op, v in sorted(latencies.items()) if v},
        "outcomes": {f"{op}:{kind}": n for (op, kind), n in sorted(outcomes.items())},
        "failures": failures,
        "leaked_pages": leaked,
        "vms_left": vms_after,
        "ok": not failures and not leaked and vms_after == 0,
    }


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncHypervisor(args.target) as hv:
        reserve = await hv.reserve()
        before = {p.name: p.free_pages for p in (await hv.stats()).pools}
        start = time.monotonic()
        deadline = start + min(args.duration, MAX_DURATION_S)
        tallies = await asyncio.gather(*(
            _client(hv, i, args, deadline, reserve.page_size) for i in range(args.vms)))
        elapsed = time.monotonic() - start
        stats = await hv.stats()
        after = {p.name: p.free_pages for p in stats.pools}
        return summarise(list(tallies), elapsed, before, after, stats.nr_vms)


def _print_human(report: dict[str, Any]) -> None:
    print(f"{report['vms']} VMs, {report['seconds']} s: {report['operations']} operations,"
          f" {report['ops_per_second']:.0f} ops/s")
    for op, fig in report["latency_ms"].items():
        print(f"  {op:<12} {fig['calls']:>8} calls  p50 {fig['p50']:.3f} ms"
              f"  p99 {fig['p99']:.3f} ms")
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in report["outcomes"].items()))
    if report["failures"]:
        print("FAILURES: " + ", ".join(f"{k}={v}" for k, v in report["failures"].items()))
    if report["leaked_pages"]:
        print(f"LEAKED pages (hyp pool free pages before - after): {report['leaked_pages']}")
    print("result: " + ("ok" if report["ok"] else "FAILED"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the service")
    parser.add_argument("--vms", type=int, default=16, help="concurrent client VMs")
    parser.add_argument("--duration", type=float, default=10.0,
                        help=f"seconds to run (at most {MAX_DURATION_S:.0f})")
    parser.add_argument("--max-ops", type=int, default=100_000, help="operations per VM")
    parser.add_argument("--slice-pages", type=int, default=256, help="host RAM pages per VM")
    parser.add_argument("--batch", type=int, default=0,
                        help="stream Execute batches of N allocs then N puts (0: unary mix)")
    parser.add_argument("--mmio-base", type=lambda s: int(s, 0), default=0x0900_0000)
    parser.add_argument("--mmio-window", type=lambda s: int(s, 0), default=0x0100_0000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.vms < 1 or args.duration <= 0 or not 0 <= args.batch <= 4096:
        print("loadgen: need --vms >= 1, --duration > 0 and 0 <= --batch <= 4096")
        return 2
    report = asyncio.run(run_load(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    return 0 if report["ok"] else 1
