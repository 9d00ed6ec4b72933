"""Issue 20, item 5 leftovers: Execute streams the server refused (HTTP/2 REFUSED_STREAM).

A server with few streams per connection refuses some of the streams of a client that opens
many (gRPC's server counts a stream until its call is freed, its client only until the
answer came: docs/sdk.md, Deadlines). A refused stream ran nothing, so the SDK sends its first
batch again on a new stream; and grpc.aio's INTERNAL "Internal error from Core", which it
reports when a batch is written to a stream the server already reset, no longer hides that
refusal. Against a real `pkvm-sim serve` process: every batch succeeds, and the hyp pool
shows that each ran exactly once (a batch sent again after it ran would allocate twice).

Then, with a stub for the channel: a stream that has answered a batch was accepted, so a
later refusal of it is raised, never resent; and the real status of a call grpc.aio marked
INTERNAL is found whichever of the two arrived first."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_client import VM, AsyncHypervisor, AsyncVM, Batch, Hypervisor, PkvmError, _refused

from tests.service.attack_helpers import ServeProcess

STREAMS_PER_CONNECTION = 4
VMS = 24
BATCHES_PER_VM = 12
REFUSED = "Stream removed (RST_STREAM (Received RST_STREAM with error code 7))"


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with ServeProcess("--max-streams-per-connection", str(STREAMS_PER_CONNECTION)) as server:
        yield server.target


def one_page_batch() -> Batch:
    batch = Batch()
    batch.alloc_pages(order=0)
    return batch


# -- against the real server -------------------------------------------------------------------


@pytest.mark.slow  # seconds of traffic against a server process
def test_async_streams_refused_at_open_run_every_batch_once(target: str) -> None:
    failures: Counter[str] = Counter()

    async def one_vm(hv: AsyncHypervisor, index: int) -> AsyncVM:
        vm = await hv.create_vm(slice_pages=16, name=f"refused-{index}")
        await started.wait()
        for _ in range(BATCHES_PER_VM):
            try:  # a short-lived stream per batch: the most openings, so the most refusals
                result = await vm.execute(one_page_batch())
                result.raise_first()
            except PkvmError as error:
                failures[f"{error.code.name}: {error.message}"] += 1
        return vm

    async def run() -> tuple[int, int]:
        async with AsyncHypervisor(target) as hv:
            tasks = [asyncio.create_task(one_vm(hv, i)) for i in range(VMS)]
            while (await hv.stats()).nr_vms < VMS:
                await asyncio.sleep(0.05)
            free_before = (await hv.stats()).pool("hyp").free_pages
            started.set()
            vms = await asyncio.gather(*tasks)
            free_after = (await hv.stats()).pool("hyp").free_pages
            for vm in vms:
                await vm.destroy()
            return free_before, free_after

    started = asyncio.Event()
    free_before, free_after = asyncio.run(run())
    assert failures == {}
    # Each batch took one page: once per batch sent, never twice.
    assert free_before - free_after == VMS * BATCHES_PER_VM


@pytest.mark.slow
def test_sync_streams_refused_at_open_run_every_batch_once(target: str) -> None:
    failures: Counter[str] = Counter()
    with Hypervisor(target) as hv:
        vms = [hv.create_vm(slice_pages=16, name=f"refused-sync-{i}") for i in range(VMS)]
        free_before = hv.stats().pool("hyp").free_pages
        barrier = threading.Barrier(VMS)

        def one_vm(index: int) -> None:
            barrier.wait()
            for _ in range(BATCHES_PER_VM):
                try:
                    vms[index].execute(one_page_batch()).raise_first()
                except PkvmError as error:
                    failures[f"{error.code.name}: {error.message}"] += 1

        threads = [threading.Thread(target=one_vm, args=(i,)) for i in range(VMS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == {}
        assert free_before - hv.stats().pool("hyp").free_pages == VMS * BATCHES_PER_VM
        for vm in vms:
            vm.destroy()


# -- with a stub for the channel ---------------------------------------------------------------


class Failure(grpc.RpcError):
    """How a call ended: UNAVAILABLE with `details`."""

    def __init__(self, details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
                 ) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


ANSWER = "answer"
Outcome = Failure | str  # what the call does with the next batch written to it


def answer(request: Any) -> pb2.ExecuteResponse:
    ops = len(request.ops)
    return pb2.ExecuteResponse(batch_id=request.batch_id, codes=[0] * ops, values=[0] * ops,
                               completed=ops)


class SyncCall:
    """One Execute call as grpc's sync stub returns it: reading the next answer takes the
    next batch the client queued."""

    def __init__(self, requests: Iterator[Any], outcomes: list[Outcome]) -> None:
        self.requests, self.outcomes = requests, outcomes
        self.batches: list[int] = []

    def __iter__(self) -> SyncCall:
        return self

    def __next__(self) -> Any:
        request = next(self.requests)  # StopIteration once the client half-closes
        self.batches.append(request.batch_id)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Failure):
            raise outcome
        return answer(request)

    def cancel(self) -> None:
        pass


class AioCall:
    """One Execute call as grpc.aio's stub returns it. Like grpc.aio's call (its Cython
    `_AioCall._set_status`): the done callbacks run when the first status is set, and a later
    status (`overwrite`, what `set_internal_error` does) replaces it silently."""

    def __init__(self, outcomes: list[Outcome]) -> None:
        self.outcomes = outcomes
        self.batches: list[int] = []
        self.status: tuple[grpc.StatusCode, str] | None = None
        self.callbacks: list[Any] = []
        self.request: Any = None

    def end(self, code: grpc.StatusCode, details: str) -> None:
        first = self.status is None
        self.status = (code, details)
        if first:
            for callback in self.callbacks:
                callback(self)

    async def write(self, request: Any) -> None:
        if self.status is not None:
            raise asyncio.InvalidStateError("the call already ended")
        self.request = request
        self.batches.append(request.batch_id)

    async def read(self) -> Any:
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Failure):
            self.end(outcome.code(), outcome.details())
            return grpc.aio.EOF
        return answer(self.request)

    async def done_writing(self) -> None:
        if self.status is None:
            self.end(grpc.StatusCode.OK, "")

    def add_done_callback(self, callback: Any) -> None:
        if self.status is None:
            self.callbacks.append(callback)
        else:
            callback(self)

    def done(self) -> bool:
        return self.status is not None

    def cancel(self) -> None:
        self.end(grpc.StatusCode.CANCELLED, "Locally cancelled by application!")

    async def code(self) -> grpc.StatusCode:
        while self.status is None:
            await asyncio.sleep(0.001)
        return self.status[0]

    async def details(self) -> str:
        await self.code()
        assert self.status is not None
        return self.status[1]

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def debug_error_string(self) -> str:
        return ""


class Stub:
    """Execute opens a call per entry of `calls`, in order; `opened` keeps them."""

    def __init__(self, *calls: list[Outcome]) -> None:
        self.calls = list(calls)
        self.opened: list[Any] = []

    def Execute(self, requests: Iterator[Any] | None = None, *,  # noqa: N802
                metadata: Any, timeout: float | None) -> Any:
        outcomes = self.calls.pop(0)
        call = AioCall(outcomes) if requests is None else SyncCall(requests, outcomes)
        self.opened.append(call)
        return call


def stub_vm(stub: Stub, asyncio_: bool) -> Any:
    hypervisor = SimpleNamespace(stub=stub, timeout=30.0)
    return (AsyncVM if asyncio_ else VM)(hypervisor, pb2.VM(handle=1), "token")


def execute_batches(stub: Stub, asyncio_: bool, count: int) -> list[str]:
    """Run `count` batches one after another on one stream; each one's outcome."""
    vm = stub_vm(stub, asyncio_)
    outcomes: list[str] = []

    async def run_async() -> None:
        async with vm.stream() as stream:
            for _ in range(count):
                try:
                    await stream.execute(one_page_batch())
                    outcomes.append("ok")
                except PkvmError as error:
                    outcomes.append(error.code.name)

    if asyncio_:
        asyncio.run(run_async())
        return outcomes
    with vm.stream() as stream:
        for _ in range(count):
            try:
                stream.execute(one_page_batch())
                outcomes.append("ok")
            except PkvmError as error:
                outcomes.append(error.code.name)
    return outcomes


