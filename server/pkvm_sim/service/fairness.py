"""Fair shares of the simulator lock between tenants, whatever the shape of their work.

Every piece of work that holds the simulator lock for a client (a unary call's operation,
a chunk of a batch) is a job of a tenant: the client's connection (`context.peer()`), so
all the streams and calls one client multiplexes on its channel are one tenant. Jobs run
one at a time. Queued jobs run on one worker thread, which always picks the waiting tenant
that used the lock least recently (usage decays with a half-life of `HALF_LIFE_S`); a
tenant's own jobs run in order. So a light tenant's job waits for at most the one job that
is running, not for the queue: one long batch, many small batches, or a flood of unary
calls from others all look the same to it.

Two rules keep the event loop, which takes every call in and answers it, from being starved
by core work:

- The worker gives the loop a turn: once it has held the lock for `LOOP_TURN_EVERY_S`
  since the loop's last turn, or after every job while two tenants contend, it waits
  (without the lock, without the GIL) until the loop has run `LOOP_TURN_ITERATIONS`
  iterations before it picks the next job. The turn after every job lets the answer of a
  light tenant's job, and the steps of its next call, run before the next job of a flood.
  Without turns, a worker with a full queue hands the interpreter to the loop only for a
  switch interval between two jobs (a compiled core does not give the GIL up inside a
  job), so another tenant's call crawls through its steps (read, decode, check, submit,
  answer) one slice per job of the flood.
- The fast path runs a job at once on the loop, with no thread handoff, only when nothing
  runs or waits, the tenant's recent jobs were cheap (`INLINE_MAX_JOB_S`, a decaying peak of
  its job durations), and the loop has inline credit: it earns `INLINE_SHARE` of wall time
  up to `INLINE_BURST_S`, and spends what its inline jobs take. So a flood of cheap calls
  runs on the loop (a unary call costs no more than an echo's), while the loop never spends
  more than a burst plus one job at a time on core work, and a tenant with heavy jobs
  queues, unless it is alone: when no other tenant used the lock in the last HALF_LIFE_S
  (and none is queued), its jobs run on the loop whatever they cost, without spending
  credit. Nobody waits for the lock then, the loop still reads new calls between two jobs
  (the first one from another tenant ends the solitude), and a long batch's later chunks
  go to the worker as always (`submit`).

The loop itself is shared too: it runs ready steps first come, first served, and each call
takes a few (read, decode, check, submit, answer). A tenant with many calls in flight on
its connection (16 Execute streams, 8 threads of unary calls) would keep a step of each
ready ahead of another tenant's every step. `TenantGate` lets one call or batch of a tenant
at a time past it (`servicer.GATE_PER_TENANT`); the tenant's others wait before any work, a
stream before it reads its next batch (HTTP/2 flow control then holds the client back at
no cost to the server). A batch leaves the gate after its first chunk, so a long batch
does not hold up its tenant's other calls for longer than a chunk. The gate holds a tenant
back only while another tenant is about (inside the gate, waiting at it, or seen at it in
the last HALF_LIFE_S): alone, a tenant's calls pass at once, since one at a time would only
cost it its pipelining (bench/bench_service.py: unary 0.79-0.83x of echo gated, 0.88-0.90x
not, same session).

While the worker has work and two tenants or more contend (both queued, or both served in
the last HALF_LIFE_S), the interpreter's switch interval is `BUSY_SWITCH_INTERVAL_S` (0.2 ms
instead of Python's 5 ms), so the loop thread gets the GIL back quickly from the worker
between jobs and from gRPC's poller thread, and another tenant's call is read meanwhile.
Otherwise it stays what it was: the frequent hand-offs cost a unary call half its
throughput when there is nobody to share with.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

HALF_LIFE_S = 1.0  # of a tenant's lock usage, which orders the waiting tenants
INLINE_MAX_JOB_S = 0.0005  # a tenant whose recent jobs took longer always queues
JOB_COST_DECAY = 0.5  # the predicted cost after a job: max(its duration, this x the former)
INLINE_SHARE = 0.25  # the share of wall time the loop may spend on inline jobs
INLINE_BURST_S = 0.002  # the most inline credit the loop can save up
LOOP_TURN_EVERY_S = 0.002  # the worker's lock time between two turns of the loop
LOOP_TURN_ITERATIONS = 3  # a turn: enough for a new call to reach the queue
LOOP_TURN_TIMEOUT_S = 0.1  # a loop that does not come round (stopping) is not waited for
BUSY_SWITCH_INTERVAL_S = 0.0002  # the switch interval while SHORT_SWITCH_INTERVAL is held
CONTENTION_RECHECK_S = 0.01  # how often the worker counts the tenants of the last HALF_LIFE_S
# What it goes back to once nobody holds it: the process's interval when this module was
# imported.
IDLE_SWITCH_INTERVAL_S = sys.getswitchinterval()


class Queue(enum.Enum):
    """What `FairLock.run_now` answers when the job must be queued instead."""

    JOB = "queue the job"


Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]  # fn, args, future


class SwitchInterval:
    """The interpreter's switch interval, shared by whoever needs it short: it is
    BUSY_SWITCH_INTERVAL_S while one holder or more hold it, IDLE_SWITCH_INTERVAL_S
    otherwise. Holders: the fair worker while tenants contend, and Python work on other
    threads that runs for milliseconds (a GetStats message with 1000 VMs), so that the loop
    thread waits for the GIL at most the short interval meanwhile. Thread-safe."""

    def __init__(self) -> None:
        self._holders = 0
        self._guard = threading.Lock()

    def hold(self) -> None:
        with self._guard:
            self._holders += 1
            if self._holders == 1:
                sys.setswitchinterval(BUSY_SWITCH_INTERVAL_S)

    def release(self) -> None:
        with self._guard:
            self._holders -= 1
            if self._holders == 0:
                sys.setswitchinterval(IDLE_SWITCH_INTERVAL_S)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.hold()
        try:
            yield
        finally:
            self.release()


SHORT_SWITCH_INTERVAL = SwitchInterval()  # one per process, as the interval is


def let_other_threads_run() -> None:
    """The core's preemption hook (core/preempt.py). Compiled code keeps the GIL; a call of
    a plain Python function is where the interpreter hands it to a thread that asked for it
    (the event loop, gRPC's poller), so another tenant's call is read and answered in the
    middle of a long operation of a flood (a 256-page share: about 1 ms). The switch
    interval says how soon a waiting thread asks (BUSY_SWITCH_INTERVAL_S while contended)."""


class FairLock:
    """Runs `fn(*args)` under `lock` for a tenant, scheduled fairly (module docstring).

    `run` is the whole of it: `run_now` (the fast path), else `submit` (the queue)."""

    def __init__(self, lock: threading.Lock, *, clock: Callable[[], float] = time.perf_counter
                 ) -> None:
        self.lock = lock
        self.clock = clock
        self.inline_jobs = 0
        self.queued_jobs = 0
        self.loop_turns = 0
        # Guards everything below. The fast paths take the mutex itself (a Condition's
        # `with` is two more Python calls); holding it is holding the Condition.
        self._mutex = threading.Lock()
        self._state = threading.Condition(self._mutex)
        self._queues: dict[str, collections.deque[Job]] = {}
        self._usage: dict[str, tuple[float, float]] = {}  # tenant -> (seconds, as of when)
        self._job_cost: dict[str, float] = {}  # tenant -> predicted seconds of its next job
        self._waiting = 0
        self._running = False
        self._inline_credit_s = INLINE_BURST_S
        self._credit_at = clock()
        self._closed = False
        self._busy = False  # whether the busy switch interval is in force
        self._contended = False  # two tenants or more used the lock in the last HALF_LIFE_S
        self._contention_checked_at = -math.inf
        self._worker = threading.Thread(target=self._work, name="pkvm-fair", daemon=True)
        self._worker.start()

    async def run(self, tenant: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args)'s result (or exception), run under the lock in the tenant's turn."""
        result = self.run_now(tenant, fn, *args)
        if result is Queue.JOB:
            return await self.submit(tenant, fn, *args)
        return result

    def run_now(self, tenant: str, fn: Callable[..., T], *args: Any) -> T | Queue:
        """fn(*args)'s result (or exception), run on the loop at once, if the fast path
        (module docstring) allows it; else `Queue.JOB`: nothing ran, and the caller submits
        the job. A unary call does this itself rather than `await run(...)`: one coroutine
        less per call.

        The claim of the running slot takes no mutex: jobs are queued only from the loop
        (`submit`, like this, runs on the event loop that serves the calls), so while the
        loop finds nothing queued, nothing is, and the worker, which only takes the slot to
        run a queued job, cannot take it; and the loop sees the slot free only once the
        worker is done with it. The inline credit is the loop's alone. The rest of the state
        is the worker's too: read under the mutex when iterated, written under it."""
        if self._running or self._waiting:
            return Queue.JOB
        started = self.clock()
        cheap = self._job_cost.get(tenant, 0.0) <= INLINE_MAX_JOB_S \
            and self._earn_credit(started) > 0.0  # as of `started`: see below
        if not cheap:
            # Alone (nobody else used the lock lately): no one to be fair to, and two
            # thread hand-offs per job cost a stream of batches server CPU and latency
            # (docs/service.md, "Where an Execute batch spends its time").
            with self._mutex:
                if self._is_contended(started):
                    return Queue.JOB
        self._running = True
        try:
            with self.lock:
                return fn(*args)
        finally:
            ended = self.clock()
            seconds = ended - started
            with self._mutex:
                self._running = False
                self._done(tenant, seconds, ended)
                if cheap:  # the credit was earned as of `started` (_earn_credit, inline)
                    self._inline_credit_s = min(
                        INLINE_BURST_S, self._inline_credit_s + seconds * INLINE_SHARE
                    ) - seconds  # a job run because its tenant is alone is not charged:
                    self._credit_at = ended  # the credit is for sharing
                self.inline_jobs += 1
                if self._waiting:
                    self._state.notify()

    def submit(self, tenant: str, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue fn(*args) for the worker; the future completes on the caller's loop."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._mutex:
            if self._closed:
                raise RuntimeError("the server is stopping")
            self._queues.setdefault(tenant, collections.deque()).append((fn, args, future))
            self._waiting += 1
            self.queued_jobs += 1
            self._state.notify()
        return future

    def close(self) -> None:
        with self._state:
            self._closed = True
            self._state.notify()

    def _earn_credit(self, now: float) -> float:
        """The loop's inline credit as of now (the loop's alone: see run_now)."""
        earned = (now - self._credit_at) * INLINE_SHARE
        self._inline_credit_s = min(INLINE_BURST_S, self._inline_credit_s + earned)
        self._credit_at = now
        return self._inline_credit_s

    def _done(self, tenant: str, seconds: float, now: float) -> None:
        """Charge a job's lock time to its tenant (under _state)."""
        self._usage[tenant] = (self._decayed(tenant, now) + seconds, now)
        self._job_cost[tenant] = max(seconds, JOB_COST_DECAY * self._job_cost.get(tenant, 0.0))

    def _decayed(self, tenant: str, now: float) -> float:
        used, at = self._usage.get(tenant, (0.0, now))
        return used * math.exp2((at - now) / HALF_LIFE_S)

    def _next_job(self) -> tuple[str, Job] | None:
        """The oldest job of the waiting tenant with the least usage (under _state); None
        once closed."""
        while not self._waiting or self._running:
            if self._closed:
                self._set_busy(False)
                return None
            if not self._waiting:
                self._set_busy(False)
            self._state.wait()
        now = self.clock()
        self._set_busy(self._is_contended(now))
        tenant = min((t for t, queue in self._queues.items() if queue),
                     key=lambda t: self._decayed(t, now))
        queue = self._queues[tenant]
        job = queue.popleft()
        if not queue:
            del self._queues[tenant]
        self._waiting -= 1
        self._running = True
        return tenant, job

    def _is_contended(self, now: float) -> bool:
        """Whether another tenant than the one being served may be waiting for the GIL: two
        tenants queued, or two that used the lock in the last HALF_LIFE_S (under _state).
        With one tenant there is nobody to be fair to, and the short switch interval only
        costs it throughput (bench/bench_service.py: unary 0.56x of echo with it, 1.06x
        without)."""
        if len(self._queues) >= 2:
            return True
        if now - self._contention_checked_at >= CONTENTION_RECHECK_S:
            self._contention_checked_at = now
            recent = (tenant for tenant, (_used, at) in self._usage.items()
                      if now - at < HALF_LIFE_S)
            self._contended = next(recent, None) is not None and next(recent, None) is not None
        return self._contended

    def _set_busy(self, busy: bool) -> None:
        """The switch interval for a worker with work or without (under _state)."""
        if busy != self._busy:
            self._busy = busy
            if busy:
                SHORT_SWITCH_INTERVAL.hold()
            else:
                SHORT_SWITCH_INTERVAL.release()

    def _work(self) -> None:
        held_since_turn_s = 0.0  # lock time since the loop's last turn
        while True:
            with self._state:
                picked = self._next_job()
                if picked is None:
                    return
            tenant, (fn, args, future) = picked
            if future.cancelled():  # its caller went away while it waited: do not run it
                with self._state:
                    self._running = False
                continue
            started = self.clock()
            outcome: tuple[bool, Any]
            try:
                with self.lock:
                    outcome = (True, fn(*args))
            except BaseException as error:  # noqa: BLE001 (handed to the caller)
                outcome = (False, error)
            ended = self.clock()
            with self._state:
                self._running = False
                self._done(tenant, ended - started, ended)
                self._forget_idle(ended)
            loop = future.get_loop()
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, outcome)
            held_since_turn_s += ended - started
            # Contended (two tenants): a turn after every job, so another tenant's call
            # advances on the loop between two of a flood's jobs, its answer included;
            # unless a lighter tenant's job already waits: it is picked next, and a turn of
            # a loop full of the flood's steps would only delay it.
            if (self._busy or held_since_turn_s >= LOOP_TURN_EVERY_S) \
                    and not self._lighter_tenant_waiting(tenant):
                self._give_loop_a_turn(loop)
                held_since_turn_s = 0.0

    def _lighter_tenant_waiting(self, served: str) -> bool:
        """Whether a tenant that used the lock less than `served` has a job queued."""
        with self._state:
            now = self.clock()
            used = self._decayed(served, now)
            return any(self._decayed(tenant, now) < used
                       for tenant, queue in self._queues.items() if queue and tenant != served)

    @property
    def contended(self) -> bool:
        """Whether two tenants or more use the lock lately (see _is_contended)."""
        with self._state:
            return self._is_contended(self.clock())

    def _give_loop_a_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until `loop` has run LOOP_TURN_ITERATIONS iterations (each call_soon runs in
        the iteration after the one that scheduled it), so the calls that came meanwhile
        have reached the queue before the next pick."""
        turned = threading.Event()

        def tick(hops_left: int) -> None:
            if hops_left:
                loop.call_soon(tick, hops_left - 1)
            else:
                turned.set()

        try:
            loop.call_soon_threadsafe(tick, LOOP_TURN_ITERATIONS - 1)
        except RuntimeError:  # the loop is closed
            return
        turned.wait(LOOP_TURN_TIMEOUT_S)
        self.loop_turns += 1

    def _forget_idle(self, now: float) -> None:
        """Drop tenants whose usage decayed to nothing (keeps the tables small)."""
        if len(self._usage) > 1024:
            for tenant in [t for t in self._usage
                           if t not in self._queues and self._decayed(t, now) < 1e-6]:
                del self._usage[tenant]
                self._job_cost.pop(tenant, None)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.done():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class TenantGate:
    """At most `per_tenant` calls or batches of one tenant past the gate at a time; the
    tenant's others wait in order, each parked on a future of the event loop.

    The fair lock orders the tenants' jobs, but every call also costs the event loop its
    steps (decode, check, submit, answer), and the loop runs ready steps first come, first
    served. A tenant with many calls in flight on one connection (16 Execute streams, 8
    threads of unary calls) keeps that many steps ready ahead of any other tenant's, so
    another tenant's call waits behind all of them at each of its steps. Past the gate, a
    tenant has at most `per_tenant` calls with steps to run; the rest cost nothing until
    their turn. An Execute stream waits here after reading a batch, so it reads its next one
    only once the gate let this one through: the others stay unread in gRPC's buffers, and
    HTTP/2 flow control stops the client from sending more. Use from one event loop."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self.waits = 0  # calls that found the tenant's slots taken
        self._inside: dict[str, int] = {}  # tenant -> its calls past the gate (> 0)
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        # The two tenants seen at the gate most recently, newest first, with when: the
        # newest tenant other than any given one is one of these two.
        self._recent: list[tuple[str, float]] = []

    def try_enter(self, tenant: str) -> bool:
        """Pass at once if the tenant has a free slot, or nobody else is about (the common
        cases: no await)."""
        now = time.monotonic()
        inside = self._inside.get(tenant, 0)
        passes = inside < self.per_tenant or not self._others_about(tenant, now)
        self._seen(tenant, now)
        if passes:
            self._inside[tenant] = inside + 1
        return passes

    def _others_about(self, tenant: str, now: float) -> bool:
        """Whether a tenant other than `tenant` is inside, waiting, or was seen lately."""
        if len(self._inside) > (tenant in self._inside) or len(self._waiting) > (
                tenant in self._waiting):
            return True
        return any(other != tenant and now - at < HALF_LIFE_S for other, at in self._recent)

    def _seen(self, tenant: str, now: float) -> None:
        recent = self._recent
        if recent and recent[0][0] == tenant:
            recent[0] = (tenant, now)
        else:
            self._recent = [(tenant, now), *(entry for entry in recent[:2]
                                             if entry[0] != tenant)][:2]

    async def enter(self, tenant: str) -> None:
        """Pass the gate; every enter must be followed by one leave."""
        if self.try_enter(tenant):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, collections.deque()).append(waiter)
        self.waits += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot as it was cancelled
                self.leave(tenant)
            else:
                self._forget(tenant, waiter)
            raise

    def leave(self, tenant: str) -> None:
        """Hand the slot to the tenant's oldest waiter, or free it."""
        queue = self._waiting.get(tenant)
        while queue:
            waiter = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: the count is unchanged
                return
        inside = self._inside[tenant] - 1
        if inside:
            self._inside[tenant] = inside
        else:
            del self._inside[tenant]

    async def turn(self, tenant: str) -> Turn:
        """Pass the gate; the slot is held until the returned turn ends."""
        await self.enter(tenant)
        return Turn(self, tenant)

    def _forget(self, tenant: str, waiter: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                del self._waiting[tenant]


class Turn:
    """A tenant's slot past a TenantGate, held until `end()` (which may be called again)."""

    __slots__ = ("_gate", "_tenant")

    def __init__(self, gate: TenantGate, tenant: str) -> None:
        self._gate: TenantGate | None = gate
        self._tenant = tenant

    def end(self) -> None:
        if self._gate is not None:
            self._gate.leave(self._tenant)
            self._gate = None
