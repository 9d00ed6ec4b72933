"""Execute: packed batches, per-op status codes, batch bounds, auth, stop_on_error."""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from grpc_status import rpc_status
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from tests.service.fixtures import RawVM

Stub = pb2_grpc.HypervisorServiceStub
OK, INVALID_ARGUMENT, FAILED_PRECONDITION, PERMISSION_DENIED, ABORTED = 0, 3, 9, 7, 10


def execute(stub: Stub, vm: RawVM, *requests: pb2.ExecuteRequest) -> list[pb2.ExecuteResponse]:
    return list(stub.Execute(iter(requests), metadata=vm.md))


def free_pages(stub: Stub) -> int:
    return next(p.free_pages for p in stub.GetStats(pb2.GetStatsRequest()).pools if p.name == "hyp")


def test_alloc_put_batch(stub: Stub, raw_vm: RawVM) -> None:
    before = free_pages(stub)
    n = 64
    [allocated] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * n, arg0=[0] * n, batch_id=7
    ))
    assert allocated.batch_id == 7 and allocated.completed == n
    assert list(allocated.codes) == [OK] * n and not allocated.errors
    pfns = list(allocated.values)
    assert len(set(pfns)) == n
    assert free_pages(stub) == before - n
    [put] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE] * n, arg0=pfns
    ))
    assert list(put.values) == [0] * n and put.completed == n
    assert free_pages(stub) == before


@pytest.mark.parametrize("n", [1, 300, 2048])
def test_an_all_ok_batch_reports_one_ok_code_and_one_value_per_op(
    stub: Stub, raw_vm: RawVM, n: int
) -> None:
    """Whatever the size (up to what the test pool holds), and after a batch of another
    size on the same stream: n codes, all OK, next to the n values."""
    allocs = [pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * size,
                                 batch_id=size) for size in (2, n)]
    small, allocated = execute(stub, raw_vm, *allocs)
    assert list(small.codes) == [OK, OK] and len(small.values) == 2
    assert allocated.batch_id == n and allocated.completed == n and not allocated.errors
    assert list(allocated.codes) == [OK] * n
    assert len(set(allocated.values)) == n and not set(allocated.values) & set(small.values)
    pfns = [*small.values, *allocated.values]
    [put] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE] * len(pfns), arg0=pfns))
    assert list(put.codes) == [OK] * len(pfns) and list(put.values) == [0] * len(pfns)


def test_many_batches_on_one_stream(stub: Stub, raw_vm: RawVM) -> None:
    def batches():  # type: ignore[no-untyped-def]
        for i in range(20):
            yield pb2.ExecuteRequest(
                handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES, pb2.BATCH_OP_GET_PAGE],
                arg0=[0], batch_id=i,
            )
    responses = list(stub.Execute(batches(), metadata=raw_vm.md))
    assert [r.batch_id for r in responses] == list(range(20))
    # op 2 is get_page(pfn 0): refused, op 1 done: one failure does not abort the batch
    for response in responses:
        assert response.codes[0] == OK and response.codes[1] != OK
        assert response.completed == 1 and [e.index for e in response.errors] == [1]


def test_per_op_errors_and_unknown_op(stub: Stub, raw_vm: RawVM) -> None:
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle,
        ops=[pb2.BATCH_OP_ALLOC_PAGES, pb2.BATCH_OP_UNSPECIFIED, 99, pb2.BATCH_OP_ALLOC_PAGES],
        arg0=[0, 0, 0, -1],
    ))
    assert list(response.codes) == [OK, INVALID_ARGUMENT, INVALID_ARGUMENT, INVALID_ARGUMENT]
    assert [e.index for e in response.errors] == [1, 2, 3]
    assert response.errors[0].reason == "INVALID_OP"
    pfn = response.values[0]
    execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE], arg0=[pfn]))


