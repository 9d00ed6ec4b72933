"""The Python SDK against the real server over a real socket: sync and asyncio."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from pkvm_client import (
    AsyncHypervisor,
    AsyncVM,
    AuthenticationError,
    Batch,
    BusyError,
    FailedPreconditionError,
    Fault,
    FaultOutcome,
    GuestMapping,
    Hypervisor,
    InvalidArgumentError,
    NotFoundError,
    OutOfMemoryError,
    OutOfRangeError,
    PageInfo,
    PageState,
    PermissionDeniedError,
    PkvmError,
    Pool,
    Reservation,
    ShareResult,
    Stats,
    TransportError,
    VmInfo,
    WouldPanicError,
)
from pkvm_sim.service.server import RunningService


@pytest.fixture(scope="module")
def hv(service: RunningService) -> Hypervisor:
    with Hypervisor(service.target) as connection:
        yield connection  # type: ignore[misc]


def hyp_free(hv: Hypervisor) -> int:
    return hv.stats().pool("hyp").free_pages


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
        shared = vm.host_share(base, 2)
        assert shared == ShareResult(base, 2, PageState.SHARED_OWNED, PageState.SHARED_BORROWED,
                                     pages_done=2, failed_pfn=None, failed_reason="",
                                     failed_errno="")
        vm.pin_shared(base)
        with pytest.raises(BusyError) as caught:
            vm.host_unshare(base, 2)
        assert caught.value.errno == "EBUSY" and isinstance(caught.value, FailedPreconditionError)
        vm.unpin_shared(base)
        assert vm.host_unshare(base, 2).host_state is PageState.OWNED
        assert vm.topup_memcache(4) >= 4
        mapping = vm.guest_map(0x4000_0000, base + 2)
        assert isinstance(mapping, GuestMapping) and mapping.pfn == base + 2
        mmio = vm.map_mmio(0x0B00_0000)
        assert isinstance(mmio, Fault) and mmio.range_start <= 0x0B00_0000
        assert mmio.outcome in (FaultOutcome.MAPPED, FaultOutcome.SPURIOUS)
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
        assert fault.outcome is FaultOutcome.FATAL  # a reported outcome, not an exception
        assert fault.errno_name
    assert vm.destroyed and vm.destroy() == 0  # idempotent: nothing is sent
    with pytest.raises(NotFoundError):  # another handle on the destroyed VM
        hv.attach(vm.handle, vm.token).destroy()


def test_put_page_beyond_ram_is_out_of_range(hv: Hypervisor) -> None:
    """service.md's table: ERANGE -> OutOfRangeError for a pfn outside memory; a RAM pfn the
    VM does not own stays PermissionDenied (NOT_OWNER)."""
    ram_start, end_of_ram = 0x8000_0000 >> 12, (0x8000_0000 + (4 << 30)) >> 12  # the default
    with hv.create_vm(slice_pages=4) as vm:                                   # memblock
        for pfn in (end_of_ram, 1 << 50, (1 << 64) - 1, 0, ram_start - 1):
            with pytest.raises(OutOfRangeError) as caught:
                vm.put_page(pfn)
            assert caught.value.reason == "PFN_OUT_OF_RANGE" and caught.value.errno == "ERANGE"
        with pytest.raises(PermissionDeniedError):
            vm.put_page(end_of_ram - 1)


def test_typed_results(hv: Hypervisor) -> None:
    stats = hv.stats()
    assert isinstance(stats, Stats) and isinstance(stats.pools, tuple)
    assert stats.pool("hyp") is next(p for p in stats.pools if p.name == "hyp")
    with pytest.raises(KeyError):
        stats.pool("nope")
    with pytest.raises(AttributeError):
        stats.nr_vms = 3  # type: ignore[misc]  # frozen
    hole = hv.page_info(0x1000)  # below RAM: no vmemmap entry, so no refcount or order
    assert isinstance(hole, PageInfo) and hole.owner == "none" and not hole.covered
    assert hole.refcount is None and hole.order is None and hole.pool == ""
    assert hole.host_state is PageState.NOPAGE
    hyp = hv.page_info(stats.pool("hyp").base_pfn)
    assert hyp.covered and hyp.refcount is not None and hyp.pool == "hyp"
    reservation = hv.reserve()
    assert isinstance(reservation, Reservation) and reservation.page_size == 4096
    assert {r.name for r in reservation.regions} >= {"vmemmap", "hyp"}
    with hv.create_vm(slice_pages=8, name="typed") as vm:
        assert isinstance(vm.info, VmInfo) and vm.info.name == "typed"
        assert vm.info.slice_nr_pages == 8
        mine = hv.page_info(vm.info.slice_base_pfn)  # the VMM's memory is the host's
        assert mine.owner == "host" and mine.host_state is PageState.OWNED
        assert mine.hyp_state is PageState.NOPAGE
        head = vm.alloc_pages(pool=Pool.HYP)
        assert vm.put_page(head) == 0
        assert vm.alloc_pages(pool="hyp")  # the enum's name works too
        with pytest.raises(ValueError):
            vm.alloc_pages(pool=7)  # type: ignore[arg-type]


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
            await hv.wait_ready(timeout=5)
            async with hv.create_vm(slice_pages=16) as vm:  # one await-less form
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
            assert vm.destroyed and await vm.destroy() == 0  # idempotent
            with pytest.raises(NotFoundError):
                await hv.attach(vm.handle, vm.token).destroy()
            async with await hv.create_vm(slice_pages=4) as old_form:  # still supported
                assert isinstance(old_form, AsyncVM)
            assert old_form.destroyed
            assert (await hv.reserve()).hyp_mem_pages == 5164
            assert (await hv.page_info(0x80000)).pfn == 0x80000
            after = next(p.free_pages for p in (await hv.stats()).pools if p.name == "hyp")
            assert after == before

    asyncio.run(main())
