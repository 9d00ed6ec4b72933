"""`pkvm-sim state inspect FILE`: what a state file holds, without starting a server.

    pkvm-sim state inspect machine.pkvm          # configuration, VMs, pools, counters
    pkvm-sim state inspect machine.pkvm --json   # the same as one JSON object

The file is checked (magic, version, checksum) and restored in-process, exactly as `serve
--state-file` would restore it, audit included; the figures are the restored machine's own
`statistics()`, so they are what GetStats would answer after a restart. The VMs' tokens are
never printed. A file that cannot be restored is one line on stderr and exit status 2; the
file is only read.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pkvm_sim.core import state_file
from pkvm_sim.core.hypervisor import VM_HANDLE_OFFSET, Hypervisor
from pkvm_sim.core.state_file import StateFileError

EXIT_OK = 0
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    inspect = actions.add_parser("inspect", help="print what a state file holds")
    inspect.add_argument("file", metavar="FILE", help="a state file written by serve")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    try:
        decoded = state_file.load(args.file)
        hv = state_file.restore(decoded)
    except StateFileError as error:
        print(f"pkvm-sim state: {args.file}: {error}", file=sys.stderr)
        return EXIT_USAGE
    for note in decoded.notes:
        print(f"pkvm-sim state: {args.file}: note: {note}", file=sys.stderr)
    summary = summarise(decoded, hv)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render(args.file, summary))
    return EXIT_OK


def summarise(decoded: state_file.StateFile, hv: Hypervisor) -> dict[str, Any]:
    """The JSON form: file facts, configuration, VMs, pools, counters (no tokens)."""
    stats = hv.statistics()
    leases = {int(h): (float(d), float(left))
              for h, d, left in decoded.service.get("leases", ())}
    vms = []
    for handle, vm in hv.vm_table.items():
        duration, left = leases.get(handle, (0.0, 0.0))
        vms.append({
            "handle": handle, "vmid": vm.vmid, "name": vm.name, "nr_vcpus": vm.nr_vcpus,
            "slice_base_pfn": vm.slice_base_pfn, "slice_nr_pages": vm.slice_nr_pages,
            "donated_pages": vm.donated_pages, "memcache_pages": len(vm.memcache),
            "shared_pages": len(vm.shared), "pinned_pages": len(vm.pins),
            "hyp_blocks": sum(1 for h, kind in hv.owners.values()
                              if h == handle and kind.value == "hyp"),
            "lease_seconds": duration, "lease_left_seconds": round(left, 3),
        })
    counters = decoded.service.get("counters", {})
    return {
        "file": {"size_bytes": decoded.size_bytes, "format_version": decoded.version,
                 "checksum": "ok", "audit": "passed"},
        "config": state_file.config_to_json(hv.config),
        "hyp_page_layout": hv.config.layout.name,
        "vms_created": hv.vms_created,
        "next_handle": VM_HANDLE_OFFSET + hv.vms_created,
        "vms": vms,
        "pools": [
            {"name": p.name, "base_pfn": p.base_pfn, "total_pages": p.total_pages,
             "free_pages": p.free_pages, "allocated_pages": p.allocated_pages,
             "reserved_pages": p.reserved_pages, "max_order": p.max_order,
             "free_blocks_per_order": list(p.free_blocks_per_order),
             "alloc_failures": p.alloc_failures}
            for p in stats.pools
        ],
        "host_stage2": {k: getattr(stats.host_stage2, k)
                        for k in stats.host_stage2.__dataclass_fields__},
        "shared_pages": stats.shared_pages,
        "hyp_mem_pages": stats.hyp_mem_pages,
        "operations": counters.get("operations", {}),
        "requests": sum(int(n) for _m, _c, n in counters.get("requests", ())),
    }


def render(path: str, s: dict[str, Any]) -> str:
    f, c = s["file"], s["config"]
    blocks = ", ".join(f"{b['base']:#x}:{b['size'] >> 20}M" for b in c["memblocks"])
    lines = [
        f"{path}: {f['size_bytes']} bytes, format version {f['format_version']},"
        f" checksum {f['checksum']}, audit {f['audit']}",
        f"configuration: profile {c['profile']}, page size {c['page_size'] >> 10}K, hyp_page"
        f" layout {s['hyp_page_layout']}, vmemmap {c['vmemmap_coverage']},"
        f" memblocks {blocks}",
        f"machine: {len(s['vms'])} VMs ({s['vms_created']} ever created, next handle"
        f" {s['next_handle']:#x}), {s['shared_pages']} pages shared with hyp,"
        f" hyp_mem_pages {s['hyp_mem_pages']}",
        "",
        f"{'pool':<12} {'total':>8} {'free':>8} {'allocated':>9} {'reserved':>8}"
        f" {'failures':>8}  free blocks per order",
    ]
    for p in s["pools"]:
        lines.append(f"{p['name']:<12} {p['total_pages']:>8} {p['free_pages']:>8}"
                     f" {p['allocated_pages']:>9} {p['reserved_pages']:>8}"
                     f" {p['alloc_failures']:>8}  {p['free_blocks_per_order']}")
    lines += ["", f"{'handle':<8} {'vmid':>4} {'name':<16} {'vcpus':>5} {'slice':>7}"
              f" {'donated':>7} {'memcache':>8} {'shared':>6} {'pinned':>6} {'lease left':>10}"]
    for vm in s["vms"]:
        lease = f"{vm['lease_left_seconds']:.0f} s" if vm["lease_seconds"] else "none"
        lines.append(f"{vm['handle']:<#8x} {vm['vmid']:>4} {vm['name'][:16]:<16}"
                     f" {vm['nr_vcpus']:>5} {vm['slice_nr_pages']:>7} {vm['donated_pages']:>7}"
                     f" {vm['memcache_pages']:>8} {vm['shared_pages']:>6}"
                     f" {vm['pinned_pages']:>6} {lease:>10}")
    h = s["host_stage2"]
    lines += ["", "host stage-2: " + ", ".join(f"{k} {v}" for k, v in h.items())]
    ops = ", ".join(f"{k} {v}" for k, v in s["operations"].items() if v and k != "unspecified")
    lines.append(f"service: {s['requests']} requests served; operations: {ops or 'none'}")
    return "\n".join(lines)
