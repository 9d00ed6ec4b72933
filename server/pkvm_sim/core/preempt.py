"""Preemption points: where a long core operation lets the process's other threads run.

A 256-page share walks the host stage-2 and hyp stage-1 tables once per page: about a
millisecond of CPU in the compiled core. Compiled code never gives up the interpreter lock
(the GIL) by itself, so a server thread that has a call to read or an answer to send waits
for the whole operation. The table walkers (pgtable.py's map and unmap, hyp_stage1.py's
per-page map and unmap) call `point()` once per walk; every
`WALKS_PER_POINT`-th call runs the hook, if one is set. A hook written in plain Python (the
service sets one) lets the interpreter hand the GIL to a thread that asked for it, as it does
between any two Python calls; with no thread waiting it costs one Python call.

This is the simulator's cond_resched(): the host kernel's long loops make the same offer to
its scheduler. It changes nothing in the model: the operation still runs under the
simulator's lock, whole, and no other thread may touch the model while it runs. The core
sets no hook itself and imports nothing from the service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mypy_extensions import i64

WALKS_PER_POINT: Final = 8  # table walks (about one page each) between two hook calls


class Preemption:
    """The process's hook and the countdown to its next call."""

    def __init__(self) -> None:
        self.hook: Callable[[], None] | None = None
        self.countdown: i64 = WALKS_PER_POINT


PREEMPTION: Final = Preemption()


def set_hook(hook: Callable[[], None] | None) -> None:
    """Call `hook` every WALKS_PER_POINT table walks from now on (None: never)."""
    PREEMPTION.hook = hook
    PREEMPTION.countdown = WALKS_PER_POINT


def point() -> None:
    """One table walk done: every WALKS_PER_POINT-th call runs the hook."""
    preemption = PREEMPTION
    preemption.countdown -= 1
    if preemption.countdown > 0:
        return
    preemption.countdown = WALKS_PER_POINT
    hook = preemption.hook
    if hook is not None:
        hook()