def test_stop_on_error(stub: Stub, raw_vm: RawVM) -> None:
    before = free_pages(stub)
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, stop_on_error=True,
        ops=[pb2.BATCH_OP_ALLOC_PAGES, pb2.BATCH_OP_ALLOC_PAGES, pb2.BATCH_OP_ALLOC_PAGES],
        arg0=[0, -5, 0],
    ))
    assert list(response.codes) == [OK, INVALID_ARGUMENT, ABORTED]
    assert response.completed == 1 and free_pages(stub) == before - 1


def test_every_batch_op(stub: Stub, raw_vm: RawVM) -> None:
    base = raw_vm.vm.slice_base_pfn
    ops = [
        (pb2.BATCH_OP_ALLOC_PAGES, 1, pb2.POOL_KIND_HYP),
        (pb2.BATCH_OP_HOST_SHARE, base, 1),
        (pb2.BATCH_OP_HOST_UNSHARE, base, 1),
        (pb2.BATCH_OP_MAP_MMIO, 0x0A00_0000, 0),
        (pb2.BATCH_OP_HOST_FAULT, 0x8020_0000, 0),
        (pb2.BATCH_OP_TOPUP_MEMCACHE, 4, 0),
        (pb2.BATCH_OP_GUEST_MAP, 0x4000_0000, base + 1),
    ]
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[o for o, _, _ in ops], arg0=[a for _, a, _ in ops],
        arg1=[b for _, _, b in ops],
    ))
    assert list(response.codes) == [OK] * len(ops), response.errors
    pfn, shared, unshared, mmio, mem, memcache, level = response.values
    assert shared == unshared == base and mmio <= 0x0A00_0000 and mem <= 0x8020_0000
    assert memcache >= 4 and level in (1, 2, 3)
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_GET_PAGE, pb2.BATCH_OP_PUT_PAGE,
                                   pb2.BATCH_OP_PUT_PAGE],
        arg0=[pfn, pfn, pfn],
    ))
    assert list(response.values) == [2, 1, 0]


def test_fatal_fault_in_batch(stub: Stub, raw_vm: RawVM) -> None:
    carveout = stub.Reserve(pb2.ReserveRequest()).carveout_base
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_HOST_FAULT], arg0=[carveout]))
    assert list(response.codes) == [FAILED_PRECONDITION]
    assert response.errors[0].would_panic


@pytest.mark.parametrize("n", [0, 4097])
def test_empty_or_oversize_batch(stub: Stub, raw_vm: RawVM, n: int) -> None:
    before = free_pages(stub)
    good = pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES], batch_id=1)
    bad = pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * n)
    responses = stub.Execute(iter([good, bad, good]), metadata=raw_vm.md)
    first = next(responses)  # the batch before the bad one is done and reported
    assert first.completed == 1
    with pytest.raises(grpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(caught.value)
    assert status is not None and len(status.details) == 1
    assert free_pages(stub) == before - 1  # the batch after the bad one never ran
    execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE], arg0=[first.values[0]]))


def test_execute_auth(stub: Stub, raw_vm: RawVM) -> None:
    request = pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Execute(iter([request])))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    other = RawVM(stub)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Execute(iter([request]), metadata=other.md))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Execute(iter([pb2.ExecuteRequest(handle=0xBAD, ops=[1])]), metadata=other.md))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        other.destroy()


def test_foreign_page_in_batch(stub: Stub, raw_vm: RawVM) -> None:
    other = RawVM(stub)
    try:
        [mine] = execute(stub, other, pb2.ExecuteRequest(
            handle=other.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES]))
        [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
            handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE], arg0=[mine.values[0]]))
        assert list(response.codes) == [PERMISSION_DENIED]
    finally:
        other.destroy()


