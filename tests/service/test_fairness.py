"""Fair turns for the simulator lock (service/fairness.py), with real threads: a light
tenant's job runs right after the job that is running, whatever is queued before it."""

from __future__ import annotations

import asyncio
import math
import threading

from pkvm_sim.service.fairness import (
    BUSY_SWITCH_INTERVAL_S,
    IDLE_SWITCH_INTERVAL_S,
    INLINE_MAX_JOB_S,
    LOOP_TURN_EVERY_S,
    LOOP_TURN_ITERATIONS,
    FairLock,
    SwitchInterval,
    TenantGate,
)


def test_a_light_tenant_overtakes_a_heavy_tenants_queue() -> None:
    async def scenario() -> list[str]:
        lock = threading.Lock()
        fair = FairLock(lock)
        order: list[str] = []

        def job(name: str) -> str:
            order.append(name)
            return name

        try:
            # A heavy tenant has used the lock lately (so it never runs on the loop).
            await fair.run("heavy", lambda: job("heavy-warmup"))
            fair._usage["heavy"] = (1.0, fair.clock())
            with lock:  # the worker blocks on its first pick until released
                heavy = [fair.submit("heavy", lambda i=i: job(f"heavy-{i}")) for i in range(50)]
                await asyncio.sleep(0.2)  # the worker has picked heavy-0 and waits for the lock
                light = fair.submit("light", lambda: job("light"))
            results = await asyncio.gather(*heavy, light)
        finally:
            fair.close()
        assert results[-1] == "light"
        return order

    order = asyncio.run(scenario())
    assert order.index("light") <= 2, order[:5]  # after at most the job already picked
    assert [name for name in order if name.startswith("heavy-") and name != "heavy-warmup"] \
        == [f"heavy-{i}" for i in range(50)]  # a tenant's own jobs keep their order


def test_a_cancelled_waiting_job_does_not_run() -> None:
    async def scenario() -> list[str]:
        lock = threading.Lock()
        fair = FairLock(lock)
        ran: list[str] = []
        try:
            with lock:
                first = fair.submit("a", lambda: ran.append("first"))
                second = fair.submit("a", lambda: ran.append("second"))
                await asyncio.sleep(0.2)
                second.cancel()
            await first
            done = fair.submit("a", lambda: ran.append("third"))
            await done
        finally:
            fair.close()
        return ran

    assert asyncio.run(scenario()) == ["first", "third"]


def test_the_worker_gives_the_loop_a_turn_between_long_jobs() -> None:
    """However full its queue, the worker lets the loop run LOOP_TURN_ITERATIONS iterations
    between two jobs that each held the lock for LOOP_TURN_EVERY_S, so the loop can take
    in calls (and queue a light tenant's job) while a flood runs."""

    async def scenario() -> list[tuple[int, int]]:
        fair = FairLock(threading.Lock())
        iterations = 0
        spans: list[tuple[int, int]] = []  # loop iterations seen at each job's start and end

        def count_iterations() -> None:
            nonlocal iterations
            iterations += 1
            loop.call_soon(count_iterations)

        def long_job() -> None:
            started = iterations
            until = fair.clock() + LOOP_TURN_EVERY_S
            while fair.clock() < until:  # holds the lock (and mostly the GIL) that long
                pass
            spans.append((started, iterations))

        loop = asyncio.get_running_loop()
        loop.call_soon(count_iterations)
        try:
            fair._usage["heavy"] = (1.0, fair.clock())
            await asyncio.gather(*(fair.submit("heavy", long_job) for _ in range(10)))
        finally:
            fair.close()
        return spans

    spans = asyncio.run(scenario())
    gaps = [nxt[0] - prev[1] for prev, nxt in zip(spans, spans[1:], strict=False)]
    assert min(gaps) >= LOOP_TURN_ITERATIONS, gaps


