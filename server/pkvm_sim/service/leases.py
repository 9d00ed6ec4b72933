"""VM leases: a client that disappears does not leak its VMs (docs/service.md, Sessions and leases).

Every VM holds a lease of some length. Each call authenticated on the VM's behalf renews it
(`TokenRegistry.check` calls `LeaseTable.renew`, so no RPC can forget to), RenewVM renews it
explicitly, and the `Reaper` thread has the service destroy VMs whose lease ran out. The core
knows nothing of leases: this is service bookkeeping, on `time.monotonic`.

Threading: `grant` and `drop` run under the simulator lock (with the VM's creation or
destruction); `renew` runs lock-free on every authenticated call and costs one dict lookup
and one dict store. A renewal racing the VM's destruction can leave a stale deadline; the
reaper only destroys a handle that is still a live VM and drops stale entries.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable

import grpc

from pkvm_sim.settings import DEFAULT_LEASE_SECONDS, DEFAULT_MAX_LEASE_SECONDS

from .errors import ServiceError

__all__ = ["DEFAULT_LEASE_SECONDS", "DEFAULT_MAX_LEASE_SECONDS", "LeaseTable", "Reaper",
           "check_interval"]

log = logging.getLogger(__name__)
MAX_CHECK_INTERVAL = 1.0
# The shortest lease: below it the reaper (which looks every quarter lease) would spin, and
# a client could not make a call before its VM expired.
MIN_LEASE_SECONDS = 0.1


class LeaseTable:
    """handle -> lease length and deadline. `default_seconds == 0` disables leases: VMs get
    no lease and live until destroyed."""

    def __init__(
        self,
        default_seconds: float = DEFAULT_LEASE_SECONDS,
        max_seconds: float = DEFAULT_MAX_LEASE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("vm lease", default_seconds), ("max vm lease", max_seconds)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} seconds must be finite and >= 0, not {value}")
        if 0 < default_seconds < MIN_LEASE_SECONDS:
            raise ValueError(f"the default vm lease must be 0 (none) or >= {MIN_LEASE_SECONDS}"
                             f" s, not {default_seconds}")
        if default_seconds > max_seconds:
            raise ValueError(
                f"the default vm lease ({default_seconds} s) exceeds the maximum "
                f"({max_seconds} s)"
            )
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds
        self.clock = clock
        self._durations: dict[int, float] = {}
        self._deadlines: dict[int, float] = {}

    @property
    def enabled(self) -> bool:
        return self.default_seconds > 0

    def validate(self, requested: float) -> float:
        """The lease a CreateVM asking for `requested` seconds gets (0 = no lease); raises
        INVALID_ARGUMENT for a negative, non-finite or too long request."""
        if not math.isfinite(requested) or requested < 0:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "BAD_LEASE",
                f"lease_seconds must be finite and >= 0, not {requested}",
            )
        if 0 < requested < MIN_LEASE_SECONDS:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "LEASE_TOO_SHORT",
                f"lease_seconds must be 0 (the default) or >= {MIN_LEASE_SECONDS}, not "
                f"{requested}",
            )
        if requested > self.max_seconds:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "LEASE_TOO_LONG",
                f"lease_seconds {requested} exceeds the server's maximum {self.max_seconds}",
            )
        if not self.enabled:
            return 0.0
        return requested or self.default_seconds

    def grant(self, handle: int, seconds: float) -> None:
        """Start VM `handle`'s lease of `seconds` (a `validate` result; 0 = no lease)."""
        if seconds > 0:
            self._durations[handle] = seconds
            self._deadlines[handle] = self.clock() + seconds
        else:
            self.drop(handle)

    def state(self) -> list[tuple[int, float, float]]:
        """(handle, lease seconds, seconds left) of every lease, in grant order: what a
        state file keeps (seconds left, not deadlines: the clock restarts with the server)."""
        now = self.clock()
        return [(handle, duration, max(0.0, self._deadlines.get(handle, now) - now))
                for handle, duration in self._durations.items()]

    def restore(self, leases: Iterable[tuple[int, float, float]]) -> None:
        """Take back `state()`'s leases, each running for its seconds left from now."""
        now = self.clock()
        for handle, duration, left in leases:
            self._durations[handle] = duration
            self._deadlines[handle] = now + left

    def renew(self, handle: int) -> None:
        duration = self._durations.get(handle)
        if duration is not None:  # None: the VM has no lease (or is gone)
            self._deadlines[handle] = self.clock() + duration

    def drop(self, handle: int) -> None:
        self._durations.pop(handle, None)
        self._deadlines.pop(handle, None)

    def lease_seconds(self, handle: int) -> float:
        """The VM's lease length; 0 when it has none."""
        return self._durations.get(handle, 0.0)

    def expires_in(self, handle: int) -> float:
        """Seconds left on the VM's lease (never negative); 0 when it has none."""
        deadline = self._deadlines.get(handle)
        return 0.0 if deadline is None else max(0.0, deadline - self.clock())

    def is_expired(self, handle: int, now: float | None = None) -> bool:
        deadline = self._deadlines.get(handle)
        now = self.clock() if now is None else now
        return deadline is not None and deadline <= now

    def expired(self, now: float | None = None) -> list[int]:
        """Handles whose lease has run out, oldest deadline first."""
        now = self.clock() if now is None else now
        deadlines = self._deadlines.copy()  # atomic; renewals may run meanwhile
        return sorted(
            (h for h, deadline in deadlines.items() if deadline <= now), key=deadlines.__getitem__
        )

    def __len__(self) -> int:
        return len(self._deadlines)


def check_interval(default_seconds: float, interval: float | None = None) -> float:
    """How often the reaper looks: `interval` if given, else once a second or a quarter of
    the default lease, whichever is shorter."""
    if interval is not None:
        if not math.isfinite(interval) or interval <= 0:
            raise ValueError(f"the lease check interval must be > 0, not {interval}")
        return interval
    if default_seconds <= 0:
        return MAX_CHECK_INTERVAL
    return min(MAX_CHECK_INTERVAL, default_seconds / 4)


class Reaper:
    """A daemon thread that calls `reap()` every `interval` seconds until `stop()`."""

    def __init__(self, reap: Callable[[], object], interval: float) -> None:
        self._reap = reap
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pkvm-lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._reap()
            except Exception:  # keep reaping: one bad pass must not leak every later VM
                log.exception("lease reaper pass failed")

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
