"""Calls the server refused at the HTTP/2 layer (REFUSED_STREAM) are sent again.

A server bounds the streams of one connection (SETTINGS_MAX_CONCURRENT_STREAMS). gRPC's
client keeps its own calls under that bound, but it counts a stream as gone when the answer
arrives, while gRPC's server (its default "overload protection") counts it until the call is
freed, after the handler finished: a call sent in between is reset with RST_STREAM
REFUSED_STREAM and fails UNAVAILABLE "Received RST_STREAM with error code 7" (docs/sdk.md,
Deadlines, says why the server keeps that protection).

By HTTP/2 (RFC 9113, section 8.7) a refused stream was never processed, so sending the call
again is safe for every call, mutations included. gRPC's own retries do not cover it here
(its retry policy is for the read-only calls only; a mutation that failed UNAVAILABLE for
another reason may have run, and is not retried).

`RefusedRetry` gives the waits between attempts: a short, growing, jittered backoff, a bounded
number of attempts, and never past the call's deadline.

Execute streams: gRPC's server refuses a stream when its HEADERS arrive (chttp2's header
parser answers RST_STREAM REFUSED_STREAM and skips the frame), before any handler exists, so
a refused stream ran none of its batches. The SDK sends a stream's batch again on a new
stream only when that batch was the first of its stream (no answer was ever read on it): a
stream that answered a batch was accepted, so a later failure of it may follow operations that
ran, and is raised. (gRPC also writes code 7 when it cancels a call with UNAVAILABLE; our
server ends a stream with trailers instead, whose details are its own.)

grpc.aio hides some of these refusals: a batch written to a stream the server has already
reset fails in the C core, and grpc.aio then replaces the call's status with INTERNAL
"Internal error from Core" (`set_internal_error`), even when the real status had arrived
first. `CallEnd` keeps the status the call really ended with.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio

T = TypeVar("T")

# The details gRPC's C core gives a call reset with HTTP/2 error code 7 (REFUSED_STREAM).
REFUSED_STREAM_DETAILS = "RST_STREAM with error code 7"
MAX_REFUSED_RETRIES = 50  # about 20 s of backoff: the deadline usually ends it first
FIRST_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.5
# What grpc.aio reports for a write the C core failed, in place of the call's real status.
CORE_INTERNAL_DETAILS = "Internal error from Core"
# How long CallEnd waits for the real status to replace that one (it comes from the same
# transport event, so at once in practice).
REAL_STATUS_WAIT_S = 1.0


def is_refused_stream(error: grpc.RpcError) -> bool:
    """The server reset the call's stream with REFUSED_STREAM: it never processed it."""
    call: Any = error  # a grpc.Call (sync) or an AioRpcError
    return bool(call.code() == grpc.StatusCode.UNAVAILABLE
                and REFUSED_STREAM_DETAILS in (call.details() or ""))


def seconds_left(deadline: float | None) -> float | None:
    """What is left until `deadline` (a time.monotonic() value; None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def deadline_in(timeout_s: float | None) -> float | None:
    """The time.monotonic() value `timeout_s` seconds from now (None: no deadline)."""
    return None if timeout_s is None else time.monotonic() + timeout_s


def earliest(*timeouts_s: float | None) -> float | None:
    """The shortest of some timeouts (None: none)."""
    given = [t for t in timeouts_s if t is not None]
    return min(given) if given else None


class RefusedRetry:
    """The retry plan of one call whose deadline is `timeout_s` seconds from now (None:
    no deadline)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.deadline = deadline_in(timeout_s)
        self.retries = 0

    def timeout(self) -> float | None:
        """What is left of the call's deadline, for the next attempt."""
        return seconds_left(self.deadline)

    def backoff(self, error: grpc.RpcError) -> float | None:
        """Seconds to wait before sending the call again, or None: raise `error`."""
        if not is_refused_stream(error) or self.retries >= MAX_REFUSED_RETRIES:
            return None
        ceiling_s = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * (2 ** self.retries))
        wait_s = random.uniform(ceiling_s / 2, ceiling_s)  # jitter: refused calls spread out
        if self.deadline is not None and time.monotonic() + wait_s >= self.deadline:
            return None
        self.retries += 1
        return wait_s


def _settled(coroutine: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that returns without waiting: grpc.aio's status getters once
    the call is done (they await nothing then)."""
    try:
        coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the call has no status yet")


async def _status_of(call: Any) -> grpc.aio.AioRpcError:
    """A done asyncio call's current status, as an RpcError."""
    return grpc.aio.AioRpcError(
        await call.code(), grpc.aio.Metadata(), await call.trailing_metadata(),
        await call.details(), await call.debug_error_string())


def _is_core_internal(error: grpc.aio.AioRpcError) -> bool:
    return bool(error.code() == grpc.StatusCode.INTERNAL
                and error.details() == CORE_INTERNAL_DETAILS)


class CallEnd:
    """How an asyncio stream call really ended (see the module's docstring).

    gRPC calls the done callback once, as it sets the call's first status: that one is kept.
    When it is grpc.aio's INTERNAL placeholder (the write failed before the status arrived),
    the real status overwrites it a moment later, and `error()` waits for it."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._first: grpc.aio.AioRpcError | None = None
        call.add_done_callback(self._record)

    def _record(self, call: Any) -> None:
        # Runs inside gRPC's status setter, which must not see an exception: on any failure
        # (not expected: the status is set before the callbacks run) error() reads the call.
        try:
            self._first = _settled(_status_of(call))
        except Exception:
            self._first = None

    async def error(self) -> grpc.aio.AioRpcError:
        """The call's real end, once it ended (CANCELLED for a call cancelled here)."""
        await self._call.code()  # waits for the call's end; _record has run by then
        first = self._first
        if first is not None and not _is_core_internal(first):
            return first
        end_s, pause_s = time.monotonic() + REAL_STATUS_WAIT_S, 0.001
        current = await _status_of(self._call)
        while _is_core_internal(current) and time.monotonic() < end_s:
            await asyncio.sleep(pause_s)
            pause_s = min(2 * pause_s, 0.05)
            current = await _status_of(self._call)
        return current
