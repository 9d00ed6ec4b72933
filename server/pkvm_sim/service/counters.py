"""Cheap service counters read by the metrics collector at scrape time.

The hot path only bumps plain ints (one dict store per request, per operation kind and per
batch, all on the event loop); the Prometheus collector turns them into samples when scraped.
"""

from __future__ import annotations

from collections.abc import Mapping

from pkvm_sim.core.model import FaultOutcome, FaultResult

from .operations import BY_BATCH_OP, OPERATION_NAMES

# pkvm_operations_total{op}: the names of the operation records (service/operations.py);
# BATCH_OP_NAMES those Execute runs, keyed by BatchOp.
BATCH_OP_NAMES: dict[int, str] = {
    op: operation.counted for op, operation in BY_BATCH_OP.items()
    if operation.counted is not None
}
OP_NAMES: tuple[str, ...] = OPERATION_NAMES


class ServiceCounters:
    """Requests by (method, code) and successful simulator operations by op name."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str], int] = {}
        # Written only under the simulator lock: by a unary call's job, and by each chunk of
        # a batch for its own ops (BatchRun.count_into). Two threads write it (the loop's
        # inline jobs, the fair worker), so a write outside the lock could be lost.
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
        """Call on the event loop: the only writer, so no lock (a scrape's dict copy runs in
        C under the GIL, and sees each count whole)."""
        key = (method, code)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1

    def restore_requests(self, requests: Mapping[tuple[str, str], int]) -> None:
        """Take back a state file's request counts (before the first call is served)."""
        self._requests.update(requests)

    def requests(self) -> dict[tuple[str, str], int]:
        return self._requests.copy()

    def operations_by_name(self) -> dict[str, int]:
        return dict(self.operations)
