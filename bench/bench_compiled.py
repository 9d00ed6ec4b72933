"""Benchmark: the compiled core against the pure-Python one, in the same run (issue 18).

    python bench/bench_compiled.py              # a few minutes on a loaded 2-core machine
    python bench/bench_compiled.py --quick      # fewer operations, no service phase
    python bench/bench_compiled.py --only alloc_pair,boot_1tib
    python bench/bench_compiled.py --only alloc_pair,alloc_trace,alloc_coalesced --cpu-time

Every measurement runs in a fresh child process of this script, once with the core as
installed (compiled when `pip install` had a C compiler) and once with PKVM_SIM_PURE_PYTHON=1
(the same sources as Python). The two flavours alternate for --rounds rounds and the best
time of each is kept, so that drift on a shared machine hits both alike. It prints seconds
per operation for both and the ratio compiled / pure (lower is better). Targets: the
allocator <= 0.25, the other core paths <= 0.5, 1 TiB boots in <= 0.4 s (compiled).
With --cpu-time the allocator workloads are timed in process CPU time (time.process_time)
instead of wall time: steadier when other processes share the CPUs.

Workloads (`--only` names):
  alloc_pair       order-0 alloc + put on a warm fragmented 4 GiB pool (per pair)
  alloc_trace      a recorded random mixed alloc/put trace, orders 0..6 (per op)
  alloc_coalesced  order-0 alloc + put on a fresh pool: 10 splits and 10 merges (per pair)
  host_fault       host stage-2 faults on distinct pages of a 4 GiB machine (per fault)
  share_unshare    host_share + host_unshare of one page (per pair)
  guest_map        guest_map of one page, memcache topped up outside the timing (per map)
  boot_1tib        Hypervisor.boot of 1 TiB, vmemmap coverage 'all' (per boot)
  state            a 4 GiB machine with 256 VMs (bench_state.populate), per save/restore
                   (best of 4 in the child):
                   state_snapshot      the core's part of a save (every object's state())
                   state_save          snapshot + JSON + zlib + SHA-256 + atomic write
                   state_restore_core  boot + restore_state + audit() of the decoded file
                   state_restore       read + checksum + decode, then the above
  service          Execute(1024) and unary calls through the real service, both against an
                   echo service in the same child (ratios per flavour; bench_service.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PURE_ENV = "PKVM_SIM_PURE_PYTHON"
CPU_TIME_ENV = "PKVM_SIM_BENCH_CPU_TIME"  # set by --cpu-time for the children
GIB_PAGES = 1 << 18
BASE = 0x8000_0000

Timings = dict[str, float]


# -- workloads (run in a child; each returns {figure: seconds per op or a ratio}) -------------


def allocator_clock() -> Callable[[], float]:
    """The allocator workloads' clock: wall time, or process CPU time with --cpu-time."""
    return time.process_time if os.environ.get(CPU_TIME_ENV) else time.perf_counter


def alloc_pair(quick: bool) -> Timings:
    import bench_core as bc

    pool = bc.make_pool(4 * GIB_PAGES)
    bc.fragment(pool.try_alloc_pages, pool.put_page)
    return {"alloc_pair": bc.time_pairs(pool.try_alloc_pages, pool.put_page,
                                        50_000 if quick else 300_000, allocator_clock())}


def alloc_trace(quick: bool) -> Timings:
    import bench_core as bc

    trace = bc.record_mixed_trace(4 * GIB_PAGES, 50_000 if quick else 300_000)
    pool = bc.make_pool(4 * GIB_PAGES)
    bc.fragment(pool.try_alloc_pages, pool.put_page)
    return {"alloc_trace": bc.time_trace(pool.try_alloc_pages, pool.put_page, trace,
                                         allocator_clock())}


def alloc_coalesced(quick: bool) -> Timings:
    import bench_core as bc

    pool = bc.make_pool(4 * GIB_PAGES)  # nothing held: every alloc splits a max-order block
    return {"alloc_coalesced": bc.time_pairs(pool.try_alloc_pages, pool.put_page,
                                             30_000 if quick else 200_000, allocator_clock())}


