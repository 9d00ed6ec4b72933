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
"""

from __future__ import annotations

import random
import time
from typing import Any

import grpc

# The details gRPC's C core gives a call reset with HTTP/2 error code 7 (REFUSED_STREAM).
REFUSED_STREAM_DETAILS = "RST_STREAM with error code 7"
MAX_REFUSED_RETRIES = 50  # about 20 s of backoff: the deadline usually ends it first
FIRST_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.5


def is_refused_stream(error: grpc.RpcError) -> bool:
    """The server reset the call's stream with REFUSED_STREAM: it never processed it."""
    call: Any = error  # a grpc.Call (sync) or an AioRpcError
    return bool(call.code() == grpc.StatusCode.UNAVAILABLE
                and REFUSED_STREAM_DETAILS in (call.details() or ""))


class RefusedRetry:
    """The retry plan of one call whose deadline is `timeout_s` seconds from now (None:
    no deadline)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.retries = 0

    def timeout(self) -> float | None:
        """What is left of the call's deadline, for the next attempt."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

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
