"""Prometheus collector: reads the simulator's statistics at scrape time.

Nothing is updated per operation: a scrape takes one consistent `HypervisorStatistics`
snapshot (under the service lock), the carve-out partition computed at start-up and the
service's plain-int counters, and renders them as the metrics listed in deploy/metrics.txt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pkvm_sim.core.model import HypervisorStatistics

StatsSource = Callable[[], HypervisorStatistics]
CountsSource = Callable[[], Mapping[tuple[str, str], int]]
OpsSource = Callable[[], Mapping[str, int]]
CountSource = Callable[[], int]


class HypervisorCollector(Collector):
    """One collector for every pkvm_* metric."""

    def __init__(
        self,
        statistics: StatsSource,
        *,
        carveout_parts: Mapping[str, int],
        requests: CountsSource | None = None,
        operations: OpsSource | None = None,
        fault_failures: OpsSource | None = None,
        vms_expired: CountSource | None = None,
    ) -> None:
        self._statistics = statistics
        self._carveout_parts = dict(carveout_parts)  # part -> bytes (fixed after boot)
        self._requests = requests
        self._operations = operations
        self._fault_failures = fault_failures
        self._vms_expired = vms_expired

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the metric set depends on the pools at scrape time

    def collect(self) -> Iterable[Metric]:
        stats = self._statistics()
        yield from self._pools(stats)
        yield from self._overhead(stats)
        yield from self._host_stage2(stats)
        yield GaugeMetricFamily("pkvm_vms", "VMs currently alive.", value=stats.nr_vms)
        yield CounterMetricFamily(
            "pkvm_vms_expired", "VMs destroyed because their lease expired.",
            value=self._vms_expired() if self._vms_expired is not None else 0,
        )
        yield GaugeMetricFamily(
            "pkvm_shared_pages",
            "Pages currently shared between the host and hyp or a guest.",
            value=stats.shared_pages,
        )
        yield CounterMetricFamily(
            "pkvm_refcount_limit_hits",
            "get_page calls refused because the refcount would overflow.",
            value=stats.host_stage2.refcount_limit_hits,
        )
        yield from self._service()

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
            "pkvm_pool_alloc_failures", "Allocations that failed with ENOMEM.", labels=["pool"]
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

    def _overhead(self, stats: HypervisorStatistics) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "pkvm_vmemmap_bytes", "Modelled hyp_vmemmap size in bytes.",
            value=stats.vmemmap.modelled_bytes,
        )
        yield GaugeMetricFamily(
            "pkvm_vmemmap_bytes_per_gib", "hyp_vmemmap bytes per GiB of covered memory.",
            value=stats.vmemmap.bytes_per_gib,
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

    def _host_stage2(self, stats: HypervisorStatistics) -> Iterable[Metric]:
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
        # FATAL outcomes by kind come from the service, which sees every fault's result; the
        # core's statistics only have the total (h.fatal_faults).
        failures = CounterMetricFamily(
            "pkvm_host_s2_fault_failures", "Host stage-2 faults that could not be mapped.",
            labels=["kind"],
        )
        by_kind = dict(self._fault_failures()) if self._fault_failures else {
            "memory": h.fatal_faults, "mmio": 0
        }
        for kind in ("memory", "mmio"):
            failures.add_metric([kind], by_kind.get(kind, 0))
        yield failures

    def _service(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "pkvm_grpc_requests", "gRPC requests handled, by method and status code.",
            labels=["method", "code"],
        )
        if self._requests is not None:
            for (method, code), count in sorted(self._requests().items()):
                requests.add_metric([method, code], count)
        yield requests
        operations = CounterMetricFamily(
            "pkvm_operations", "Simulator operations performed, by operation.", labels=["op"]
        )
        if self._operations is not None:
            for op, count in self._operations().items():
                operations.add_metric([op], count)
        yield operations
