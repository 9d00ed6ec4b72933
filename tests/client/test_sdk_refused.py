"""The SDK sends a unary call again when the server refused its stream unprocessed (HTTP/2
REFUSED_STREAM), and only then: any other UNAVAILABLE of a mutation may have run and is
raised at once. A stub stands in for the channel, so each attempt is counted exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_client import PkvmError, _aio, _client, _refused
from pkvm_client._refused import MAX_REFUSED_RETRIES

REFUSED = "Stream removed (RST_STREAM (Received RST_STREAM with error code 7))"
OTHER = "Socket closed"


class Failure(grpc.RpcError):
    def __init__(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


class Stub:
    """DestroyVM fails with `failures` (in order), then answers 7 pages."""

    def __init__(self, *failures: str) -> None:
        self.failures = list(failures)
        self.timeouts: list[float | None] = []

    def _answer(self, timeout: float | None) -> Any:
        self.timeouts.append(timeout)
        if self.failures:
            raise Failure(self.failures.pop(0))
        return pb2.DestroyVMResponse(pages_returned=7)

    def DestroyVM(self, request: Any, *, metadata: Any, timeout: float | None) -> Any:  # noqa: N802
        return self._answer(timeout)


class AsyncStub(Stub):
    async def DestroyVM(self, request: Any, *, metadata: Any,  # noqa: N802
                        timeout: float | None) -> Any:
        return self._answer(timeout)


def destroy(stub: Stub, timeout: float | None = 30.0) -> int:
    if isinstance(stub, AsyncStub):
        return asyncio.run(_aio._invoke(stub, _client.DESTROY_VM, timeout, None, {}))
    return _client._invoke(stub, _client.DESTROY_VM, timeout, None, {})


@pytest.mark.parametrize("stub_type", [Stub, AsyncStub])
def test_a_refused_mutation_is_sent_again_until_it_runs(stub_type: type[Stub]) -> None:
    stub = stub_type(REFUSED, REFUSED, REFUSED)
    assert destroy(stub) == 7
    assert len(stub.timeouts) == 4
    # Every attempt gets what is left of the one deadline, never a fresh 30 s.
    left = [t for t in stub.timeouts if t is not None]
    assert len(left) == 4 and all(0 < t <= 30.0 for t in left)
    assert left == sorted(left, reverse=True)


@pytest.mark.parametrize("stub_type", [Stub, AsyncStub])
def test_any_other_unavailable_mutation_is_raised_at_once(stub_type: type[Stub]) -> None:
    stub = stub_type(OTHER)
    with pytest.raises(PkvmError) as raised:
        destroy(stub)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and len(stub.timeouts) == 1


def test_refusals_end_after_a_bounded_number_of_retries(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_refused, "MAX_BACKOFF_S", 0.001)  # the count matters, not the waits
    stub = Stub(*[REFUSED] * (MAX_REFUSED_RETRIES + 5))
    with pytest.raises(PkvmError):
        destroy(stub, timeout=None)
    assert len(stub.timeouts) == MAX_REFUSED_RETRIES + 1


def test_refusals_end_at_the_deadline() -> None:
    stub = Stub(*[REFUSED] * (MAX_REFUSED_RETRIES + 5))
    with pytest.raises(PkvmError):
        destroy(stub, timeout=0.05)
    # Backoffs start near 5 ms and double: a 50 ms deadline leaves room for a few only.
    assert 1 < len(stub.timeouts) < 8, stub.timeouts
