"""What the hyp pool quota now holds against shares, and what planning a share costs
(issue 20, item 15).

    python bench/bench_caps.py [--vms 4] [--regions 300] [--pairs 200]

Two `pkvm-sim serve --profile v6.12` processes, one with `--quota-hyp-pages 256` (the
default) and one with `--quota-hyp-pages 0` (no quota, the tables then go uncounted as they
all did before the charge). In each:

- `--vms` VMs each share one page in each of `--regions` fresh 2 MiB regions of their slice
  (each such share makes EL2 take a stage-1 table from the hyp pool), stopping at the first
  refusal; printed: the hyp pool pages each VM's shares took (GetStats, before and after)
  and the pool's free pages left;
- one VM times `--pairs` unary 256-page HostShare + HostUnshare pairs (the share is planned
  against the quota with the quota, not without): p50 per server and the ratio of the two
  in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from bench_tenancy import bearer, start_server, stop_server, summary
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
LEAF_TABLE_SPAN_PAGES = 512  # 4K pages: one leaf table maps 2 MiB


def hyp_free(stub: pb2_grpc.HypervisorServiceStub) -> int:
    stats = stub.GetStats(pb2.GetStatsRequest(), timeout=60)
    return next(int(pool.free_pages) for pool in stats.pools if pool.name == "hyp")


def fill_regions(stub: pb2_grpc.HypervisorServiceStub, regions: int) -> tuple[int, str]:
    """One VM shares a page per fresh 2 MiB region: (hyp pool pages taken, how it ended)."""
    created = stub.CreateVM(pb2.CreateVMRequest(
        nr_vcpus=1, slice_pages=regions * LEAF_TABLE_SPAN_PAGES), timeout=60)
    vm, metadata = created.vm, bearer(created.token)
    before = hyp_free(stub)
    ended = f"all {regions} shared"
    for region in range(regions):
        pfn = vm.slice_base_pfn + region * LEAF_TABLE_SPAN_PAGES
        try:
            stub.HostShare(pb2.HostShareRequest(handle=vm.handle, pfn=pfn), metadata=metadata,
                           timeout=60)
        except grpc.RpcError as error:
            ended = f"refused after {region}: {error.code().name} {(error.details() or '')[:60]}"
            break
    return before - hyp_free(stub), ended


def share_pairs(stub: pb2_grpc.HypervisorServiceStub, pairs: int) -> list[float]:
    created = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=256), timeout=60)
    vm, metadata = created.vm, bearer(created.token)
    latencies = []
    for _ in range(pairs):
        start = time.perf_counter()
        stub.HostShare(pb2.HostShareRequest(handle=vm.handle, pfn=vm.slice_base_pfn,
                                            nr_pages=256), metadata=metadata, timeout=60)
        stub.HostUnshare(pb2.HostUnshareRequest(handle=vm.handle, pfn=vm.slice_base_pfn,
                                                nr_pages=256), metadata=metadata, timeout=60)
        latencies.append(time.perf_counter() - start)
    return latencies


def run(quota: int, args: argparse.Namespace) -> float:
    process, target = start_server("--profile", "v6.12", "--quota-hyp-pages", str(quota),
                                   "--quota-slice-pages", "0")
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb2_grpc.HypervisorServiceStub(channel)  # type: ignore[no-untyped-call]
            print(f"--quota-hyp-pages {quota}: hyp pool {hyp_free(stub)} pages free")
            for index in range(args.vms):
                taken, ended = fill_regions(stub, args.regions)
                print(f"  VM {index}: its shares took {taken} hyp pool pages ({ended}); "
                      f"pool free {hyp_free(stub)}")
            p50 = summary(share_pairs(stub, args.pairs))["p50_ms"]
            print(f"  256-page share+unshare pair: p50 {p50:.2f} ms")
            return p50
    finally:
        stop_server(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--regions", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    with_quota = run(256, args)
    without = run(0, args)
    print(f"share+unshare p50 with the quota / without: {with_quota / without:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
