"""What the hyp pool quota now holds against shares, and what planning a share costs
(issue 20, item 15).

    python bench/bench_caps.py [--vms 4] [--regions 300] [--pairs 200]

Two `pkvm-sim serve --profile v6.12` processes, one with `--quota-hyp-pages 256` (the
default) and one with `--quota-hyp-pages 0` (no quota, the tables then go uncounted as they
all did before the charge). In each:

- `--vms` VMs each share one page in each of `--regions` fresh 2 MiB regions of their slice
  (each such share makes EL2 take a stage-1 table from the hyp pool), stopping at the first
  refusal; printed: the hyp pool pages each VM's creation and shares took (GetStats, before
  and after; the quota holds both) and the pool's free pages left;
- then one VM on each server times `--pairs` unary 256-page HostShare + HostUnshare pairs,
  the two servers in turn (so both see the same machine load); the share is planned against
  the quota on the first server only. Printed: p50 per server and their ratio.
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


def fill_regions(stub: pb2_grpc.HypervisorServiceStub,
                 regions: int) -> tuple[int, int, str]:
    """One VM shares a page per fresh 2 MiB region: (hyp pool pages its creation took, pages
    its shares took, how it ended). Both are charged to the VM."""
    before_create = hyp_free(stub)
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
    return before_create - before, before - hyp_free(stub), ended


class SharingVm:
    """A VM that times 256-page HostShare + HostUnshare pairs."""

    def __init__(self, stub: pb2_grpc.HypervisorServiceStub) -> None:
        created = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=256), timeout=60)
        self.stub, self.vm, self.metadata = stub, created.vm, bearer(created.token)

    def pair(self) -> float:
        handle, pfn = self.vm.handle, self.vm.slice_base_pfn
        start = time.perf_counter()
        self.stub.HostShare(pb2.HostShareRequest(handle=handle, pfn=pfn, nr_pages=256),
                            metadata=self.metadata, timeout=60)
        self.stub.HostUnshare(pb2.HostUnshareRequest(handle=handle, pfn=pfn, nr_pages=256),
                              metadata=self.metadata, timeout=60)
        return time.perf_counter() - start


def fill(quota: int, stub: pb2_grpc.HypervisorServiceStub, args: argparse.Namespace) -> None:
    print(f"--quota-hyp-pages {quota}: hyp pool {hyp_free(stub)} pages free")
    for index in range(args.vms):
        creation, shares, ended = fill_regions(stub, args.regions)
        print(f"  VM {index}: its creation took {creation} and its shares {shares} hyp pool"
              f" pages, {creation + shares} in all ({ended}); pool free {hyp_free(stub)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--regions", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=200)
    args = parser.parse_args()
    quotas = (256, 0)
    servers = [start_server("--profile", "v6.12", "--quota-hyp-pages", str(quota),
                            "--quota-slice-pages", "0") for quota in quotas]
    channels = [grpc.insecure_channel(target) for _process, target in servers]
    try:
        stubs = [pb2_grpc.HypervisorServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
        for quota, stub in zip(quotas, stubs, strict=True):
            fill(quota, stub, args)
        sharers = [SharingVm(stub) for stub in stubs]
        latencies: list[list[float]] = [[], []]
        for _ in range(args.pairs):  # interleaved: both see the same machine load
            for index, sharer in enumerate(sharers):
                latencies[index].append(sharer.pair())
        p50s = [summary(each)["p50_ms"] for each in latencies]
        for quota, p50 in zip(quotas, p50s, strict=True):
            print(f"256-page share+unshare pair, --quota-hyp-pages {quota}: p50 {p50:.2f} ms")
        print(f"share+unshare p50 with the quota / without: {p50s[0] / p50s[1]:.2f}")
    finally:
        for channel in channels:
            channel.close()
        for process, _target in servers:
            stop_server(process)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
