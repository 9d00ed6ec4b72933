"""Cheap service counters read by the metrics collector at scrape time.

The hot path only bumps plain ints (one short uncontended lock per request, one list index
per operation); the Prometheus collector turns them into samples when scraped.
"""

from __future__ import annotations

import threading

from pkvm_sim.core.model import FaultOutcome, FaultResult

# Operation names for pkvm_operations_total{op}; indices 1..9 equal the BatchOp values.
OP_NAMES: tuple[str, ...] = (
    "unspecified",
    "alloc_pages",
    "put_page",
    "get_page",
    "host_share",
    "host_unshare",
    "map_mmio",
    "host_fault",
    "topup_memcache",
    "guest_map",
    "create_vm",
    "destroy_vm",
    "pin_shared",
    "unpin_shared",
)
OP_INDEX = {name: index for index, name in enumerate(OP_NAMES)}


class ServiceCounters:
    """Requests by (method, code) and successful simulator operations by op."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        # Written only under the simulator lock (the service holds it around every op).
        self.operations: list[int] = [0] * len(OP_NAMES)
        # Host stage-2 faults with a FATAL outcome, by kind ("memory", "mmio"): the core's
        # statistics count them without the kind, and every fault passes through here.
        self.fault_failures: dict[str, int] = {"memory": 0, "mmio": 0}
        # VMs the lease reaper destroyed (written under the simulator lock).
        self.vms_expired = 0

    def count_fault(self, result: FaultResult) -> None:
        """Call under the simulator lock with every host fault's result."""
        if result.outcome is FaultOutcome.FATAL:
            self.fault_failures["memory" if result.is_memory else "mmio"] += 1

    def count_request(self, method: str, code: str) -> None:
        key = (method, code)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def requests(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._requests)

    def operations_by_name(self) -> dict[str, int]:
        counts = zip(OP_NAMES, list(self.operations), strict=True)
        return {name: n for name, n in counts if name != "unspecified"}
