"""Deadlines: per-call `timeout=`, Execute stream and per-batch deadlines, and wait_ready,
sync and asyncio, against the real service. A slow server is made by holding the
simulator's lock from the test, so a call waits in the server exactly as behind a long batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from pkvm_client import AsyncHypervisor, Batch, Hypervisor, TransportError
from pkvm_sim.service.server import RunningService

SHORT = 0.2  # a deadline that the held lock outlasts
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


@contextlib.contextmanager
def server_stalled(service: RunningService, seconds: float | None = None) -> Iterator[None]:
    """Hold the simulator lock: every call that needs it waits. With `seconds`, release it
    from a timer (for calls that must outlive the stall)."""
    lock = service.servicer.lock
    lock.acquire()
    timer = threading.Timer(seconds, lock.release) if seconds is not None else None
    try:
        if timer is not None:
            timer.start()
        yield
    finally:
        if timer is None:
            lock.release()
        else:
            timer.join()


def assert_deadline_exceeded(caught: pytest.ExceptionInfo[TransportError]) -> None:
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_per_call_timeout_overrides_the_client_default(service: RunningService) -> None:
    with Hypervisor(service.target, timeout=30.0) as hv, hv.create_vm(slice_pages=4) as vm:
        with server_stalled(service), pytest.raises(TransportError) as caught:
            vm.alloc_pages(timeout=SHORT)
        assert_deadline_exceeded(caught)  # the stall is shorter than the client's 30 s
        with server_stalled(service), pytest.raises(TransportError) as caught:
            hv.stats(timeout=SHORT)
        assert_deadline_exceeded(caught)


def test_client_default_applies_and_none_means_no_deadline(service: RunningService) -> None:
    with Hypervisor(service.target, timeout=SHORT) as hv:
        vm = hv.create_vm(slice_pages=4, timeout=5.0)
        with server_stalled(service), pytest.raises(TransportError) as caught:
            vm.get_page(vm.info.slice_base_pfn)  # the client's SHORT applies
        assert_deadline_exceeded(caught)
        with server_stalled(service, seconds=3 * SHORT):  # outlives SHORT, then releases
            pfn = vm.alloc_pages(timeout=None)
        assert vm.put_page(pfn, timeout=5.0) == 0
        assert vm.destroy(timeout=5.0) > 0


def test_stream_deadline_and_batch_deadline(service: RunningService) -> None:
    with Hypervisor(service.target) as hv, hv.create_vm(slice_pages=4) as vm:
        batch = Batch()
        batch.alloc_pages()
        with vm.stream(timeout=SHORT) as stream:  # the whole stream's deadline
            pfn = stream.execute(batch).value(0)
            time.sleep(2 * SHORT)
            with pytest.raises(TransportError) as caught:
                stream.execute(batch)
            assert_deadline_exceeded(caught)
        vm.put_page(pfn)
        with vm.stream() as stream:  # no stream deadline; one batch gets its own
            with server_stalled(service), pytest.raises(TransportError) as caught:
                stream.execute(batch, timeout=SHORT)
            assert_deadline_exceeded(caught)
        with server_stalled(service), pytest.raises(TransportError) as caught:
            vm.execute(batch, timeout=SHORT)  # a one-batch stream's deadline
        assert_deadline_exceeded(caught)


def test_wait_ready() -> None:
    with Hypervisor(UNREACHABLE) as dead:
        with pytest.raises(TransportError) as caught:
            dead.wait_ready(timeout=SHORT)
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_async_deadlines_and_wait_ready(service: RunningService) -> None:
    async def main() -> None:
        async with AsyncHypervisor(UNREACHABLE) as dead:
            with pytest.raises(TransportError) as caught:
                await dead.wait_ready(timeout=SHORT)
            assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        async with AsyncHypervisor(service.target) as hv:
            await hv.wait_ready(timeout=5)
            async with hv.create_vm(slice_pages=4) as vm:
                with server_stalled(service), pytest.raises(TransportError) as caught:
                    await vm.alloc_pages(timeout=SHORT)
                assert_deadline_exceeded(caught)
                batch = Batch()
                batch.alloc_pages()
                async with vm.stream() as stream:
                    with server_stalled(service), pytest.raises(TransportError) as caught:
                        await stream.execute(batch, timeout=SHORT)
                    assert_deadline_exceeded(caught)
                with server_stalled(service), pytest.raises(TransportError) as caught:
                    await vm.execute(batch, timeout=SHORT)
                assert_deadline_exceeded(caught)

    asyncio.run(main())
