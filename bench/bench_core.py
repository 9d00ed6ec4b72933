"""Benchmark of the simulation core (issue 2). Prints figures and ratios; asserts nothing.

    python bench/bench_core.py [--quick]

1. Allocator speed: warm order-0 alloc+put pairs and a recorded random mixed trace, for
   HypPool and, in the same run, for a straightforward object-per-page port (the baseline),
   on a 4 GiB pool and on a 1 TiB pool (cost per op must not depend on pool size).
2. Storage: the simulator's bytes per simulated page for each hyp_page layout.
3. Boot: start-up time and peak resident memory of Hypervisor.boot for 4 GiB, 64 GiB and
   1 TiB of RAM (vmemmap coverage 'all'), each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_hyp_pool import NaivePool  # noqa: E402
from pkvm_sim.core.hyp_pool import HypPool  # noqa: E402
from pkvm_sim.core.layout import LAYOUTS  # noqa: E402
from pkvm_sim.core.physmem import PhysicalMemory  # noqa: E402
from pkvm_sim.core.vmemmap import Vmemmap  # noqa: E402

GIB_PAGES = 1 << 18  # 4 KiB pages per GiB
BASE_PFN = 0x80000


def make_pool(nr_pages: int, layout: str = "4") -> HypPool:
    vmemmap = Vmemmap(LAYOUTS[layout], [(BASE_PFN, nr_pages)])
    return HypPool(vmemmap, PhysicalMemory(), BASE_PFN, nr_pages, 0)


def fragment(alloc: Callable[[int], int | None], put: Callable[[int], int]) -> None:
    """Leave a warm, fragmented pool: 200k order-0 pages taken, every other one freed."""
    held = [alloc(0) for _ in range(200_000)]
    for pfn in held[::2]:
        assert pfn is not None
        put(pfn)


def record_mixed_trace(nr_pages: int, n_ops: int, seed: int = 7) -> list[tuple[int, int]]:
    """(0, order) = alloc, (1, pfn) = put; recorded on HypPool so both pools replay it."""
    pool = make_pool(nr_pages)
    fragment(pool.try_alloc_pages, pool.put_page)
    rnd = random.Random(seed)
    held: list[int] = []
    trace: list[tuple[int, int]] = []
    orders = [0] * 6 + [1, 1, 2, 3, 4, 6]
    for _ in range(n_ops):
        if held and (rnd.random() < 0.5 or len(held) > 50_000):
            pfn = held.pop(rnd.randrange(len(held)))
            pool.put_page(pfn)
            trace.append((1, pfn))
        else:
            order = rnd.choice(orders)
            got = pool.try_alloc_pages(order)
            trace.append((0, order))
            if got is not None:
                held.append(got)
    return trace


def time_pairs(alloc: Callable[[int], int | None], put: Callable[[int], int], n: int,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per order-0 alloc+put pair (best of 3), by `clock` (wall time by default)."""
    best = float("inf")
    for _ in range(3):
        start = clock()
        for _ in range(n):
            put(alloc(0))  # type: ignore[arg-type]
        best = min(best, (clock() - start) / n)
    return best