def _machine(gib: int = 4) -> object:
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.hypervisor import Hypervisor

    return Hypervisor.boot(SimConfig.from_mapping({"memblocks": [f"{BASE:#x}:{gib}G"]}))


def host_fault(quick: bool) -> Timings:
    from pkvm_sim.core.hypervisor import Hypervisor

    hv = _machine()
    assert isinstance(hv, Hypervisor)
    n = 5_000 if quick else 30_000
    pages = random.Random(3).sample(range((4 << 30) >> 12), n)
    start = time.perf_counter()
    for page in pages:
        hv.host_fault(BASE + (page << 12))
    return {"host_fault": (time.perf_counter() - start) / n}


def share_unshare(quick: bool) -> Timings:
    from pkvm_sim.core.hypervisor import Hypervisor

    hv = _machine()
    assert isinstance(hv, Hypervisor)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=1024)
    pfns = range(vm.slice_base_pfn, vm.slice_base_pfn + 1024)
    rounds = 5 if quick else 30
    start = time.perf_counter()
    for _ in range(rounds):
        for pfn in pfns:
            hv.host_share(vm.handle, pfn)
            hv.host_unshare(vm.handle, pfn)
    return {"share_unshare": (time.perf_counter() - start) / (rounds * len(pfns))}


def guest_map(quick: bool) -> Timings:
    from pkvm_sim.core.hypervisor import Hypervisor

    hv = _machine()
    assert isinstance(hv, Hypervisor)
    best = float("inf")
    for _ in range(2 if quick else 5):
        vm = hv.create_vm(nr_vcpus=1, slice_pages=2048)
        pfns = range(vm.slice_base_pfn, vm.slice_base_pfn + 2048)
        hv.topup_memcache(vm.handle, 64)
        start = time.perf_counter()
        for i, pfn in enumerate(pfns):  # 512 pages per last-level table: 4 tables
            hv.guest_map(vm.handle, (1 << 30) + (i << 12), pfn)
        best = min(best, (time.perf_counter() - start) / len(pfns))
        hv.teardown_vm(vm.handle)
    return {"guest_map": best}


def boot_1tib(quick: bool) -> Timings:
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.hypervisor import Hypervisor

    config = SimConfig.from_mapping(
        {"memblocks": [f"{BASE:#x}:1T"], "ia_bits": 44, "vmemmap_coverage": "all"})
    start = time.perf_counter()
    Hypervisor.boot(config)
    return {"boot_1tib": time.perf_counter() - start}


def state_save_restore(quick: bool) -> Timings:
    import bench_state
    from pkvm_sim.core import state_file
    from pkvm_sim.core.hypervisor import Hypervisor

    hv = _machine()
    assert isinstance(hv, Hypervisor)
    bench_state.populate(hv, 4)
    best: Timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "machine.pkvm"
        for _ in range(2 if quick else 4):  # best of a few: one save is tens of ms
            start = time.perf_counter()
            snap = state_file.snapshot(hv)
            snapshot_s = time.perf_counter() - start
            state_file.write_snapshot(path, snap)
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded = state_file.load(path)
            load_s = time.perf_counter() - start
            restored = state_file.restore(decoded)
            restore_s = time.perf_counter() - start
            # The snapshot is the core's part of a save (the objects' state(), under the
            # service's lock); the rest is JSON, zlib, SHA-256 and the write, C code alike in
            # both flavours. Likewise the load (read, checksum, zlib, JSON) is the C part of
            # a restore.
            for key, seconds in (("state_snapshot", snapshot_s), ("state_save", save_s),
                                 ("state_restore_core", restore_s - load_s),
                                 ("state_restore", restore_s)):
                best[key] = min(best.get(key, seconds), seconds)
            # Freed outside the clock: assigning the next round's result would free these
            # (a whole machine: milliseconds) inside it.
            del snap, decoded, restored
    return best


