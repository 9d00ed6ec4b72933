"""`pkvm-sim scenario`: seeded workloads that put the series' claims side by side.

vm-lifecycle: what VMs cost at EL2 on a kernel, step by step (tools/lifecycle.py).

mmio-pressure (docs/stage2.md): the same machine and the same seeded fault sequence under the
v5.13 profile (two host stage-2 pools; only MMIO faults recycle, from the MMIO pool) and the
v5.14 profile (one pool; any -ENOMEM recycles MMIO and retries):

  1. memory is faulted in with blocks where possible: one fault per block-sized window that
     lies entirely in RAM (the rest of RAM is left to later, lazy faults);
  2. MMIO faults over growing IPA spans (0.5, 1, 2, 4 GiB... from --span-base, default 0): in each
     span, `--faults-per-span` uniformly drawn MMIO pages (addresses that are not RAM).

Reported per profile: MMIO faults and MMIO pages mapped before the first recycle, recycles,
table pages those recycles freed, failures, peak and final host stage-2 pool pages in use.

With the default machine (one RAM region) MMIO lives in large gaps that the range search maps
with 1 GiB / 2 MiB blocks, so it costs almost no table pages and neither profile recycles.
Pressure needs MMIO that cannot be block-mapped: `--ram-fragments N` splits RAM into N
memblocks separated by `--hole` bytes of MMIO (firmware/device holes), so MMIO pages share
block windows with RAM and need level-3 tables. The `refcount-limit` scenario shows the
16-bit hyp_page layout with 64K pages failing on a full table page (A.1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pkvm_sim.core.config import Memblock, SimConfig, parse_size
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.layout import GIB, PAGE_SIZES, Profile
from pkvm_sim.core.model import FaultOutcome
from pkvm_sim.core.profiles import kernel_profile_names, profile_names

from .lifecycle import (
    DEFAULT_MEMBLOCK,
    DEFAULT_VM_CAP,
    lifecycle_config,
    plot_lifecycle,
    run_vm_lifecycle,
)
from .plots import ScenarioTimeline, plot_scenario, sampler

SCENARIOS = ("mmio-pressure", "refcount-limit", "vm-lifecycle")
DEFAULT_SPANS = "0.5G,1G,2G,4G"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=SCENARIOS, help="which scenario to run")
    parser.add_argument("--profile", choices=[*profile_names(), "both", "all"],
                        action="append", default=None,
                        help="profile(s) to run side by side, repeatable (default: both ="
                        " v5.13 and v5.14; vm-lifecycle: v6.12; all = every kernel profile)")
    parser.add_argument("--page-size", default="4K", choices=sorted(PAGE_SIZES))
    parser.add_argument("--memblock", action="append", default=None, metavar="BASE:SIZE",
                        help="RAM region (repeatable; default 0x80000000:4G, vm-lifecycle:"
                        f" {DEFAULT_MEMBLOCK} as on QEMU virt)")
    parser.add_argument("--cpus", type=int, default=1,
                        help="vm-lifecycle: CPUs (per-CPU areas, stacks mapped at EL2)")
    parser.add_argument("--carveout-base", default=None, metavar="ADDR",
                        help="vm-lifecycle: place the carve-out here (default: top-down)")
    parser.add_argument("--vm-cap", type=int, default=DEFAULT_VM_CAP,
                        help="vm-lifecycle: stop counting the VM limit here (default"
                        " %(default)s; the JSON says null when no VM was refused)")
    parser.add_argument("--ram-fragments", type=int, default=1,
                        help="split each RAM region into N memblocks separated by --hole")
    parser.add_argument("--hole", default="1M", help="MMIO hole between RAM fragments")
    parser.add_argument("--spans", default=DEFAULT_SPANS, help="comma-separated IPA spans")
    parser.add_argument("--span-base", default=None,
                        help="where the MMIO spans start (default 0, the bottom of the IPA space)")
    parser.add_argument("--ia-bits", type=int, default=None,
                        help=f"host stage-2 IPA bits (default {SimConfig().ia_bits}; vm-lifecycle:"
                        " the kernel's limit on QEMU's max CPU, 52 for v6.12 4K with LPA2, else"
                        " 48); 44 to 48 give a 4-level stage-2 with 4K pages, whose level 0"
                        " holds no blocks; up to 52 with LPA2 (v6.9+) or 64K pages")
    parser.add_argument("--faults-per-span", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--plot", metavar="FILE.png|FILE.svg",  # observe: tools/plots.py
                        help="mmio-pressure: also draw table pages and recycles over the"
                        " faults; vm-lifecycle: the hyp pool over the steps")


@dataclass
class ProfileResult:
    profile: str
    memory_faults: int = 0
    memory_tables: int = 0
    mmio_faults: int = 0
    mmio_faults_before_recycle: int = 0
    mmio_pages_before_recycle: int = 0
    mmio_pages_mapped_total: int = 0  # re-faults after a recycle count again
    recycles: int = 0
    recycled_pages: int = 0
    failures: int = 0
    fatal_faults: int = 0
    refcount_limit_hits: int = 0
    pool_pages: int = 0
    pool_pages_used_peak: int = 0
    pool_pages_used_end: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def build_config(args: argparse.Namespace, profile: str) -> SimConfig:
    page_size = PAGE_SIZES[args.page_size]
    blocks = [Memblock.parse(m) for m in (args.memblock or ["0x80000000:4G"])]
    if args.ram_fragments > 1:
        hole = parse_size(args.hole)
        split: list[Memblock] = []
        for block in blocks:
            n = args.ram_fragments
            size = (block.size - (n - 1) * hole) // n // page_size * page_size
            if size <= 0:
                raise SystemExit("--hole too large for --ram-fragments")
            split += [Memblock(block.base + i * (size + hole), size) for i in range(n)]
        blocks = split
    return SimConfig(profile=Profile(profile), page_size=page_size, memblocks=tuple(blocks),
                     ia_bits=args.ia_bits if args.ia_bits is not None else SimConfig().ia_bits)


def _host_pool_used(hv: Hypervisor) -> int:
    stats = hv.statistics()
    return stats.host_stage2.table_pages


def run_mmio_pressure(config: SimConfig, spans: list[int], faults_per_span: int,
                      seed: int, span_base: int | None = None,
                      on_fault: Callable[[Hypervisor, ProfileResult], None] | None = None,
                      ) -> ProfileResult:
    """`on_fault(hv, result)` runs after each MMIO fault (scenario --plot samples there)."""
    hv = Hypervisor.boot(config)
    page = config.page_size
    result = ProfileResult(config.profile.value)
    result.pool_pages = sum(p.nr_pages for p in hv.host_pools)
    peak = _host_pool_used(hv)
    pgt = hv.host_stage2.pgt
    # 1. memory, with blocks where possible: one fault per largest block window inside RAM.
    for level in range(pgt.start_level, 4):
        if pgt.block_allowed(level) and level < 3:
            block = pgt.granule(level)
            for mb in config.memblocks:
                start = -(-mb.base // block) * block
                for addr in range(start, mb.end - block + 1, block):
                    if hv.page_info(addr // page).owner != "host":
                        continue
                    r = hv.host_fault(addr)
                    if r.outcome is FaultOutcome.MAPPED:
                        result.memory_faults += 1
                        result.memory_tables += r.tables_allocated
    peak = max(peak, _host_pool_used(hv))
    # 2. MMIO faults over growing spans, from the bottom of RAM.
    rng = random.Random(seed)
    base = 0 if span_base is None else span_base
    first_recycle_seen = False
    for span in spans:
        for _ in range(faults_per_span):
            for _try in range(64):  # draw until an MMIO page (a span may be mostly RAM)
                addr = (base + rng.randrange(span // page) * page) % pgt.ia_size
                if not hv.host_stage2.is_memory(addr):
                    break
            else:
                continue
            r = hv.map_mmio(addr)
            result.mmio_faults += 1
            first_recycle_seen = first_recycle_seen or r.recycled
            if r.outcome is FaultOutcome.MAPPED:
                pages = (r.range_end - r.range_start) // page
                result.mmio_pages_mapped_total += pages
                if not first_recycle_seen:
                    result.mmio_faults_before_recycle += 1
                    result.mmio_pages_before_recycle += pages
            peak = max(peak, _host_pool_used(hv))
            if on_fault is not None:
                on_fault(hv, result)
    # Whole-run counts come from the model's own statistics (the memory phase adds none).
    stats = hv.statistics().host_stage2
    result.recycles = stats.mmio_recycles
    result.recycled_pages = stats.mmio_recycled_pages
    result.failures = stats.map_failures
    result.fatal_faults = stats.fatal_faults
    result.refcount_limit_hits = stats.refcount_limit_hits
    result.pool_pages_used_peak = peak
    result.pool_pages_used_end = stats.table_pages
    hv.audit()
    return result


def run_refcount_limit(page_size: int, seed: int) -> dict[str, Any]:
    """16-bit hyp_page (layout 2) with 64K pages: fill one level-3 table page.

    RAM is 256 MiB at 0x8000_0000, so the 512 MiB window [0x8000_0000, 0xA000_0000) is half
    RAM, half MMIO and can only be mapped page by page, all in one table page of 8192 entries;
    its refcount would reach 1 + 8192 = 8193 > 8191.
    """
    del seed
    config = SimConfig(profile=Profile.V5_14, hyp_page_layout="2", page_size=page_size,
                       memblocks=(Memblock(0x8000_0000, 256 << 20),))
    hv = Hypervisor.boot(config)
    window = hv.host_stage2.pgt.granule(2)
    first_failure: dict[str, Any] | None = None
    mapped = 0
    for addr in range(0x8000_0000, 0x8000_0000 + window, page_size):
        r = hv.host_fault(addr)
        if r.outcome is FaultOutcome.MAPPED:
            mapped += 1
        elif (r.outcome is FaultOutcome.FATAL and r.reason and "REFCOUNT" in r.reason
              and first_failure is None):
            first_failure = {"addr": addr, "reason": r.reason}
    hv.audit()
    stats = hv.statistics().host_stage2
    return {
        "layout": "2", "page_size": page_size, "entries_per_table": page_size // 8,
        "refcount_max": config.layout.refcount_max, "pages_mapped": mapped,
        "refcount_limit_hits": stats.refcount_limit_hits, "first_failure": first_failure,
    }


def run(args: argparse.Namespace) -> int:
    if args.name == "refcount-limit":
        out = run_refcount_limit(PAGE_SIZES["64K"], args.seed)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print("16-bit hyp_page layout (13-bit refcount, max 8191) with 64K pages:")
            print(f"  one table page holds {out['entries_per_table']} entries; a full page needs"
                  f" refcount {out['entries_per_table'] + 1}")
            print(f"  pages mapped in the shared 512 MiB window: {out['pages_mapped']}")
            print(f"  refcount-limit refusals: {out['refcount_limit_hits']}")
            if out["first_failure"]:
                ff = out["first_failure"]
                print(f"  first refusal at {ff['addr']:#x}: {ff['reason']}")
        return 0 if out["refcount_limit_hits"] else 1

    if args.name == "vm-lifecycle":
        return run_lifecycle_command(args)
    profiles = _profiles(args, ["both"])
    try:  # a bad span or an impossible memory map is the user's error, not a crash
        spans = [parse_size(s) if not s.endswith(("G", "g")) or "." not in s
                 else int(float(s[:-1]) * GIB) for s in args.spans.split(",")]
        span_base = None if args.span_base is None else parse_size(args.span_base)
        timelines = {profile: ScenarioTimeline(profile) for profile in profiles}
        results = [run_mmio_pressure(build_config(args, profile), spans, args.faults_per_span,
                                     args.seed, span_base,
                                     sampler(timelines[profile]) if args.plot else None)
                   for profile in profiles]
        if args.plot:
            plot_scenario(list(timelines.values()), args.plot,
                          f"mmio-pressure: spans {args.spans}, {args.faults_per_span} "
                          f"faults per span, seed {args.seed}")
    except ValueError as error:
        print(f"scenario: error: {error}", file=sys.stderr)
        return 2
    config = build_config(args, profiles[0])
    if args.json:
        print(json.dumps({
            "scenario": "mmio-pressure", "seed": args.seed, "spans": spans,
            "faults_per_span": args.faults_per_span, "page_size": config.page_size,
            "ia_bits": config.ia_bits,
            "memblocks": [[b.base, b.size] for b in config.memblocks],
            "results": {r.profile: r.as_dict() for r in results},
        }, indent=2))
        return 0
    print(f"mmio-pressure: seed {args.seed}, {len(config.memblocks)} memblock(s),"
          f" page {args.page_size}, ia_bits {config.ia_bits}, spans {args.spans},"
          f" {args.faults_per_span} faults/span")
    rows = list(results[0].as_dict())[1:]
    header = f"{'':34}" + "".join(f"{r.profile:>12}" for r in results)
    print(header)
    for key in rows:
        print(f"{key:34}" + "".join(f"{r.as_dict()[key]:>12}" for r in results))
    return 0


def _profiles(args: argparse.Namespace, default: list[str]) -> list[str]:
    """--profile, repeatable: 'both' = v5.13 and v5.14, 'all' = every kernel profile."""
    out: list[str] = []
    for name in args.profile or default:
        for profile in {"both": ["v5.13", "v5.14"], "all": list(kernel_profile_names())}.get(
                name, [name]):
            if profile not in out:
                out.append(profile)
    return out


def run_lifecycle_command(args: argparse.Namespace) -> int:
    """vm-lifecycle: the six steps per profile; a table, --json, --plot."""
    profiles = _profiles(args, ["v6.12"])
    try:
        carveout_base = None if args.carveout_base is None else parse_size(args.carveout_base)
        configs = [lifecycle_config(profile, page_size=PAGE_SIZES[args.page_size],
                                    memblocks=args.memblock, cpus=args.cpus,
                                    ia_bits=args.ia_bits, carveout_base=carveout_base)
                   for profile in profiles]
        if args.vm_cap < 0:
            raise ValueError(f"--vm-cap must be >= 0, not {args.vm_cap}")
        results = [run_vm_lifecycle(config, vm_cap=args.vm_cap) for config in configs]
        if args.plot:
            plot_lifecycle(results, args.plot, _machine_line(configs[0], ia=len(configs) == 1))
    except ValueError as error:
        print(f"scenario: error: {error}", file=sys.stderr)
        return 2
    except PkvmError as error:  # e.g. NOT_MODELLED: a machine whose VMs are not modelled
        print(f"scenario: error: {error.message} ({error.reason})", file=sys.stderr)
        return 2
    if args.json:
        out: Any = (results[0].as_json() if len(results) == 1
                    else {r.profile: r.as_json() for r in results})
        print(json.dumps(out, indent=2))
        return 0
    for config, result in zip(configs, results, strict=True):
        print(f"vm-lifecycle {result.profile}: {_machine_line(config)}")
        print(f"  {'step':15}{'hyp pool free':>15}{'stage-1 tables':>16}{'donated':>9}"
              f"{'shared':>8}")
        for phase in result.phases:
            print(f"  {phase.phase:15}{phase.hyp_pool_free_pages:>15}"
                  f"{phase.hyp_s1_table_pages:>16}{phase.donated_pages:>9}"
                  f"{phase.shared_pages:>8}")
        limit = (f"{result.vm_limit} (then {result.vm_limit_reason})"
                 if result.vm_limit is not None else f"none up to {args.vm_cap} VMs")
        print(f"  VM limit (1-vCPU VMs run and kept open): {limit}\n")
    return 0


def _machine_line(config: SimConfig, *, ia: bool = True) -> str:
    ram = ", ".join(f"{b.size >> 20} MiB at {b.base:#x}" for b in config.memblocks)
    line = f"{ram}, {config.nr_cpus} CPU(s), {config.page_size >> 10}K pages"
    return line + (f", IPA {config.ia_bits} bits" if ia else "")


__all__ = ["add_arguments", "run", "run_lifecycle_command", "run_mmio_pressure",
           "run_refcount_limit"]
