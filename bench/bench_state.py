"""Benchmark of the state file (issue 8). Prints figures and ratios; asserts nothing.

    python bench/bench_state.py [--quick]

For a 4 GiB and a 64 GiB machine (v5.14, vmemmap coverage 'all', 4 KiB pages) carrying
256 VMs that each hold blocks in the hyp pool, shared and pinned pages, a memcache and guest
mappings, plus host stage-2 faults over all memory and MMIO faults:

- save: the snapshot taken under the simulator lock (what pauses clients), then the whole
  save (snapshot + JSON + zlib + SHA-256 + atomic write with fsync), and the file's size;
- restore: read + check + restore + audit() (what `serve --state-file` does before serving),
  and the part of it that is audit();
- the baselines, measured in the same run: booting the same configuration afresh
  (`Hypervisor.boot`, which a restore does first: "restore/boot" is the cost of coming back
  with the machine instead of without it), and driving a fresh machine to the same state
  with the core calls ("populate s", the in-process floor of rebuilding it by hand).

Each size runs in a fresh process, so one machine's memory does not weigh on the next.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor

NR_VMS = 256
BASE = 0x8000_0000


def populate(hv: Hypervisor, gib: int, seed: int = 8) -> None:
    rng = random.Random(seed)
    for i in range(NR_VMS):
        vm = hv.create_vm(nr_vcpus=1 + i % 4, slice_pages=1024, name=f"bench-{i}")
        h, base = vm.handle, vm.slice_base_pfn
        for order in (0, 0, 1, 2):
            hv.alloc_pages(h, order)
        hv.host_share(h, base, 8)
        hv.pin_shared(h, base, 2)
        hv.topup_memcache(h, 10)  # 2 tables for each of the 4 maps, 2 left over
        for j in range(4):
            hv.guest_map(h, (j + 1) << 30, base + 16 + j)
    for _ in range(4000):  # the host touches memory all over the map
        hv.host_fault(BASE + rng.randrange(gib << 30))
    for _ in range(500):
        hv.map_mmio(rng.randrange(BASE) & ~0xFFF)


def measure(gib: int) -> dict[str, Any]:
    config = SimConfig.from_mapping({"memblocks": [f"{BASE:#x}:{gib}G"]})
    t0 = time.perf_counter()
    hv = Hypervisor.boot(config)
    boot_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    populate(hv, gib)
    populate_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "machine.pkvm"
        t0 = time.perf_counter()
        snap = state_file.snapshot(hv)
        snapshot_s = time.perf_counter() - t0
        size = state_file.write_snapshot(path, snap)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = state_file.load(path)
        restored = state_file.restore(decoded)
        restore_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored.audit()
    audit_s = time.perf_counter() - t0
    same = restored.canonical_dump(host_tables=True) == hv.canonical_dump(host_tables=True)
    stats = restored.statistics()
    return {
        "gib": gib, "vms": stats.nr_vms, "boot_s": boot_s, "populate_s": populate_s,
        "snapshot_s": snapshot_s,
        "save_s": save_s, "size_bytes": size, "restore_s": restore_s, "audit_s": audit_s,
        "vmemmap_bytes": stats.vmemmap.stored_bytes,
        "host_table_pages": stats.host_stage2.table_pages, "identical": same,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 GiB only")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    sizes = [4] if args.quick else [4, 64]
    print(f"state file save/restore, v5.14, 4K pages, vmemmap 'all', {NR_VMS} VMs")
    print(f"{'RAM':>6} {'boot s':>7} {'populate s':>10} {'snapshot s':>10} {'save s':>7}"
          f" {'file MiB':>9} {'restore s':>9} {'of it audit':>11} {'restore/boot':>12}"
          f" {'vmemmap MiB':>11} {'identical':>9}")
    for gib in sizes:
        out = subprocess.run([sys.executable, __file__, "--one", str(gib)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out)
        print(f"{gib:>4}G {r['boot_s']:>7.3f} {r['populate_s']:>10.2f} {r['snapshot_s']:>10.3f}"
              f" {r['save_s']:>7.2f} {r['size_bytes'] / 2**20:>9.2f} {r['restore_s']:>9.2f}"
              f" {r['audit_s']:>11.2f} {r['restore_s'] / r['boot_s']:>12.1f}"
              f" {r['vmemmap_bytes'] / 2**20:>11.0f} {r['identical']!s:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
