"""Cheap service counters read by the metrics collector at scrape time.

The hot path only bumps plain ints (one short uncontended lock per request, one dict store
per operation kind and batch); the Prometheus collector turns them into samples when scraped.
"""

from __future__ import annotations

import threading

from pkvm.v1 import hypervisor_pb2 as pb2

from pkvm_sim.core.model import FaultOutcome, FaultResult

# pkvm_operations_total{op} name of every Execute operation, keyed by the BatchOp itself
# (tests/service/test_batch_tables.py checks that every BatchOp but UNSPECIFIED has one).
BATCH_OP_NAMES: dict[int, str] = {
    pb2.BATCH_OP_ALLOC_PAGES: "alloc_pages",
    pb2.BATCH_OP_PUT_PAGE: "put_page",
    pb2.BATCH_OP_GET_PAGE: "get_page",
    pb2.BATCH_OP_HOST_SHARE: "host_share",
    pb2.BATCH_OP_HOST_UNSHARE: "host_unshare",
    pb2.BATCH_OP_MAP_MMIO: "map_mmio",
    pb2.BATCH_OP_HOST_FAULT: "host_fault",
    pb2.BATCH_OP_TOPUP_MEMCACHE: "topup_memcache",
    pb2.BATCH_OP_GUEST_MAP: "guest_map",
}
# Operations only the unary RPCs perform.
UNARY_ONLY_OP_NAMES = ("create_vm", "destroy_vm", "pin_shared", "unpin_shared")
OP_NAMES: tuple[str, ...] = (*BATCH_OP_NAMES.values(), *UNARY_ONLY_OP_NAMES)


class ServiceCounters:
    """Requests by (method, code) and successful simulator operations by op name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = {}
        # Written only under the simulator lock (the service holds it around every op).
        self.operations: dict[str, int] = dict.fromkeys(OP_NAMES, 0)
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
        return dict(self.operations)
