"""Fair shares of the simulator lock between tenants, whatever the shape of their work.

Every piece of work that holds the simulator lock for a client (a unary call's operation,
a chunk of a batch) is a job of a tenant: the client's connection (`context.peer()`), so
all the streams and calls one client multiplexes on its channel are one tenant. Jobs run
one at a time on one worker thread, which always picks the waiting tenant that used the
lock least recently (usage decays with a half-life of `HALF_LIFE_S`); a tenant's own jobs
run in order. The event loop never runs them (but see below), so it is always free to take
in new calls, and a light tenant's job waits for at most the one job that is running, not
for the queue: one long batch, many small batches, or a flood of unary calls from others
all look the same to it.

The fast path: when nothing is running or waiting, a light tenant's job (one that used
less than `INLINE_MAX_USAGE_S` of lock time lately) runs at once on the loop, with no
thread handoff, unless the loop ran one less than `INLINE_PAUSE` times that job's duration
ago. So a light client pays nothing, a heavy one always queues (its jobs never hold the
loop), and a burst of arrivals puts at most one job on the loop before the rest queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

HALF_LIFE_S = 1.0
INLINE_PAUSE = 4.0
INLINE_MAX_USAGE_S = 0.005  # a tenant that used more lock time recently always queues

Job = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class FairLock:
    """Runs `fn()` under `lock` for a tenant, scheduled fairly (module docstring)."""

    def __init__(self, lock: threading.Lock, *, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.lock = lock
        self.clock = clock
        self.inline_jobs = 0
        self.queued_jobs = 0
        self._state = threading.Condition(threading.Lock())  # guards everything below
        self._queues: dict[str, collections.deque[Job]] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # tenant -> (seconds, as of when)
        self._waiting = 0
        self._running = False
        self._inline_ok_at = 0.0  # clock time after which the loop may run a job again
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="pkvm-fair", daemon=True)
        self._worker.start()

    async def run(self, tenant: str, fn: Callable[[], T]) -> T:
        """fn()'s result (or exception), run under the lock in the tenant's turn."""
        with self._state:
            now = self.clock()
            inline = not self._running and not self._waiting and now >= self._inline_ok_at \
                and self._decayed(tenant, now) < INLINE_MAX_USAGE_S
            if inline:
                self._running = True
        if inline:
            return self._run_inline(tenant, fn)
        return await self.submit(tenant, fn)

    def submit(self, tenant: str, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue fn for the worker; the future completes on the caller's loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._state:
            if self._closed:
                raise RuntimeError("the server is stopping")
            self._queues.setdefault(tenant, collections.deque()).append((fn, future))
            self._waiting += 1
            self.queued_jobs += 1
            self._state.notify()
        return future

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify()

    def _run_inline(self, tenant: str, fn: Callable[[], T]) -> T:
        started = self.clock()
        try:
            with self.lock:
                return fn()
        finally:
            ended = self.clock()
            with self._state:
                self._running = False
                self._charge(tenant, ended - started, ended)
                self._inline_ok_at = ended + INLINE_PAUSE * (ended - started)
                self.inline_jobs += 1
                if self._waiting:
                    self._state.notify()

    def _charge(self, tenant: str, seconds: float, now: float) -> None:
        """Add lock time to the tenant's decayed usage (under _state)."""
        self._usage[tenant] = (self._decayed(tenant, now) + seconds, now)

    def _decayed(self, tenant: str, now: float) -> float:
        used, at = self._usage.get(tenant, (0.0, now))
        return used * math.exp2(-(now - at) / HALF_LIFE_S)

    def _next_job(self) -> tuple[str, Job] | None:
        """The oldest job of the waiting tenant with the least usage (under _state); None
        once closed."""
        while not self._waiting or self._running:
            if self._closed:
                return None
            self._state.wait()
        now = self.clock()
        tenant = min((t for t, queue in self._queues.items() if queue),
                     key=lambda t: self._decayed(t, now))
        queue = self._queues[tenant]
        job = queue.popleft()
        if not queue:
            del self._queues[tenant]
        self._waiting -= 1
        self._running = True
        return tenant, job

    def _work(self) -> None:
        while True:
            with self._state:
                picked = self._next_job()
                if picked is None:
                    return
            tenant, (fn, future) = picked
            if future.cancelled():  # its caller went away while it waited: do not run it
                with self._state:
                    self._running = False
                continue
            started = self.clock()
            outcome: tuple[bool, Any]
            try:
                with self.lock:
                    outcome = (True, fn())
            except BaseException as error:  # noqa: BLE001 (handed to the caller)
                outcome = (False, error)
            ended = self.clock()
            with self._state:
                self._running = False
                self._charge(tenant, ended - started, ended)
                self._forget_idle(ended)
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                future.get_loop().call_soon_threadsafe(_settle, future, outcome)

    def _forget_idle(self, now: float) -> None:
        """Drop tenants whose usage decayed to nothing (keeps the table small)."""
        if len(self._usage) > 1024:
            for tenant in [t for t in self._usage
                           if t not in self._queues and self._decayed(t, now) < 1e-6]:
                del self._usage[tenant]


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
