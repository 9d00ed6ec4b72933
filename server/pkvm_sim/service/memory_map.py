"""GetMemoryMap: where RAM, the carve-out and each pool's free blocks are (for pictures).

Built under the simulator lock: O(memblocks + carve-out regions + free blocks of the pools
asked for). At most MAX_POOLS pools per call.
"""

from __future__ import annotations

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hyp_pool import HypPool
from pkvm_sim.core.hypervisor import Hypervisor

from .errors import ServiceError

MAX_POOLS = 16


def pool_map(pool: HypPool) -> pb2.PoolMap:
    blocks = sorted(
        (pfn, order) for order, heads in pool.free_lists().items() for pfn in heads
    )
    stats = pool.statistics()
    return pb2.PoolMap(
        name=pool.name, base_pfn=pool.base_pfn, nr_pages=stats.nr_pages,
        reserved_pages=stats.reserved_pages, admitted_pages=stats.admitted_pages,
        free_block_pfns=[pfn for pfn, _ in blocks],
        free_block_orders=[order for _, order in blocks],
    )


def memory_map_message(
    hypervisor: Hypervisor, config: SimConfig, reserve: pb2.ReserveResponse,
    pool_names: list[str],
) -> pb2.GetMemoryMapResponse:
    """Runs under the simulator lock (the servicer's unary handler holds it)."""
    if len(pool_names) > MAX_POOLS:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_POOLS",
                           f"at most {MAX_POOLS} pools per call")
    pools = {pool.name: pool for pool in hypervisor.pools()}
    if not pool_names:
        pool_names = [hypervisor.hyp_pool.name, *(p.name for p in hypervisor.host_pools)]
    unknown = [name for name in pool_names if name not in pools]
    if unknown:
        raise ServiceError(grpc.StatusCode.NOT_FOUND, "NO_SUCH_POOL",
                           f"no pool named {unknown[0][:64]!r}")
    return pb2.GetMemoryMapResponse(
        page_size=config.page_size,
        memblocks=[pb2.MemoryRegion(base=m.base, size=m.size) for m in config.memblocks],
        carveout_base=reserve.carveout_base,
        carveout_bytes=reserve.reserved_bytes,
        carveout=list(reserve.regions),
        pools=[pool_map(pools[name]) for name in pool_names],
    )
