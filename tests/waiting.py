"""Waiting for a condition in tests: polled, with a generous deadline, never a stopwatch."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], seconds: float = 60.0, poll_s: float = 0.02) -> bool:
    """Whether `condition()` became true within `seconds` (polled every `poll_s`)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
