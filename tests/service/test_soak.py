"""A short soak (bench/bench_tenancy_soak.py is the long one): 64 VMs over two client
processes, one SIGKILLed every few seconds; after teardown GetStats equals post-boot."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = str(Path(__file__).resolve().parents[2] / "bench")


def load_bench() -> ModuleType:
    """The benchmark module, importable by name (its client processes are spawned)."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    return importlib.import_module("bench_tenancy_soak")


def test_short_soak_leaves_the_machine_as_booted() -> None:
    bench = load_bench()
    result = bench.soak(seconds=15, nr_vms=64, nr_workers=2, kill_every=3.0)
    assert result.kills >= 3
    assert result.peak_vms >= 32 and result.peak_hyp_allocated > 0  # the load really ran
    assert result.after == result.post_boot
    # RSS: no growth beyond noise over the second half (a leak of names or VMs shows here).
    assert result.rss_growth_second_half < 0.10, result.rss_mib