def time_trace(alloc: Callable[[int], int | None], put: Callable[[int], int],
               trace: list[tuple[int, int]],
               clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    for op, arg in trace:
        if op:
            put(arg)
        else:
            alloc(arg)
    return (clock() - start) / len(trace)


def allocator_speed(nr_pages: int, n_pairs: int, n_ops: int) -> dict[str, float]:
    pool = make_pool(nr_pages)
    fragment(pool.try_alloc_pages, pool.put_page)
    ours_pair = time_pairs(pool.try_alloc_pages, pool.put_page, n_pairs)
    trace = record_mixed_trace(nr_pages, n_ops)
    pool = make_pool(nr_pages)
    fragment(pool.try_alloc_pages, pool.put_page)
    ours_mixed = time_trace(pool.try_alloc_pages, pool.put_page, trace)
    figures = {"pair_us": ours_pair * 1e6, "mixed_us": ours_mixed * 1e6}
    if nr_pages <= 4 * GIB_PAGES:  # the object-per-page baseline would not fit 1 TiB
        naive = NaivePool(BASE_PFN, nr_pages, pool.max_order)
        fragment(naive.alloc, naive.put)
        figures["naive_pair_us"] = time_pairs(naive.alloc, naive.put, n_pairs) * 1e6
        naive = NaivePool(BASE_PFN, nr_pages, pool.max_order)
        fragment(naive.alloc, naive.put)
        figures["naive_mixed_us"] = time_trace(naive.alloc, naive.put, trace) * 1e6
    return figures


def peak_rss_bytes() -> int:
    """VmHWM of this process. (ru_maxrss would include the parent's: it survives exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def boot_child(memory: str) -> None:
    """Run in a fresh process: boot a machine and report time and peak RSS as JSON."""
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.core.hypervisor import Hypervisor

    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    # 44 IA bits: 0x8000_0000 + 1 TiB does not fit the default 40-bit IPA space.
    hv = Hypervisor.boot(SimConfig.from_mapping(
        {"memblocks": [f"0x80000000:{memory}"], "ia_bits": 44, "vmemmap_coverage": "all"}))
    elapsed = time.perf_counter() - start
    stats = hv.statistics()
    print(json.dumps({"boot_s": elapsed, "peak_rss_bytes": peak_rss_bytes(),
                      "rss_before_boot_bytes": rss_before,
                      "vmemmap_modelled_bytes": stats.vmemmap.modelled_bytes,
                      "vmemmap_stored_bytes": stats.vmemmap.stored_bytes}))


def boot_figures(memory: str) -> dict[str, float] | str:
    proc = subprocess.run([sys.executable, __file__, "--boot-child", memory],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        return f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'}"
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer operations, no 1 TiB boot")
    parser.add_argument("--boot-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.boot_child:
        boot_child(args.boot_child)
        return
    n_pairs, n_ops = (50_000, 100_000) if args.quick else (300_000, 400_000)

    print("== allocator (HypPool vs object-per-page baseline, same run) ==")
    small = allocator_speed(4 * GIB_PAGES, n_pairs, n_ops)
    pair_speedup = small["naive_pair_us"] / small["pair_us"]
    mixed_speedup = small["naive_mixed_us"] / small["mixed_us"]
    print(f"4 GiB pool : order-0 alloc+put pair {small['pair_us']:.3f} us"
          f" (baseline {small['naive_pair_us']:.3f} us; speed vs baseline {pair_speedup:.2f}x)")
    print(f"4 GiB pool : random mixed trace {small['mixed_us']:.3f} us/op"
          f" (baseline {small['naive_mixed_us']:.3f} us/op;"
          f" speed vs baseline {mixed_speedup:.2f}x)")
    big = allocator_speed(1024 * GIB_PAGES, n_pairs, n_ops)
    print(f"1 TiB pool : order-0 pair {big['pair_us']:.3f} us, mixed {big['mixed_us']:.3f} us/op;"
          f" cost ratio 1 TiB / 4 GiB: pair {big['pair_us'] / small['pair_us']:.2f},"
          f" mixed {big['mixed_us'] / small['mixed_us']:.2f} (target <= 1.2)")

    print("== storage per simulated page ==")
    for name, layout in LAYOUTS.items():
        ratio = layout.stored_bytes / layout.entry_bytes
        print(f"layout {name:>2}: models {layout.entry_bytes} B/page,"
              f" stores {layout.stored_bytes} B/page ({ratio:.2f}x)")
    pool = make_pool(4 * GIB_PAGES)
    fragment(pool.try_alloc_pages, pool.put_page)
    nodes = sum(len(q) for q in pool._lists)
    print(f"free-list entries held sparsely: {nodes} for {pool.nr_pages} pages"
          " in a fragmented 4 GiB pool")

    print("== boot (coverage 'all', fresh process each) ==")
    for memory in (["4G", "64G"] if args.quick else ["4G", "64G", "1T"]):
        fig = boot_figures(memory)
        if isinstance(fig, str):
            print(f"{memory:>4}: {fig}")
            continue
        model = fig["vmemmap_modelled_bytes"]
        budget = 1.25 * model + 200 * 2**20
        peak = fig["peak_rss_bytes"]
        verdict = "within" if peak <= budget else "OVER"
        print(f"{memory:>4}: boot {fig['boot_s']:.2f} s, peak RSS {peak / 2**20:.0f} MiB"
              f" (before boot {fig['rss_before_boot_bytes'] / 2**20:.0f} MiB; modelled vmemmap"
              f" {model / 2**20:.0f} MiB; budget 1.25x + 200 MiB = {budget / 2**20:.0f} MiB:"
              f" {verdict})")


if __name__ == "__main__":
    main()
