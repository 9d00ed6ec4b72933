"""Prometheus collector: renders a snapshot of the simulator taken at scrape time.

Nothing is updated per operation. A scrape calls the `snapshot` callable once (it copies the
figures under the simulator lock in O(pools), see snapshot.py) and renders the copy outside
the lock as the metrics listed in deploy/metrics.txt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.layout import LAYOUTS
from pkvm_sim.core.model import HypervisorStatistics

from .fragmentation import largest_free_order, unusable_free_index
from .snapshot import MetricsSnapshot

SnapshotSource = Callable[[], MetricsSnapshot]


@dataclass(frozen=True)
class SimInfo:
    """pkvm_sim_info's labels: fixed for the life of the process."""

    version: str
    profile: str
    layout: str
    page_size: str
    coverage: str
    core: str  # "compiled" (mypyc) or "pure" (pkvm_sim.core.CORE_FLAVOUR)

    @classmethod
    def of(cls, config: SimConfig) -> SimInfo:
        from pkvm_sim.core import CORE_FLAVOUR
        from pkvm_sim.version import package_version

        return cls(
            version=package_version(),
            profile=str(config.profile),
            layout=config.layout.name,
            page_size=str(config.page_size),
            coverage=config.vmemmap_coverage,
            core=CORE_FLAVOUR,
        )


