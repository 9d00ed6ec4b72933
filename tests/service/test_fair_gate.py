"""A tenant's calls pass the gate one at a time (service/fairness.py, TenantGate), end to end:
the real service on a loopback port, real gRPC clients.

Tenant A keeps 16 calls in flight on one connection: 16 Execute streams of 1-operation
batches, or 16 threads of unary calls, each a 256-page share or unshare (a job of about a
millisecond on the fair worker). Without the gate, every one of them reaches the fair lock
and queues there, so A has up to 16 jobs outstanding, each one with steps on the event loop
ahead of any other tenant's. With the gate, A's other calls wait before any work (a stream
does not even read its next batch), so A never has more than one job queued or running.
We count A's outstanding jobs at every submission: an ordering fact, not a duration.
The gate holds a tenant back only while another is about (alone, A's calls would all pass):
tenant B makes one call at a time on a connection of its own throughout, and a third tenant
holds a slot past the gate for the whole flood, as a long call would, so that another tenant
is about even when B's client thread is starved for longer than the gate's memory of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.service.fairness import FairLock
from pkvm_sim.service.server import RunningService

from tests.service.fixtures import bearer, start_service
from tests.waiting import wait_for

PAGES = 256  # the default max_pages_per_op
A_CALLS = 16  # 4 VMs x max_streams_per_vm, or 16 threads of unary calls
A_JOBS = 400  # A's jobs to watch
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class Outstanding:
    """Counts each tenant's jobs submitted to the fair lock and not finished yet, and the
    most a tenant ever had at once (wraps the two ways in: FairLock.submit, and the inline
    run of FairLock.run_now)."""

    def __init__(self, fair: FairLock) -> None:
        self.now: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.jobs = 0
        self._guard = threading.Lock()  # jobs finish on the worker thread
        run_now, submit = fair.run_now, fair.submit

        def counted_run_now(tenant: str, fn: Callable[..., Any], *args: Any) -> Any:
            # A job counts once it runs: run_now may answer Queue.JOB without running it
            # (then it is submitted, and counted there).
            return run_now(tenant, self._counted(tenant, fn, args, on_start=True))

        def counted_submit(tenant: str, fn: Callable[..., Any], *args: Any) -> Any:
            return submit(tenant, self._counted(tenant, fn, args))

        fair.run_now = counted_run_now  # type: ignore[method-assign]
        fair.submit = counted_submit  # type: ignore[method-assign]

    def _arrived(self, tenant: str) -> None:
        with self._guard:
            self.now[tenant] = self.now.get(tenant, 0) + 1
            self.most[tenant] = max(self.most.get(tenant, 0), self.now[tenant])

    def _counted(self, tenant: str, fn: Callable[..., Any], args: tuple[Any, ...],
                 *, on_start: bool = False) -> Callable[[], Any]:
        if not on_start:
            self._arrived(tenant)

        def job() -> Any:
            if on_start:
                self._arrived(tenant)
            try:
                return fn(*args)
            finally:
                with self._guard:
                    self.now[tenant] -= 1
                    self.jobs += 1

        return job


def _stream(stub: Any, vm: Any, pfn: int, running: threading.Event) -> None:
    def requests() -> Iterator[pb2.ExecuteRequest]:
        while running.is_set():
            for op in (pb2.BATCH_OP_HOST_SHARE, pb2.BATCH_OP_HOST_UNSHARE):
                yield pb2.ExecuteRequest(handle=vm.vm.handle, ops=[op], arg0=[pfn],
                                         arg1=[PAGES])

    for response in stub.Execute(requests(), metadata=bearer(vm.token), timeout=300):
        assert list(response.codes) == [0]


def _light_tenant(stub: Any, vm: Any, running: threading.Event, calls: list[int]) -> None:
    """Tenant B: AllocPages + PutPage, one call at a time, until told to stop."""
    md, handle = bearer(vm.token), vm.vm.handle
    while running.is_set():
        pfn = stub.AllocPages(pb2.AllocPagesRequest(handle=handle, order=0), metadata=md,
                              timeout=300).pfn
        stub.PutPage(pb2.PutPageRequest(handle=handle, pfn=pfn), metadata=md, timeout=300)
        calls.append(2)


def _unary(stub: Any, vm: Any, pfn: int, running: threading.Event) -> None:
    md, handle = bearer(vm.token), vm.vm.handle
    while running.is_set():
        stub.HostShare(pb2.HostShareRequest(handle=handle, pfn=pfn, nr_pages=PAGES),
                       metadata=md, timeout=300)
        stub.HostUnshare(pb2.HostUnshareRequest(handle=handle, pfn=pfn, nr_pages=PAGES),
                         metadata=md, timeout=300)


LONG_CALL_TENANT = "a tenant with a long call in progress"


def hold_a_slot(service: RunningService, hold: bool) -> None:
    """Take (or give back) a slot past the gate for LONG_CALL_TENANT, on the server's loop."""
    gate = service.servicer.gate

    async def change() -> None:
        if hold:
            assert gate.try_enter(LONG_CALL_TENANT)
        else:
            gate.leave(LONG_CALL_TENANT)

    service.runner.call(change(), timeout=60)


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    running = start_service()
    yield running
    running.stop(0)


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["streams", "unary"])
def test_a_flooding_tenant_has_one_job_outstanding_at_a_time(service: RunningService,
                                                              shape: str) -> None:
    outstanding = Outstanding(service.servicer.fair)
    running = threading.Event()
    running.set()
    errors: list[BaseException] = []
    b_calls: list[int] = []
    with grpc.insecure_channel(service.target, options=OWN_CONNECTION) as channel, \
            grpc.insecure_channel(service.target, options=OWN_CONNECTION) as b_channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)  # type: ignore[no-untyped-call]
        b_stub = pb2_grpc.HypervisorServiceStub(b_channel)  # type: ignore[no-untyped-call]
        vms = [stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4 * PAGES),
                             timeout=60) for _ in range(A_CALLS // 4)]
        b_vm = b_stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=PAGES), timeout=60)
        b_thread = threading.Thread(target=_light_tenant, args=(b_stub, b_vm, running, b_calls),
                                    daemon=True)
        b_thread.start()
        assert wait_for(lambda: len(b_calls) >= 2, seconds=120)  # B is about before A starts
        hold_a_slot(service, True)
        start = outstanding.jobs

        def call(fn: Callable[..., None], vm: Any, pfn: int) -> None:
            try:
                fn(stub, vm, pfn, running)
            except grpc.RpcError as error:
                if running.is_set():
                    errors.append(error)
            except AssertionError as error:
                errors.append(error)

        fn = _stream if shape == "streams" else _unary
        # 4 callers per VM (max_streams_per_vm), each sharing a range of its own.
        threads = [threading.Thread(target=call, args=(fn, vm, vm.vm.slice_base_pfn + q * PAGES),
                                    daemon=True)
                   for vm in vms for q in range(4)]
        for thread in threads:
            thread.start()
        try:
            assert wait_for(lambda: outstanding.jobs - start >= A_JOBS or bool(errors),
                            seconds=300)
            # Read while B and the third tenant are about: once they leave, A is alone and
            # its batches already sent may all pass the gate at once, as they should.
            most = dict(outstanding.most)
        finally:
            running.clear()  # the unary loops stop, the streams' requests end
            hold_a_slot(service, False)
            for thread in [*threads, b_thread]:
                thread.join(60)
    assert not errors, errors[:1]
    assert len(most) == 2, most  # A and B, each its connection
    # Past the gate: one of A's calls (GATE_PER_TENANT), with one job at a time; B makes
    # one call at a time anyway.
    assert max(most.values()) == 1, most
