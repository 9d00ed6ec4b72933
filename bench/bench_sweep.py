"""Benchmark of `pkvm-sim sweep` on Dask (issue 19). Prints figures and ratios; asserts nothing.

    python bench/bench_sweep.py [--quick] [--workers 2]

A 64-point grid (v6.1 and v6.12, 4K and 16K pages, 4 machines from 4 to 32 GiB; capacity of a
64 MiB and a 1 GiB guest shape, mmio-pressure with 2 seeds) runs three ways in the same run:

- in this process (`--scheduler none`): the floor, no Dask at all;
- on a LocalCluster of 1 worker process, then of N (default 2) worker processes, alternated
  --repeat times (default 2), the best time of each kept.

For each cluster: the start-up (cluster up, workers connected) and the tasks alone (submit to
the last row), then "1 worker / N workers" on the tasks alone: the speed-up the issue asks
for (>= 1.7x on 2 workers). A ratio far below N on a machine shared with other work says the
cores were busy, not that the sweep is serial: the figures include the load average.
The rows of every way must be equal (printed as a check).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from typing import Any

from pkvm_sim.tools.sweep import (
    Point,
    Row,
    local_cluster,
    parse_grid,
    run_in_process,
    run_with_client,
)

MACHINE_GIB = (4, 8, 16, 32)


def grid(quick: bool) -> list[Point]:
    """64 points: capacity (2 shapes) and mmio-pressure (2 seeds) on 2 profiles x 2 page sizes
    x 4 machines; each point a fraction of a second to a second of CPU."""
    gibs = MACHINE_GIB[:1] if quick else MACHINE_GIB
    doc: dict[str, Any] = {
        "runs": ["capacity", "mmio-pressure"],
        "profiles": ["v6.1", "v6.12"],
        "page_sizes": ["4K", "16K"],
        "seeds": [1, 2],
        "machines": {f"ram-{g}g": [f"0x40000000:{g}G"] for g in gibs},
        "shapes": {"small": {"vcpus": 1, "memory": "64M"},
                   "std": {"vcpus": 2, "memory": "1G"}},
        "mmio-pressure": {"spans": ["0.5G", "1G"], "faults_per_span": 800, "ram_fragments": 8},
    }
    return parse_grid(doc).points()


def on_cluster(points: list[Point], workers: int) -> tuple[float, float, list[Row]]:
    """(start-up s, tasks s, rows) on a fresh LocalCluster of `workers` processes."""
    distributed: Any = importlib.import_module("distributed")
    started = time.perf_counter()
    with local_cluster(workers) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(lambda: importlib.import_module("pkvm_sim.tools.sweep"))  # warm imports
        up = time.perf_counter()
        rows: list[Row] = []
        run_with_client(client, points, lambda _row: None, rows)
        done = time.perf_counter()
    return up - started, done - up, sorted(rows, key=lambda r: int(r["point"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 points instead of 64")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each cluster size")
    args = parser.parse_args()
    points = grid(args.quick)
    print(f"grid: {len(points)} points (capacity, mmio-pressure); CPUs {os.cpu_count()},"
          f" load average {os.getloadavg()[0]:.1f} at start")
    started = time.perf_counter()
    reference: list[Row] = []
    run_in_process(points, lambda _row: None, reference)
    in_process_s = time.perf_counter() - started
    print(f"{'way':<22}{'start-up s':>12}{'tasks s':>10}{'points/s':>10}")
    print(f"{'in process':<22}{'-':>12}{in_process_s:>10.2f}{len(points) / in_process_s:>10.1f}")
    best: dict[int, float] = {}
    for repeat in range(args.repeat):  # alternated, so that a change of load hits both
        for workers in (1, args.workers):
            up_s, tasks_s, rows = on_cluster(points, workers)
            best[workers] = min(best.get(workers, tasks_s), tasks_s)
            label = f"#{repeat + 1} LocalCluster {workers}w"
            print(f"{label:<22}{up_s:>12.2f}{tasks_s:>10.2f}{len(points) / tasks_s:>10.1f}"
                  f"   rows equal in-process: {rows == reference}")
    ratio = best[1] / best[args.workers]
    print(f"speed-up, tasks alone (best of {args.repeat}): 1 worker / {args.workers} workers"
          f" = {ratio:.2f}x (target >= 1.7x on 2); load average {os.getloadavg()[0]:.1f}"
          " at end")


if __name__ == "__main__":
    main()