class HypervisorCollector(Collector):
    """One collector for every pkvm_* metric."""

    def __init__(
        self,
        snapshot: SnapshotSource,
        *,
        carveout_parts: Mapping[str, int],
        info: SimInfo | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._carveout_parts = dict(carveout_parts)  # part -> bytes (fixed after boot)
        self._info = info

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the metric set depends on the pools at scrape time

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()  # the only step under the simulator lock
        stats = snap.statistics
        yield from self._info_metric()
        yield from self._pools(stats)
        yield from self._fragmentation(stats)
        yield from self._overhead(stats)
        yield from self._host_stage2(stats, snap.fault_failures)
        yield GaugeMetricFamily("pkvm_vms", "VMs currently alive.", value=stats.nr_vms)
        yield CounterMetricFamily(
            "pkvm_vms_expired", "VMs destroyed because their lease expired.",
            value=snap.vms_expired,
        )
        yield GaugeMetricFamily(
            "pkvm_shared_pages",
            "Pages currently shared between the host and hyp or a guest.",
            value=stats.shared_pages,
        )
        yield CounterMetricFamily(
            "pkvm_refcount_limit_hits",
            "Stage-2 table entries refused because the table page's hyp_page refcount was "
            "at its limit.",
            value=stats.host_stage2.refcount_limit_hits,
        )
        yield from self._service(snap)

    def _info_metric(self) -> Iterable[Metric]:
        if self._info is None:
            return
        info = self._info
        family = GaugeMetricFamily(
            "pkvm_sim_info", "The simulator's version and configuration (value 1).",
            labels=["version", "profile", "layout", "page_size", "coverage", "core"],
        )
        family.add_metric(
            [info.version, info.profile, info.layout, info.page_size, info.coverage, info.core],
            1,
        )
        yield family

    def _pools(self, stats: HypervisorStatistics) -> Iterable[Metric]:
        pages = GaugeMetricFamily("pkvm_pool_pages", "Pool size in pages.", labels=["pool"])
        free = GaugeMetricFamily(
            "pkvm_pool_free_pages", "Pages on the pool's free lists.", labels=["pool"]
        )
        allocated = GaugeMetricFamily(
            "pkvm_pool_allocated_pages", "Pages handed out by the pool (refcount > 0).",
            labels=["pool"],
        )
        reserved = GaugeMetricFamily(
            "pkvm_pool_reserved_pages",
            "Pages reserved at hyp_pool_init (never on a free list).", labels=["pool"],
        )
        blocks = GaugeMetricFamily(
            "pkvm_pool_free_blocks", "Free blocks of each order (fragmentation).",
            labels=["pool", "order"],
        )
        failures = CounterMetricFamily(
            "pkvm_pool_alloc_failures",
            "Allocations the pool refused with ENOMEM, expected ones included (a request "
            "for more than a drained pool holds; host stage-2 running dry before an MMIO "
            "recycle).",
            labels=["pool"],
        )
        for pool in stats.pools:
            labels = [pool.name]
            pages.add_metric(labels, pool.total_pages)
            free.add_metric(labels, pool.free_pages)
            allocated.add_metric(labels, pool.allocated_pages)
            reserved.add_metric(labels, pool.reserved_pages)
            failures.add_metric(labels, pool.alloc_failures)
            for order, count in enumerate(pool.free_blocks_per_order):
                blocks.add_metric([pool.name, str(order)], count)
        return (pages, free, allocated, reserved, blocks, failures)

    def _fragmentation(self, stats: HypervisorStatistics) -> Iterable[Metric]:
        unusable = GaugeMetricFamily(
            "pkvm_pool_unusable_free_index",
            "Share of free pages in blocks too small for an allocation of this order "
            "(0: none, 1: all; mm/vmstat.c unusable_free_index).",
            labels=["pool", "order"],
        )
        largest = GaugeMetricFamily(
            "pkvm_pool_largest_free_order",
            "Highest order with a free block (-1: no free block).", labels=["pool"],
        )
        for pool in stats.pools:
            blocks = pool.free_blocks_per_order
            largest.add_metric([pool.name], largest_free_order(blocks))
            for order in range(len(blocks)):
                unusable.add_metric([pool.name, str(order)], unusable_free_index(blocks, order))
        return (unusable, largest)

    def _overhead(self, stats: HypervisorStatistics) -> Iterable[Metric]:
        vmemmap = stats.vmemmap
        yield GaugeMetricFamily(
            "pkvm_vmemmap_bytes", "Modelled hyp_vmemmap size in bytes.",
            value=vmemmap.modelled_bytes,
        )
        per_layout = GaugeMetricFamily(
            "pkvm_vmemmap_layout_bytes",
            "hyp_vmemmap bytes the covered memory would cost with each struct hyp_page layout "
            "(the running one is pkvm_sim_info's layout).",
            labels=["layout"],
        )
        for name, layout in LAYOUTS.items():
            per_layout.add_metric([name], vmemmap.covered_pages * layout.entry_bytes)
        yield per_layout
        yield GaugeMetricFamily(
            "pkvm_vmemmap_bytes_per_gib", "hyp_vmemmap bytes per GiB of covered memory.",
            value=vmemmap.bytes_per_gib,
        )
        parts = GaugeMetricFamily(
            "pkvm_carveout_bytes", "Bytes of the hyp carve-out per part.", labels=["part"]
        )
        for part, size in self._carveout_parts.items():
            parts.add_metric([part], size)
        yield parts
        yield GaugeMetricFamily(
            "pkvm_hyp_mem_pages", "Pages in the hyp carve-out (hyp_mem_pages).",
            value=stats.hyp_mem_pages,
        )

    def _host_stage2(
        self, stats: HypervisorStatistics, fault_failures: Mapping[str, int]
    ) -> Iterable[Metric]:
        h = stats.host_stage2
        yield CounterMetricFamily(
            "pkvm_host_s2_mmio_recycles",
            "Times host stage-2 MMIO mappings were recycled to free pool pages.",
            value=h.mmio_recycles,
        )
        yield CounterMetricFamily(
            "pkvm_host_s2_mmio_recycled_pages",
            "Page-table pages returned to the pool by MMIO recycling.",
            value=h.mmio_recycled_pages,
        )
        faults = CounterMetricFamily(
            "pkvm_host_s2_faults", "Host stage-2 faults handled.", labels=["kind"]
        )
        faults.add_metric(["memory"], h.faults_memory)
        faults.add_metric(["mmio"], h.faults_mmio)
        yield faults
        yield CounterMetricFamily(
            "pkvm_host_s2_spurious_faults",
            "Host stage-2 faults on an address already mapped identically (-EAGAIN).",
            value=h.spurious_faults,
        )
        yield CounterMetricFamily(
            "pkvm_host_s2_map_failures",
            "Host stage-2 faults still out of page-table pages after recycling MMIO "
            "mappings: the allocation failures nobody asked for.",
            value=h.map_failures,
        )
        # FATAL outcomes by kind come from the service, which sees every fault's result; the
        # core's statistics only have the total (h.fatal_faults).
        failures = CounterMetricFamily(
            "pkvm_host_s2_fault_failures", "Host stage-2 faults that could not be mapped.",
            labels=["kind"],
        )
        by_kind = dict(fault_failures) or {"memory": h.fatal_faults, "mmio": 0}
        for kind in ("memory", "mmio"):
            failures.add_metric([kind], by_kind.get(kind, 0))
        yield failures

    def _service(self, snap: MetricsSnapshot) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "pkvm_grpc_requests", "gRPC requests handled, by method and status code.",
            labels=["method", "code"],
        )
        for (method, code), count in sorted(snap.requests.items()):
            requests.add_metric([method, code], count)
        yield requests
        operations = CounterMetricFamily(
            "pkvm_operations", "Simulator operations performed, by operation.", labels=["op"]
        )
        for op, count in snap.operations.items():
            operations.add_metric([op], count)
        yield operations
