"""What choosing who pays for a destroyed VM's stage-1 tables costs (issue 20, item 15).

    python bench/bench_table_payers.py [--vms 64] [--pages 2048]

In-process v6.12 machine: a first VM is created (its creation takes the stage-1 tables of
the region where the host's VM structs live), then `--vms` VMs each share `--pages` pages of
their slices with hyp; the first VM is destroyed. Printed: the pages EL2 maps, the first
VM's tables still in use (their levels), and how long `users_of` takes over them (the
search DestroyVM runs under the simulator lock before it moves their charges).
"""

from __future__ import annotations

import argparse
import sys
import time

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.table_users import run_time_tables, users_of


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=64)
    parser.add_argument("--pages", type=int, default=2048)
    args = parser.parse_args()
    hv = Hypervisor.boot(SimConfig.from_mapping({"profile": "v6.12"}))
    stage1 = hv.hyp_stage1
    first = hv.create_vm(nr_vcpus=2, slice_pages=64)
    first_tables = run_time_tables(stage1)
    for _ in range(args.vms):
        vm = hv.create_vm(nr_vcpus=2, slice_pages=args.pages)
        hv.host_share(vm.handle, vm.slice_base_pfn, args.pages)
    hv.destroy_vm(first.handle)
    left = {pfn: key for pfn, key in first_tables.items() if stage1.table_at(key) == pfn}
    started = time.perf_counter()
    users = users_of(hv, left.values())
    seconds = time.perf_counter() - started
    print(f"EL2 maps {len(stage1.mapped)} pages; the first VM's tables still in use: "
          f"{len(left)} (levels {sorted(level for level, _index in left.values())}), used by "
          f"{sorted({h for handles in users.values() for h in handles})[:4]}...")
    print(f"users_of over them: {seconds * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
