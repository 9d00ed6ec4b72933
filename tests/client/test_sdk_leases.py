"""The SDK's side of VM leases, sync and asyncio: create_vm(lease_seconds=...), vm.renew(),
vm.lease_seconds, and a reaped VM's calls raising NotFoundError."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from pkvm_client import (
    AsyncHypervisor,
    AuthenticationError,
    Hypervisor,
    InvalidArgumentError,
    NotFoundError,
)
from pkvm_sim.service.server import RunningService, ServerSettings

from tests.service.fixtures import start_service

# Leases long enough that a loaded machine's pause between two renewals never outlasts
# them: the tests check which VMs a lease keeps, never how promptly the reaper runs.
DEFAULT = 3.0  # the server's default lease
SHORT = 2.0


@pytest.fixture(scope="module")
def leased_service() -> Iterator[RunningService]:
    running = start_service(settings=ServerSettings(
        listen="127.0.0.1:0", metrics_listen=None, workers=4, vm_lease_seconds=DEFAULT,
        max_vm_lease_seconds=5.0, lease_check_interval=0.05,
    ))
    yield running
    running.stop(0)


def alive(service: RunningService, handle: int) -> bool:
    return handle in service.servicer.tokens


def wait_until_gone(service: RunningService, handle: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(service, handle):
        assert time.monotonic() < deadline, f"VM {handle:#x} was not reaped"
        time.sleep(0.02)


def test_sync_renew(leased_service: RunningService) -> None:
    with Hypervisor(leased_service.target) as hv:
        vm = hv.create_vm(slice_pages=8)
        assert vm.lease_seconds == pytest.approx(DEFAULT)
        short = hv.create_vm(slice_pages=8, lease_seconds=SHORT)
        assert short.lease_seconds == pytest.approx(SHORT)
        deadline = time.monotonic() + 60
        while alive(leased_service, short.handle):  # until the idle one is reaped
            assert time.monotonic() < deadline, "the idle VM was never reaped"
            left = vm.renew()
            assert 0 < left <= DEFAULT
            time.sleep(DEFAULT / 20)
        with pytest.raises(NotFoundError):
            short.alloc_pages()
        with pytest.raises(NotFoundError):
            short.renew()
        vm.put_page(vm.alloc_pages())  # still alive
        with pytest.raises(AuthenticationError):
            hv.attach(vm.handle, "forged").renew()
        attached = hv.attach(vm.handle, vm.token)
        assert attached.lease_seconds is None
        assert attached.renew() > 0 and attached.lease_seconds == pytest.approx(DEFAULT)
        with pytest.raises(InvalidArgumentError):
            hv.create_vm(slice_pages=8, lease_seconds=6.0)
        wait_until_gone(leased_service, vm.handle)
        with pytest.raises(NotFoundError):
            vm.destroy()


def test_async_renew(leased_service: RunningService) -> None:
    async def main() -> None:
        async with AsyncHypervisor(leased_service.target) as hv:
            vm = await hv.create_vm(slice_pages=8, lease_seconds=SHORT)
            assert vm.lease_seconds == pytest.approx(SHORT)
            idle = await hv.create_vm(slice_pages=8, lease_seconds=SHORT)
            deadline = time.monotonic() + 60
            while alive(leased_service, idle.handle):  # until the idle one is reaped
                assert time.monotonic() < deadline, "the idle VM was never reaped"
                left = await vm.renew()
                assert 0 < left <= SHORT
                await asyncio.sleep(SHORT / 20)
            with pytest.raises(NotFoundError):
                await idle.renew()
            await vm.put_page(await vm.alloc_pages())
            with pytest.raises(InvalidArgumentError):
                await hv.create_vm(slice_pages=8, lease_seconds=6.0)
            assert await vm.destroy() > 0

    asyncio.run(main())