def test_a_heavy_tenant_runs_on_the_loop_while_alone_and_queues_once_another_came() -> None:
    """Heavy jobs (costlier than INLINE_MAX_JOB_S) of the only tenant run on the loop: no
    thread hand-off, nobody to be fair to. Once another tenant used the lock within
    HALF_LIFE_S, they go to the worker again."""

    async def scenario() -> list[tuple[int, int, str]]:
        fair = FairLock(threading.Lock())
        loop_thread = threading.current_thread().name
        seen: list[tuple[int, int, str]] = []

        def heavy_job() -> None:
            seen.append((fair.inline_jobs, fair.queued_jobs, threading.current_thread().name))

        try:
            fair._job_cost["heavy"] = 10 * INLINE_MAX_JOB_S
            fair._inline_credit_s = -1.0  # no credit: only being alone lets it run inline
            for _ in range(3):
                await fair.run("heavy", heavy_job)
            fair._usage["light"] = (0.001, fair.clock())  # another tenant, just now
            fair._contention_checked_at = -math.inf  # recount the recent tenants now
            fair._job_cost["heavy"] = 10 * INLINE_MAX_JOB_S
            await fair.run("heavy", heavy_job)
        finally:
            fair.close()
        return [(inline, queued, "loop" if name == loop_thread else name)
                for inline, queued, name in seen]

    assert asyncio.run(scenario()) == [
        (0, 0, "loop"), (1, 0, "loop"), (2, 0, "loop"),  # alone: inline, uncounted so far
        (3, 1, "pkvm-fair"),  # another tenant came: the worker
    ]


def test_the_gate_lets_a_tenants_calls_through_one_at_a_time_in_order() -> None:
    async def scenario() -> tuple[list[str], int]:
        gate = TenantGate(1)
        assert gate.try_enter("C")  # another tenant is about for the whole scenario
        order: list[str] = []
        release = asyncio.Event()

        async def call(tenant: str, name: str) -> None:
            await gate.enter(tenant)
            try:
                order.append(f"{name} in")
                if name == "a0":
                    await release.wait()  # a0 holds A's slot until told
                await asyncio.sleep(0)
                order.append(f"{name} out")
            finally:
                gate.leave(tenant)

        a_calls = [asyncio.create_task(call("A", f"a{i}")) for i in range(4)]
        await asyncio.sleep(0.01)
        await call("B", "b")  # another tenant passes while A's slot is taken
        release.set()
        await asyncio.gather(*a_calls)
        return order, gate.waits

    order, waits = asyncio.run(scenario())
    assert order == ["a0 in", "b in", "b out", "a0 out", "a1 in", "a1 out", "a2 in", "a2 out",
                     "a3 in", "a3 out"]
    assert waits == 3


def test_a_cancelled_waiter_takes_no_slot_and_passes_on_one_it_was_handed() -> None:
    async def scenario() -> list[str]:
        gate = TenantGate(1)
        assert gate.try_enter("C")  # another tenant is about for the whole scenario
        passed: list[str] = []

        async def call(name: str) -> None:
            await gate.enter("A")
            passed.append(name)
            gate.leave("A")

        assert gate.try_enter("A")  # the slot is taken
        waiting = [asyncio.create_task(call(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        waiting[0].cancel()  # cancelled while waiting: forgotten
        await asyncio.sleep(0.01)
        gate.leave("A")  # handed to w1 ...
        waiting[1].cancel()  # ... which is cancelled before it runs: w2 gets it
        await asyncio.gather(*waiting, return_exceptions=True)
        assert gate.try_enter("A")  # and w2 gave it back: the gate is free again
        gate.leave("A")
        return passed

    assert asyncio.run(scenario()) == ["w2"]


def test_the_gate_holds_a_tenant_back_only_while_another_is_about() -> None:
    gate = TenantGate(1)
    # Alone, a tenant's calls all pass: one at a time would only cost it its pipelining.
    assert [gate.try_enter("A") for _ in range(4)] == [True] * 4
    assert gate.try_enter("B")  # B has no call inside: it passes
    assert not gate.try_enter("A")  # now A has more than its one slot while B is inside
    for _ in range(4):
        gate.leave("A")
    gate.leave("B")
    assert gate.try_enter("A")  # A's first slot, free again
    assert not gate.try_enter("A")  # B was seen a moment ago: A gets one slot only



def test_the_switch_interval_is_short_while_anyone_holds_it() -> None:
    import sys

    interval = SwitchInterval()
    before = sys.getswitchinterval()
    sys.setswitchinterval(IDLE_SWITCH_INTERVAL_S)
    try:
        interval.hold()  # the fair worker, say
        with interval.held():  # and a GetStats message being built
            assert math.isclose(sys.getswitchinterval(), BUSY_SWITCH_INTERVAL_S, rel_tol=0.01)
        # One holder left: still short.
        assert math.isclose(sys.getswitchinterval(), BUSY_SWITCH_INTERVAL_S, rel_tol=0.01)
        interval.release()
        assert math.isclose(sys.getswitchinterval(), IDLE_SWITCH_INTERVAL_S, rel_tol=0.01)
    finally:
        sys.setswitchinterval(before)
