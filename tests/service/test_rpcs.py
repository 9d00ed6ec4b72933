"""Every RPC of pkvm.v1.HypervisorService over a real socket: success and error paths.

Each refusal must carry the right status code and a google.rpc.ErrorInfo (domain pkvm.v1)
and must leave the state unchanged (checked through GetStats / GetPageInfo)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from tests.service.fixtures import RawVM, bearer

Stub = pb2_grpc.HypervisorServiceStub


def refusal(call: object, *args: object, **kwargs: object) -> tuple[grpc.StatusCode, str, dict]:
    """Run a call that must fail; return (code, ErrorInfo.reason, ErrorInfo.metadata)."""
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    status = rpc_status.from_call(caught.value)
    assert status is not None, "no rich status details"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    [info] = infos
    assert info.domain == "pkvm.v1"
    assert info.reason and info.reason == info.reason.upper()
    return caught.value.code(), info.reason, dict(info.metadata)


def hyp_pool(stub: Stub) -> pb2.PoolStats:
    return next(p for p in stub.GetStats(pb2.GetStatsRequest()).pools if p.name == "hyp")


def in_memory(stub: Stub, pfn: int) -> bool:
    return stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=pfn)).owner != "none"


# -- CreateVM / DestroyVM ---------------------------------------------------------------------


def test_create_and_destroy_vm(stub: Stub) -> None:
    before = stub.GetStats(pb2.GetStatsRequest())
    created = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=2, slice_pages=32, name="guest"))
    assert created.vm.name == "guest" and created.vm.nr_vcpus == 2
    assert created.vm.slice_nr_pages == 32 and len(created.token) >= 16
    assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == before.nr_vms + 1
    destroyed = stub.DestroyVM(
        pb2.DestroyVMRequest(handle=created.vm.handle), metadata=bearer(created.token)
    )
    assert destroyed.pages_returned >= 32
    assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == before.nr_vms


def test_create_vm_invalid(stub: Stub) -> None:
    nr_vms = stub.GetStats(pb2.GetStatsRequest()).nr_vms
    code, _, meta = refusal(stub.CreateVM, pb2.CreateVMRequest(nr_vcpus=0, slice_pages=8))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["errno"] == "EINVAL"
    code, _, _ = refusal(stub.CreateVM, pb2.CreateVMRequest(nr_vcpus=1, slice_pages=1 << 40))
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == nr_vms


def test_destroy_unknown_and_twice(stub: Stub) -> None:
    vm = RawVM(stub)
    vm.destroy()
    code, reason, _ = refusal(
        stub.DestroyVM, pb2.DestroyVMRequest(handle=vm.handle), metadata=vm.md
    )
    assert code == grpc.StatusCode.NOT_FOUND and reason == "VM_NOT_FOUND"
    code, _, _ = refusal(stub.DestroyVM, pb2.DestroyVMRequest(handle=0xDEAD_BEEF))
    assert code == grpc.StatusCode.NOT_FOUND


# -- auth -------------------------------------------------------------------------------------


def test_missing_and_wrong_token(stub: Stub, raw_vm: RawVM) -> None:
    other = RawVM(stub)
    try:
        request = pb2.AllocPagesRequest(handle=raw_vm.handle, order=0)
        code, reason, _ = refusal(stub.AllocPages, request)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
        code, reason, _ = refusal(stub.AllocPages, request, metadata=other.md)
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN")
        code, reason, _ = refusal(
            stub.AllocPages, request, metadata=(("authorization", "Basic abc"),)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _, _ = refusal(
            stub.DestroyVM, pb2.DestroyVMRequest(handle=raw_vm.handle), metadata=other.md
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
    finally:
        other.destroy()


# -- AllocPages / PutPage / GetPage ---------------------------------------------------------------


def test_alloc_get_put(stub: Stub, raw_vm: RawVM) -> None:
    free_before = hyp_pool(stub).free_pages
    block = stub.AllocPages(
        pb2.AllocPagesRequest(handle=raw_vm.handle, order=2), metadata=raw_vm.md
    )
    assert block.order == 2 and block.pfn % 4 == 0
    assert hyp_pool(stub).free_pages == free_before - 4
    info = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=block.pfn))
    assert info.refcount == 1 and info.order == 2 and str(raw_vm.handle) in info.owner
    md, handle = raw_vm.md, raw_vm.handle
    get, put = pb2.GetPageRequest, pb2.PutPageRequest
    assert stub.GetPage(get(handle=handle, pfn=block.pfn), metadata=md).refcount == 2
    assert stub.PutPage(put(handle=handle, pfn=block.pfn), metadata=md).refcount == 1
    assert stub.PutPage(put(handle=handle, pfn=block.pfn), metadata=md).refcount == 0
    assert hyp_pool(stub).free_pages == free_before


def test_alloc_from_vm_pool(stub: Stub, raw_vm: RawVM) -> None:
    stub.TopupMemcache(
        pb2.TopupMemcacheRequest(handle=raw_vm.handle, nr_pages=8), metadata=raw_vm.md
    )
    try:
        block = stub.AllocPages(
            pb2.AllocPagesRequest(handle=raw_vm.handle, order=0, pool=pb2.POOL_KIND_VM),
            metadata=raw_vm.md,
        )
    except grpc.RpcError as error:  # a VM pool may hold no free page of its own yet
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        assert block.order == 0


@pytest.mark.parametrize("order", [-1, 64, 1 << 30])
def test_alloc_bad_order(stub: Stub, raw_vm: RawVM, order: int) -> None:
    free_before = hyp_pool(stub).free_pages
    code, _, _ = refusal(
        stub.AllocPages, pb2.AllocPagesRequest(handle=raw_vm.handle, order=order),
        metadata=raw_vm.md,
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert hyp_pool(stub).free_pages == free_before


def test_alloc_bad_pool(stub: Stub, raw_vm: RawVM) -> None:
    code, reason, _ = refusal(
        stub.AllocPages, pb2.AllocPagesRequest(handle=raw_vm.handle, order=0, pool=7),
        metadata=raw_vm.md,
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL")


def test_alloc_until_exhausted(stub: Stub) -> None:
    boot_free = hyp_pool(stub).free_pages  # before the VM: its donations cost hyp tables
    vm = RawVM(stub)
    try:
        pool = hyp_pool(stub)
        order = pool.max_order - 1
        for _ in range(pool.free_pages // (1 << order) + 2):
            try:
                request = pb2.AllocPagesRequest(handle=vm.handle, order=order)
                stub.AllocPages(request, metadata=vm.md)
            except grpc.RpcError:
                break
        code, reason, meta = refusal(
            stub.AllocPages, pb2.AllocPagesRequest(handle=vm.handle, order=order), metadata=vm.md
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and meta["errno"] == "ENOMEM"
        assert hyp_pool(stub).alloc_failures > pool.alloc_failures
    finally:
        vm.destroy()  # reclaims every block it held, and the tables EL2 mapped it with
    assert hyp_pool(stub).free_pages == boot_free


def test_put_errors(stub: Stub, raw_vm: RawVM) -> None:
    md = raw_vm.md
    pfn = stub.AllocPages(pb2.AllocPagesRequest(handle=raw_vm.handle, order=0), metadata=md).pfn
    stub.PutPage(pb2.PutPageRequest(handle=raw_vm.handle, pfn=pfn), metadata=md)
    # put of a page the VM no longer holds: refused, nothing changes
    before = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=pfn))
    request = pb2.PutPageRequest(handle=raw_vm.handle, pfn=pfn)
    code, _, _ = refusal(stub.PutPage, request, metadata=md)
    assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
    assert stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=pfn)) == before
    # a pfn beyond all memory
    code, _, _ = refusal(
        stub.PutPage, pb2.PutPageRequest(handle=raw_vm.handle, pfn=1 << 50), metadata=md
    )
    assert code in (
        grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
    )


def test_foreign_page_is_permission_denied(stub: Stub, raw_vm: RawVM) -> None:
    other = RawVM(stub)
    try:
        pfn = stub.AllocPages(
            pb2.AllocPagesRequest(handle=other.handle, order=0), metadata=other.md
        ).pfn
        for call, request_type in ((stub.PutPage, pb2.PutPageRequest),
                                   (stub.GetPage, pb2.GetPageRequest)):
            code, _, _ = refusal(call, request_type(handle=raw_vm.handle, pfn=pfn),
                                 metadata=raw_vm.md)
            assert code == grpc.StatusCode.PERMISSION_DENIED
        assert stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=pfn)).refcount == 1
    finally:
        other.destroy()


# -- sharing ----------------------------------------------------------------------------------


def test_share_pin_unshare(stub: Stub, raw_vm: RawVM) -> None:
    md, handle = raw_vm.md, raw_vm.handle
    pfn = raw_vm.vm.slice_base_pfn
    shared = stub.HostShare(pb2.HostShareRequest(handle=handle, pfn=pfn, nr_pages=2), metadata=md)
    assert shared.nr_pages == 2
    assert shared.host_state == pb2.PAGE_STATE_SHARED_OWNED
    assert shared.hyp_state == pb2.PAGE_STATE_SHARED_BORROWED
    # sharing again is a state-machine refusal
    code, _, _ = refusal(stub.HostShare, pb2.HostShareRequest(handle=handle, pfn=pfn), metadata=md)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    stub.PinShared(pb2.PinSharedRequest(handle=handle, pfn=pfn), metadata=md)
    code, reason, meta = refusal(
        stub.HostUnshare, pb2.HostUnshareRequest(handle=handle, pfn=pfn, nr_pages=2), metadata=md
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION and meta["errno"] == "EBUSY"
    stub.UnpinShared(pb2.UnpinSharedRequest(handle=handle, pfn=pfn), metadata=md)
    unshared = stub.HostUnshare(
        pb2.HostUnshareRequest(handle=handle, pfn=pfn, nr_pages=2), metadata=md
    )
    assert unshared.host_state == pb2.PAGE_STATE_OWNED


def test_share_outside_slice(stub: Stub, raw_vm: RawVM) -> None:
    other = RawVM(stub)
    try:
        code, _, _ = refusal(
            stub.HostShare,
            pb2.HostShareRequest(handle=raw_vm.handle, pfn=other.vm.slice_base_pfn),
            metadata=raw_vm.md,
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _, _ = refusal(
            stub.HostUnshare,
            pb2.HostUnshareRequest(handle=raw_vm.handle, pfn=raw_vm.vm.slice_base_pfn),
            metadata=raw_vm.md,
        )
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION)
    finally:
        other.destroy()


# -- host stage-2 faults --------------------------------------------------------------------


MMIO_ADDR = 0x0900_0000  # below the default memblock at 0x8000_0000
MEMORY_ADDR = 0x8000_1000


def test_map_mmio(stub: Stub) -> None:
    fault = stub.MapMMIO(pb2.MapMMIORequest(addr=MMIO_ADDR)).fault
    assert not fault.is_memory
    assert fault.outcome in (pb2.FAULT_OUTCOME_MAPPED, pb2.FAULT_OUTCOME_SPURIOUS)
    assert fault.range_start <= MMIO_ADDR < fault.range_end and fault.level in (1, 2, 3)
    again = stub.MapMMIO(pb2.MapMMIORequest(addr=MMIO_ADDR)).fault
    assert again.outcome == pb2.FAULT_OUTCOME_SPURIOUS


def test_map_mmio_on_memory_is_invalid(stub: Stub) -> None:
    code, _, _ = refusal(stub.MapMMIO, pb2.MapMMIORequest(addr=MEMORY_ADDR))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_host_fault_memory(stub: Stub) -> None:
    fault = stub.HostFault(pb2.HostFaultRequest(addr=MEMORY_ADDR)).fault
    assert fault.is_memory and fault.range_start <= MEMORY_ADDR < fault.range_end
    assert fault.outcome in (pb2.FAULT_OUTCOME_MAPPED, pb2.FAULT_OUTCOME_SPURIOUS)


def test_host_fault_on_hyp_memory_is_fatal(stub: Stub) -> None:
    carveout = stub.Reserve(pb2.ReserveRequest()).carveout_base
    stats_before = stub.GetStats(pb2.GetStatsRequest())
    fault = stub.HostFault(pb2.HostFaultRequest(addr=carveout + 0x1000)).fault
    assert fault.outcome == pb2.FAULT_OUTCOME_FATAL and fault.errno_name and fault.reason
    after = stub.GetStats(pb2.GetStatsRequest())
    assert [p.free_pages for p in after.pools] == [p.free_pages for p in stats_before.pools]


def test_host_fault_beyond_ipa(stub: Stub) -> None:
    code, _, _ = refusal(stub.HostFault, pb2.HostFaultRequest(addr=1 << 60))
    assert code in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT)


# -- guest stage-2 ------------------------------------------------------------------------------


def test_topup_and_guest_map(stub: Stub, raw_vm: RawVM) -> None:
    md, handle = raw_vm.md, raw_vm.handle
    size = stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=handle, nr_pages=4), metadata=md)
    assert size.memcache_pages >= 4
    pfn = raw_vm.vm.slice_base_pfn + 3
    request = pb2.GuestMapRequest(handle=handle, ipa=0x4000_0000, pfn=pfn)
    mapped = stub.GuestMap(request, metadata=md)
    assert mapped.ipa == 0x4000_0000 and mapped.pfn == pfn and mapped.level in (1, 2, 3)


def test_topup_too_big(stub: Stub, raw_vm: RawVM) -> None:
    code, _, _ = refusal(
        stub.TopupMemcache, pb2.TopupMemcacheRequest(handle=raw_vm.handle, nr_pages=1 << 40),
        metadata=raw_vm.md,
    )
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)


def test_guest_map_errors(stub: Stub, raw_vm: RawVM) -> None:
    md, handle = raw_vm.md, raw_vm.handle
    stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=handle, nr_pages=4), metadata=md)
    pfn = raw_vm.vm.slice_base_pfn
    code, _, _ = refusal(  # misaligned IPA
        stub.GuestMap, pb2.GuestMapRequest(handle=handle, ipa=0x123, pfn=pfn), metadata=md
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    other = RawVM(stub)
    try:
        code, _, _ = refusal(  # a page outside the VM's slice
            stub.GuestMap,
            pb2.GuestMapRequest(handle=handle, ipa=0x5000_0000, pfn=other.vm.slice_base_pfn),
            metadata=md,
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        other.destroy()


# -- read-only views ------------------------------------------------------------------------------


def test_get_stats(stub: Stub) -> None:
    stats = stub.GetStats(pb2.GetStatsRequest())
    names = {p.name for p in stats.pools}
    assert {"hyp", "host_s2"} <= names
    for pool in stats.pools:
        assert pool.free_pages + pool.allocated_pages + pool.reserved_pages == pool.total_pages
        assert sum(n << o for o, n in enumerate(pool.free_blocks_per_order)) == pool.free_pages
    assert stats.vmemmap.bytes_per_gib == 4 * 262144
    assert stats.hyp_mem_pages == 5164


def test_get_page_info(stub: Stub) -> None:
    info = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=0x80000))
    assert info.pfn == 0x80000 and info.owner
    hole = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=0x100))  # not memory
    assert hole.owner == "none"


def test_get_page_info_out_of_range(stub: Stub) -> None:
    try:
        info = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=1 << 60))
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT)
    else:
        assert info.owner == "none" and not info.covered


def test_reserve_matches_quick_start(stub: Stub) -> None:
    report = stub.Reserve(pb2.ReserveRequest())
    assert (report.hyp_s1_pgtable_pages, report.host_s2_pgtable_pages) == (2569, 2585)
    assert (report.vmemmap_pages, report.hyp_mem_pages) == (10, 5164)
    assert report.reserved_bytes == 22 << 20 and report.carveout_base == 0x1_7EA0_0000
    assert [r.name for r in report.regions] == ["vmemmap", "hyp", "host_s2", "slack"]