def test_disconnect_mid_stream_keeps_reported_batches(stub: Stub, raw_vm: RawVM) -> None:
    before = free_pages(stub)

    def batches():  # type: ignore[no-untyped-def]
        for _ in range(3):
            yield pb2.ExecuteRequest(handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * 8)
        raise RuntimeError("client dies")  # the client side cancels the call

    call = stub.Execute(batches(), metadata=raw_vm.md)
    seen = []
    with pytest.raises(grpc.RpcError):
        for response in call:
            seen.append(response)
    done = before - free_pages(stub)
    assert done % 8 == 0 and done >= 8 * len(seen)  # whole batches only, never half of one


def test_a_refusal_inside_a_run_of_puts_reports_that_op_and_runs_the_rest(
    stub: Stub, raw_vm: RawVM
) -> None:
    """Runs of identical ops take the core's run path; per-op semantics must not change."""
    before = free_pages(stub)
    [allocated] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * 6, arg0=[0] * 6))
    pfns = list(allocated.values)
    # put a, put b, put b again (now free: refused), put c..f
    [put] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE] * 7,
        arg0=[pfns[0], pfns[1], pfns[1], *pfns[2:]]))
    assert list(put.codes) == [OK, OK, PERMISSION_DENIED, OK, OK, OK, OK]
    assert [e.index for e in put.errors] == [2] and put.errors[0].reason == "NOT_OWNER"
    assert put.completed == 6 and free_pages(stub) == before


def test_a_run_of_allocs_that_exhausts_the_pool_stops_at_the_first_failure(
    stub: Stub, raw_vm: RawVM
) -> None:
    big = 10  # order 10 blocks: the hyp pool holds only a handful
    [response] = execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, stop_on_error=True, ops=[pb2.BATCH_OP_ALLOC_PAGES] * 64,
        arg0=[big] * 64))
    first_refused = response.errors[0].index
    assert response.completed == first_refused > 0
    assert list(response.codes[:first_refused]) == [OK] * first_refused
    assert response.codes[first_refused] == 8  # RESOURCE_EXHAUSTED
    assert response.errors[0].reason == "POOL_EXHAUSTED"
    assert list(response.codes[first_refused + 1:]) == [ABORTED] * (63 - first_refused)
    pfns = list(response.values[:first_refused])
    assert all(pfn % (1 << big) == 0 for pfn in pfns) and len(set(pfns)) == first_refused
    execute(stub, raw_vm, pb2.ExecuteRequest(
        handle=raw_vm.handle, ops=[pb2.BATCH_OP_PUT_PAGE] * first_refused, arg0=pfns))


def test_operations_are_counted_once_each_across_chunks(raw_vm: RawVM) -> None:
    """pkvm_operations_total counts every op that ran and was not refused, once, however the
    batch was cut in chunks (each chunk counts its own, under the simulator lock). With
    1-microsecond chunks batches of 200 and 400 ops run in hundreds of chunks."""
    from tests.service.fixtures import TEST_SETTINGS, start_service

    service = start_service(settings=dataclasses.replace(TEST_SETTINGS, chunk_seconds=1e-6))
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = Stub(channel)  # type: ignore[no-untyped-call]
            vm = RawVM(stub)
            operations = service.servicer.counters.operations
            allocs_before, puts_before = operations["alloc_pages"], operations["put_page"]
            n = 200
            [allocated] = execute(stub, vm, pb2.ExecuteRequest(
                handle=vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES] * n))
            pfns = list(allocated.values)
            # n good puts, each followed by a put of page 0 (not the VM's: refused).
            puts = [pb2.BATCH_OP_PUT_PAGE] * (2 * n)
            args = [value for pfn in pfns for value in (pfn, 0)]
            [put] = execute(stub, vm, pb2.ExecuteRequest(handle=vm.handle, ops=puts, arg0=args))
            assert list(put.codes[0::2]) == [OK] * n
            assert all(code != OK for code in put.codes[1::2])
            assert operations["alloc_pages"] - allocs_before == n
            assert operations["put_page"] - puts_before == n
    finally:
        service.stop(0)
