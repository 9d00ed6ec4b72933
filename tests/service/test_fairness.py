"""Fair turns for the simulator lock (service/fairness.py), with real threads: a light
tenant's job runs right after the job that is running, whatever is queued before it."""

from __future__ import annotations

import asyncio
import threading

from pkvm_sim.service.fairness import FairLock


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
