"""Callers sharing the runs of one costly function (SaveState's save, GetStats' snapshot).

Every caller waits for the first run that starts after it came, so what it gets reflects
everything it saw done before it called; every caller that comes while a run is going, or
while the next one waits for its turn, shares that next run. Runs go one at a time on a
worker thread (the event loop keeps serving meanwhile), and the next starts no sooner than
`spacing` times the last one's duration after it ended. So a flood of callers costs the
others what one caller running back to back with pauses would: the function is busy at
most 1 / (1 + spacing) of the time, however many call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Coalesced(Generic[T]):
    """`await coalesced()` -> the result of a run of `fn` started after the call (or its
    exception). Use from one event loop."""

    def __init__(self, fn: Callable[[], T], spacing: float) -> None:
        self.fn = fn
        self.spacing = spacing
        self.runs = 0
        self._pending: asyncio.Future[T] | None = None  # the next run's callers
        self._runner: asyncio.Task[None] | None = None
        self._rest_until = 0.0  # loop time before which the next run does not start

    async def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        if self._pending is None:
            self._pending = loop.create_future()
            self._pending.add_done_callback(_retrieve)
        pending = self._pending
        if self._runner is None:
            self._runner = loop.create_task(self._run())
        return await asyncio.shield(pending)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending is not None:
                rest = self._rest_until - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)  # callers coming meanwhile join this run
                pending, self._pending = self._pending, None
                started = loop.time()
                try:
                    result = await loop.run_in_executor(None, self.fn)
                except Exception as error:  # noqa: BLE001 (every caller gets it)
                    pending.set_exception(error)
                else:
                    pending.set_result(result)
                self.runs += 1
                ended = loop.time()
                self._rest_until = ended + self.spacing * (ended - started)
        finally:
            self._runner = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an exception as seen even when every caller went away before it came."""
    if not future.cancelled():
        future.exception()