@pytest.mark.parametrize("asyncio_", [False, True], ids=["sync", "asyncio"])
def test_a_first_batch_refused_with_its_stream_is_sent_on_a_new_stream(asyncio_: bool) -> None:
    stub = Stub([Failure(REFUSED)], [Failure(REFUSED)], [ANSWER, ANSWER])
    assert execute_batches(stub, asyncio_, 2) == ["ok", "ok"]
    assert [call.batches for call in stub.opened] == [[1], [1], [1, 2]]


@pytest.mark.parametrize("asyncio_", [False, True], ids=["sync", "asyncio"])
def test_a_stream_that_answered_a_batch_is_never_opened_again(asyncio_: bool) -> None:
    # Batch 1 ran on this stream, so it was accepted: a refusal now may follow operations
    # that ran, and batch 2 is not sent anywhere again.
    stub = Stub([ANSWER, Failure(REFUSED)], [ANSWER])
    assert execute_batches(stub, asyncio_, 2) == ["ok", "UNAVAILABLE"]
    assert len(stub.opened) == 1 and stub.opened[0].batches == [1, 2]


@pytest.mark.parametrize("asyncio_", [False, True], ids=["sync", "asyncio"])
def test_any_other_failure_of_a_first_batch_is_raised(asyncio_: bool) -> None:
    stub = Stub([Failure("Socket closed")], [ANSWER])
    assert execute_batches(stub, asyncio_, 1) == ["UNAVAILABLE"]
    assert len(stub.opened) == 1


CORE = _refused.CORE_INTERNAL_DETAILS


def call_end(statuses: list[tuple[grpc.StatusCode, str]], later: tuple[grpc.StatusCode, str]
             | None = None) -> grpc.aio.AioRpcError:
    """What CallEnd finds for a call given `statuses` in order, then `later` a moment on."""

    async def run() -> grpc.aio.AioRpcError:
        call = AioCall([])
        end = _refused.CallEnd(call)
        for code, details in statuses:
            call.end(code, details)
        if later is not None:
            asyncio.get_running_loop().call_later(0.05, call.end, *later)
        return await end.error()

    return asyncio.run(run())


def test_the_real_status_is_kept_when_grpc_aio_overwrites_it_with_internal() -> None:
    error = call_end([(grpc.StatusCode.UNAVAILABLE, REFUSED), (grpc.StatusCode.INTERNAL, CORE)])
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSED)


def test_the_real_status_is_awaited_when_internal_came_first() -> None:
    error = call_end([(grpc.StatusCode.INTERNAL, CORE)], later=(grpc.StatusCode.UNAVAILABLE,
                                                               REFUSED))
    assert (error.code(), error.details()) == (grpc.StatusCode.UNAVAILABLE, REFUSED)


def test_internal_stays_when_no_real_status_comes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_refused, "REAL_STATUS_WAIT_S", 0.05)
    error = call_end([(grpc.StatusCode.INTERNAL, CORE)])
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, CORE)
