"""What one scrape reads, copied under the simulator lock in O(pools), rendered outside it.

By default the copy leaves out the per-VM pools, so neither the time under the lock nor the
series count grows with the number of VMs; `--metrics-per-vm` puts them back (O(VMs)).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import HypervisorStatistics


class ServiceCountersView(Protocol):
    """The service's plain-int counters (pkvm_sim.service.counters.ServiceCounters)."""

    fault_failures: dict[str, int]
    vms_expired: int

    def requests(self) -> dict[tuple[str, str], int]: ...

    def operations_by_name(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class MetricsSnapshot:
    statistics: HypervisorStatistics
    requests: Mapping[tuple[str, str], int]  # (method, code) -> count
    operations: Mapping[str, int]  # op -> count
    fault_failures: Mapping[str, int]  # "memory" | "mmio" -> FATAL faults
    vms_expired: int


def take_snapshot(
    hypervisor: Hypervisor, counters: ServiceCountersView | None, *, per_vm: bool
) -> MetricsSnapshot:
    """Call under the simulator lock: O(host pools + methods), O(VMs) only with `per_vm`."""
    stats = hypervisor.statistics(vm_pools=per_vm)
    if counters is None:
        return MetricsSnapshot(stats, {}, {}, {}, 0)
    return MetricsSnapshot(
        statistics=stats,
        requests=counters.requests(),
        operations=counters.operations_by_name(),
        fault_failures=dict(counters.fault_failures),
        vms_expired=counters.vms_expired,
    )


def locked_snapshot(
    lock: threading.Lock, hypervisor: Hypervisor, counters: ServiceCountersView | None,
    *, per_vm: bool,
) -> Callable[[], MetricsSnapshot]:
    """The callable a collector reads: the snapshot taken while holding `lock`."""

    def snapshot() -> MetricsSnapshot:
        with lock:
            return take_snapshot(hypervisor, counters, per_vm=per_vm)

    return snapshot
