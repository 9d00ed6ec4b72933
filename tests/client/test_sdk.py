"""The Python SDK against the real server over a real socket: sync and asyncio."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pkvm_client
import pytest
from pkvm_client import (
    AsyncHypervisor,
    AuthenticationError,
    Batch,
    BusyError,
    FailedPreconditionError,
    Hypervisor,
    InvalidArgumentError,
    NotFoundError,
    OutOfMemoryError,
    PermissionDeniedError,
    PkvmError,
    TransportError,
    WouldPanicError,
)
from pkvm_sim.service.server import RunningService


@pytest.fixture(scope="module")
def hv(service: RunningService) -> Hypervisor:
    with Hypervisor(service.target) as connection:
        yield connection  # type: ignore[misc]


def hyp_free(hv: Hypervisor) -> int:
    return next(p.free_pages for p in hv.stats().pools if p.name == "hyp")


def test_public_surface() -> None:
    assert sorted(pkvm_client.__all__) == sorted(
        name for name in dir(pkvm_client) if not name.startswith("_")
        and name not in {"annotations"}
    )
    for name in pkvm_client.__all__:
        assert getattr(pkvm_client, name) is not None


def test_sdk_does_not_import_the_simulator() -> None:
    import subprocess
    import sys

    code = "import sys, pkvm_client; assert not any(m.startswith('pkvm_sim') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vm_lifecycle(hv: Hypervisor) -> None:
    before = hyp_free(hv)
    with hv.create_vm(nr_vcpus=2, slice_pages=32, name="sdk") as vm:
        created = hyp_free(hv)  # EL2 maps the donated pages: hyp stage-1 tables
        assert vm.info.name == "sdk"
        pfn = vm.alloc_pages(order=1)
        assert vm.get_page(pfn) == 2
        assert vm.put_page(pfn) == 1
        vm.alloc_pages()  # left held: destroy reclaims it
        assert hyp_free(hv) == created - 3
    assert vm.destroyed and hyp_free(hv) == before


def test_sharing_and_guest(hv: Hypervisor) -> None:
    with hv.create_vm(slice_pages=16) as vm:
        base = vm.info.slice_base_pfn
        vm.host_share(base, 2)
        vm.pin_shared(base)
        with pytest.raises(BusyError) as caught:
            vm.host_unshare(base, 2)
        assert caught.value.errno == "EBUSY" and isinstance(caught.value, FailedPreconditionError)
        vm.unpin_shared(base)
        vm.host_unshare(base, 2)
        assert vm.topup_memcache(4) >= 4
        assert vm.guest_map(0x4000_0000, base + 2).pfn == base + 2
        assert vm.map_mmio(0x0B00_0000).range_start <= 0x0B00_0000
        assert vm.host_fault(0x8040_0000).is_memory


def test_typed_errors(hv: Hypervisor) -> None:
    with hv.create_vm(slice_pages=16) as vm, hv.create_vm(slice_pages=16) as other:
        with pytest.raises(InvalidArgumentError):
            vm.alloc_pages(order=-1)
        with pytest.raises(ValueError):
            vm.alloc_pages(pool="nope")
        pfn = other.alloc_pages()
        with pytest.raises(PermissionDeniedError) as caught:
            vm.put_page(pfn)
        assert not isinstance(caught.value, AuthenticationError)
        with pytest.raises(AuthenticationError):
            hv.attach(vm.handle, other.token).alloc_pages()
        with pytest.raises(OutOfMemoryError):
            vm.alloc_pages(order=11)  # order >= the pool's max_order: -ENOMEM (2.4)
        with pytest.raises(InvalidArgumentError):
            vm.topup_memcache(1 << 40)  # more than MAX_PAGES_PER_CALL
        with pytest.raises(InvalidArgumentError):
            hv.map_mmio(0x8000_0000)
        carveout = hv.reserve().carveout_base
        fault = hv.host_fault(carveout)
        assert fault.errno_name  # FATAL is a reported outcome, not an exception
    with pytest.raises(NotFoundError):
        vm.destroy()


def test_would_panic_and_batch_helpers(hv: Hypervisor) -> None:
    with hv.create_vm(slice_pages=16) as vm:
        batch = Batch()
        indices = [batch.alloc_pages(0) for _ in range(8)]
        result = vm.execute(batch)
        assert result.ok and len(result) == 8 and result.completed == 8
        pfns = [result.value(i) for i in indices]
        puts = Batch()
        for pfn in pfns:
            puts.put_page(pfn)
        bad = puts.put_page(pfns[0])  # already free: the kernel would BUG
        result = vm.execute(puts)
        assert not result.ok
        with pytest.raises(PkvmError) as caught:
            result.value(bad)
        assert isinstance(caught.value, (WouldPanicError, FailedPreconditionError,
                                         PermissionDeniedError))
        assert list(result)[:8] == [0] * 8
        with pytest.raises(ValueError):
            vm.execute(Batch())
        with vm.stream() as stream:
            for _ in range(5):
                b = Batch(stop_on_error=True)
                a = b.alloc_pages(0)
                b.put_page(1 << 20)  # not this VM's
                b.alloc_pages(0)
                r = stream.execute(b)
                assert r.values[a] and r.codes[2] == grpc.StatusCode.ABORTED.value[0]
                vm.put_page(r.value(a))


def test_concurrent_vms(hv: Hypervisor) -> None:
    before = hyp_free(hv)

    def client(i: int) -> int:
        with hv.create_vm(slice_pages=8, name=f"c{i}") as vm:
            for _ in range(20):
                vm.put_page(vm.alloc_pages(i % 3))
            return vm.handle

    with ThreadPoolExecutor(16) as pool:
        handles = list(pool.map(client, range(16)))
    assert len(handles) == 16 and hyp_free(hv) == before


def test_unreachable_server_is_transport_error() -> None:
    with Hypervisor("127.0.0.1:1", timeout=0.5) as dead, pytest.raises(TransportError):
        dead.stats()


def test_async_twin(service: RunningService) -> None:
    async def main() -> None:
        async with AsyncHypervisor(service.target) as hv:
            before = next(p.free_pages for p in (await hv.stats()).pools if p.name == "hyp")
            async with await hv.create_vm(slice_pages=16) as vm:
                pfn = await vm.alloc_pages(order=2)
                assert await vm.get_page(pfn) == 2
                assert await vm.put_page(pfn) == 1
                assert await vm.put_page(pfn) == 0
                with pytest.raises(InvalidArgumentError):
                    await vm.alloc_pages(order=-3)
                base = vm.info.slice_base_pfn
                await vm.host_share(base)
                await vm.host_unshare(base)
                batch = Batch()
                for _ in range(4):
                    batch.alloc_pages(0)
                result = await vm.execute(batch)
                assert result.completed == 4
                async with vm.stream() as stream:
                    puts = Batch()
                    for pfn in result.values:
                        puts.put_page(pfn)
                    assert (await stream.execute(puts)).ok
                vms = [await hv.create_vm(slice_pages=4) for _ in range(4)]
                pfns = await asyncio.gather(*(v.alloc_pages() for v in vms))
                assert len(set(pfns)) == 4
                await asyncio.gather(*(v.destroy() for v in vms))
            with pytest.raises(NotFoundError):
                await vm.destroy()
            assert (await hv.reserve()).hyp_mem_pages == 5164
            assert (await hv.page_info(0x80000)).pfn == 0x80000
            after = next(p.free_pages for p in (await hv.stats()).pools if p.name == "hyp")
            assert after == before

    asyncio.run(main())