def service(quick: bool) -> Timings:
    """Figures per flavour (not seconds): ops/s of Execute(1024) and unary real/echo."""
    import bench_service as bs

    seconds = 1.0 if quick else 2.0
    servers = {kind: bs.ServerProcess(kind, bs.__file__) for kind in ("echo", "real")}
    try:
        unary = {kind: bs.bench_unary(s.target, seconds).ops_per_s for kind, s in servers.items()}
        execute = bs.bench_execute(servers["real"].target, 1024, seconds).ops_per_s
    finally:
        for server in servers.values():
            server.close()
    # Stored as seconds per op so that "lower is better" holds for every figure.
    return {"execute1024": 1 / execute, "unary": 1 / unary["real"],
            "unary_echo": 1 / unary["echo"]}


WORKLOADS: dict[str, Callable[[bool], Timings]] = {
    "alloc_pair": alloc_pair,
    "alloc_trace": alloc_trace,
    "alloc_coalesced": alloc_coalesced,
    "host_fault": host_fault,
    "share_unshare": share_unshare,
    "guest_map": guest_map,
    "boot_1tib": boot_1tib,
    "state": state_save_restore,
    "service": service,
}
TARGETS = {"alloc_pair": 0.25, "alloc_trace": 0.25, "alloc_coalesced": 0.25}
OTHER_CORE_TARGET = 0.5


# -- the parent -----------------------------------------------------------------------------


def run_child(workload: str, pure: bool, quick: bool, cpu_time: bool) -> tuple[str, Timings]:
    env = dict(os.environ)
    env.pop(PURE_ENV, None)
    env.pop(CPU_TIME_ENV, None)
    if pure:
        env[PURE_ENV] = "1"
    if cpu_time:
        env[CPU_TIME_ENV] = "1"
    argv = [sys.executable, __file__, "--child", workload] + (["--quick"] if quick else [])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{workload} ({'pure' if pure else 'as installed'}) failed:\n"
                         f"{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["flavour"], result["timings"]


def child(workload: str, quick: bool) -> None:
    from pkvm_sim.core import describe_core

    timings = WORKLOADS[workload](quick)
    print(json.dumps({"flavour": describe_core(), "timings": timings}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations, no service")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (best of)")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time the allocator workloads in process CPU time, not wall time")
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return 0
    names = args.only.split(",") if args.only else [
        w for w in WORKLOADS if not (args.quick and w == "service")]
    unknown = set(names) - WORKLOADS.keys()
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    print(f"compiled / pure core, same run ({os.cpu_count()} CPUs, best of {args.rounds}"
          " alternating rounds, each in a fresh process; lower ratio is better"
          + ("; allocator in CPU time)" if args.cpu_time else ")"))
    flavours: dict[bool, str] = {}
    for name in names:
        best: dict[bool, Timings] = {}
        for _ in range(args.rounds):
            for pure in (False, True):
                flavours[pure], timings = run_child(name, pure, args.quick, args.cpu_time)
                kept = best.setdefault(pure, timings)
                for key, value in timings.items():
                    kept[key] = min(kept[key], value)
        for key in best[False]:
            report(key, best[False][key], best[True][key])
    print(f"as installed: {flavours.get(False, '?')}; pure: {flavours.get(True, '?')}")
    return 0


def report(key: str, compiled: float, pure: float) -> None:
    ratio = compiled / pure
    if key in ("execute1024", "unary", "unary_echo"):
        print(f"  {key:<16} compiled {1 / compiled:>11,.0f} ops/s   pure {1 / pure:>11,.0f}"
              f" ops/s   compiled/pure time {ratio:5.2f}")
        return
    target = TARGETS.get(key, OTHER_CORE_TARGET)
    unit, scale = ("s", 1.0) if key.startswith(("boot", "state")) else ("us", 1e6)
    extra = "   (target <= 0.4 s)" if key == "boot_1tib" else ""
    print(f"  {key:<16} compiled {compiled * scale:>9.3f} {unit:<2}  pure {pure * scale:>9.3f}"
          f" {unit:<2}  ratio {ratio:5.2f} (target <= {target}){extra}")


if __name__ == "__main__":
    sys.exit(main())
