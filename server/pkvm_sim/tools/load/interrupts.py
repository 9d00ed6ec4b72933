"""SIGINT and SIGTERM while `pkvm-sim load` runs.

Ctrl-C, `timeout`, a CI time-out and `compose down` all mean "stop now, but tell me what you
measured". So the first SIGINT or SIGTERM during the run only stops it: every VM finishes
its call, is destroyed and checked, and every report is written, marked interrupted. A signal
after that (a second Ctrl-C, or one while the reports are being written) ends the process at
once with one line: the run's VMs, if any are left, are the server's to reclaim (leases).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abort(BaseException):
    """A second signal: leave now (BaseException, so no `except Exception` swallows it)."""

    def __init__(self, signum: int, second: bool) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.second = second  # False: the first signal, while the reports were written


class Interrupts:
    """Which stop signal came first (None: none yet), and what a signal does now."""

    def __init__(self) -> None:
        self.first: int | None = None
        self.on_stop: Callable[[], None] | None = None  # the running load's stop
        self.stopping_allowed = True  # False once the run is over: any signal aborts

    @property
    def name(self) -> str | None:
        return None if self.first is None else signal.Signals(self.first).name

    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        assert self.first is not None
        return 128 + self.first

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.first is None and self.stopping_allowed:
            self.first = signum
            if self.on_stop is not None:
                self.on_stop()
            return
        second = self.first is not None
        if not second:
            self.first = signum
        raise Abort(signum, second)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Our handler for SIGINT and SIGTERM (main thread only), the old ones restored."""
        previous = {}
        try:
            for signum in STOP_SIGNALS:
                previous[signum] = signal.signal(signum, self.handle)
        except ValueError:  # not the main thread: signals stay as they were
            pass
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
