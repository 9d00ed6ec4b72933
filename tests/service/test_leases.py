"""VM leases over real sockets: an idle VM is reaped with everything it held, calls and RenewVM
keep a VM alive, RenewVM needs the token, the maximum is enforced, 0 disables leases, and the
expired counter reaches /metrics. Short leases (0.3-1 s) and a 0.05 s check interval."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.service.leases import LeaseTable, check_interval
from pkvm_sim.service.server import RunningService, ServerSettings

from tests.service.fixtures import RawVM, bearer, start_service
from tests.service.test_metrics import scrape

LEASE = 1.0  # long enough that a loaded machine (or a parallel run) does not reap a VM early
CHECK = 0.05


def lease_settings(**overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "workers": 4,
        "vm_lease_seconds": LEASE, "lease_check_interval": CHECK,
    }
    values.update(overrides)
    return ServerSettings(**values)


class Leased:
    """A running service with short leases and a stub on it."""

    def __init__(self, settings: ServerSettings) -> None:
        self.service: RunningService = start_service(settings=settings)
        self.channel = grpc.insecure_channel(self.service.target)
        self.stub = pb2_grpc.HypervisorServiceStub(self.channel)

    def stats(self) -> pb2.GetStatsResponse:
        return self.stub.GetStats(pb2.GetStatsRequest())

    def alive(self, handle: int) -> bool:
        return handle in self.service.servicer.tokens

    def close(self) -> None:
        self.channel.close()
        self.service.stop(0)


@pytest.fixture
def leased() -> Iterator[Leased]:
    running = Leased(lease_settings())
    yield running
    running.close()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details()


def pool_free(stats: pb2.GetStatsResponse) -> dict[str, int]:
    return {p.name: p.free_pages for p in stats.pools if not p.name.startswith("vm/")}


def populate(stub: pb2_grpc.HypervisorServiceStub) -> RawVM:
    """A VM holding hyp-pool blocks (one with an extra reference), shared and pinned pages
    and a memcache."""
    vm = RawVM(stub, slice_pages=32)
    stub.AllocPages(pb2.AllocPagesRequest(handle=vm.handle, order=2), metadata=vm.md)
    held = stub.AllocPages(pb2.AllocPagesRequest(handle=vm.handle, order=0), metadata=vm.md)
    stub.GetPage(pb2.GetPageRequest(handle=vm.handle, pfn=held.pfn), metadata=vm.md)
    base = vm.vm.slice_base_pfn
    stub.HostShare(pb2.HostShareRequest(handle=vm.handle, pfn=base, nr_pages=2), metadata=vm.md)
    stub.PinShared(pb2.PinSharedRequest(handle=vm.handle, pfn=base), metadata=vm.md)
    stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=vm.handle, nr_pages=4), metadata=vm.md)
    return vm


def test_idle_vm_is_reaped_and_everything_it_held_returns(leased: Leased) -> None:
    stub = leased.stub
    before = leased.stats()
    vm = populate(stub)
    granted = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=8))  # a second VM
    assert granted.lease_seconds == pytest.approx(LEASE)
    other = granted.vm.handle
    during = leased.stats()
    assert during.nr_vms == before.nr_vms + 2 and during.shared_pages > before.shared_pages
    assert pool_free(during)["hyp"] < pool_free(before)["hyp"]

    wait_for(lambda: leased.stats().nr_vms == before.nr_vms)
    after = leased.stats()
    assert pool_free(after)["hyp"] == pool_free(before)["hyp"]
    assert after.shared_pages == before.shared_pages
    assert not leased.alive(vm.handle) and not leased.alive(other)
    assert leased.service.servicer.counters.vms_expired == 2
    assert len(leased.service.servicer.leases) == 0

    # Reaping is exactly DestroyVM: the same VMs destroyed explicitly on a twin service leave
    # the same state (host stage-2 tables made by the share stay, as the kernel's do).
    twin = Leased(lease_settings(vm_lease_seconds=0))
    try:
        twin_vm = populate(twin.stub)
        twin_other = twin.stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=8))
        twin_vm.destroy()
        twin.stub.DestroyVM(pb2.DestroyVMRequest(handle=twin_other.vm.handle),
                            metadata=bearer(twin_other.token))
        assert pool_free(twin.stats()) == pool_free(after)
        assert twin.stats().shared_pages == after.shared_pages
    finally:
        twin.close()

    # The VM no longer exists: its handle is NOT_FOUND, token or not.
    for call in (
        lambda: stub.AllocPages(pb2.AllocPagesRequest(handle=vm.handle), metadata=vm.md),
        lambda: stub.RenewVM(pb2.RenewVMRequest(handle=vm.handle), metadata=vm.md),
        lambda: stub.DestroyVM(pb2.DestroyVMRequest(handle=vm.handle), metadata=vm.md),
        lambda: next(iter(stub.Execute(iter([pb2.ExecuteRequest(
            handle=vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES])]), metadata=vm.md))),
    ):
        assert code_of(call)[0] == grpc.StatusCode.NOT_FOUND


def test_calls_and_renewals_keep_a_vm_alive() -> None:
    # A lease long enough that a loaded machine's pauses between two calls never outlast it:
    # what is tested is which VMs a lease keeps, not how promptly the reaper runs.
    lease = 2.0
    leased = Leased(lease_settings(vm_lease_seconds=lease))
    try:
        stub = leased.stub
        busy, renewed, execed, idle = (RawVM(stub, slice_pages=4) for _ in range(4))
        deadline = time.monotonic() + 60
        while leased.alive(idle.handle):  # until the idle VM of the same age is reaped
            assert time.monotonic() < deadline, "the idle VM was never reaped"
            pfn = stub.AllocPages(pb2.AllocPagesRequest(handle=busy.handle),
                                  metadata=busy.md).pfn
            stub.PutPage(pb2.PutPageRequest(handle=busy.handle, pfn=pfn), metadata=busy.md)
            response = stub.RenewVM(pb2.RenewVMRequest(handle=renewed.handle),
                                    metadata=renewed.md)
            assert 0 < response.expires_in_ms <= lease * 1000
            assert response.lease_seconds == pytest.approx(lease)
            batch = pb2.ExecuteRequest(handle=execed.handle,
                                       ops=[pb2.BATCH_OP_TOPUP_MEMCACHE], arg0=[1])
            [answer] = stub.Execute(iter([batch]), metadata=execed.md)
            assert answer.completed == 1
            time.sleep(lease / 20)
        # The three VMs that were called meanwhile were not reaped with it.
        for vm in (busy, renewed, execed):
            assert leased.alive(vm.handle)
        # Once their calls stop, they go too.
        wait_for(lambda: leased.stats().nr_vms == 0, timeout=60)
        assert leased.service.servicer.counters.vms_expired == 4
    finally:
        leased.close()


def test_destroy_before_expiry_is_not_counted(leased: Leased) -> None:
    vm = RawVM(leased.stub)
    vm.destroy()
    assert len(leased.service.servicer.leases) == 0
    time.sleep(LEASE + 4 * CHECK)
    assert leased.service.servicer.counters.vms_expired == 0


def test_renew_vm_needs_the_vms_token(leased: Leased) -> None:
    stub = leased.stub
    vm, other = RawVM(stub), RawVM(stub)
    request = pb2.RenewVMRequest(handle=vm.handle)
    code, _ = code_of(lambda: stub.RenewVM(request))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: stub.RenewVM(request, metadata=other.md))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: stub.RenewVM(request, metadata=bearer("forged")))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = code_of(lambda: stub.RenewVM(pb2.RenewVMRequest(handle=0xDEAD), metadata=vm.md))
    assert code == grpc.StatusCode.NOT_FOUND
    assert stub.RenewVM(request, metadata=vm.md).expires_in_ms > 0


def test_lease_bounds() -> None:
    leased = Leased(lease_settings(vm_lease_seconds=0.5, max_vm_lease_seconds=2.0))
    try:
        stub = leased.stub
        for bad in (2.5, -1.0, math.inf, math.nan):
            request = pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4, lease_seconds=bad)
            code, details = code_of(lambda request=request: stub.CreateVM(request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "maximum" in details or "finite" in details
        assert leased.stats().nr_vms == 0  # a refused CreateVM changes nothing
        longest = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4, lease_seconds=2.0))
        assert longest.lease_seconds == 2.0
        default = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4))
        assert default.lease_seconds == 0.5
        short = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4, lease_seconds=0.3))
        assert short.lease_seconds == pytest.approx(0.3)
        # The client's own short lease is honoured: it goes first, the 2 s one stays.
        wait_for(lambda: not leased.alive(short.vm.handle))
        assert leased.alive(longest.vm.handle)
    finally:
        leased.close()
    with pytest.raises(ValueError):
        start_service(settings=lease_settings(vm_lease_seconds=10, max_vm_lease_seconds=5))


def test_leases_disabled_vms_live_until_destroyed() -> None:
    leased = Leased(lease_settings(vm_lease_seconds=0))
    try:
        assert leased.service.reaper is None
        stub = leased.stub
        plain = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4))
        asked = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4, lease_seconds=0.2))
        assert plain.lease_seconds == 0 and asked.lease_seconds == 0
        time.sleep(0.2 + 10 * CHECK)  # proving an absence needs a wait
        assert leased.stats().nr_vms == 2
        renewed = stub.RenewVM(pb2.RenewVMRequest(handle=plain.vm.handle),
                               metadata=bearer(plain.token))
        assert renewed.expires_in_ms == 0 and renewed.lease_seconds == 0
        stub.DestroyVM(pb2.DestroyVMRequest(handle=plain.vm.handle), metadata=bearer(plain.token))
        stub.DestroyVM(pb2.DestroyVMRequest(handle=asked.vm.handle), metadata=bearer(asked.token))
        assert leased.service.servicer.counters.vms_expired == 0
    finally:
        leased.close()


def test_expired_counter_in_metrics(leased: Leased) -> None:
    assert scrape(leased.service)["pkvm_vms_expired_total"] == [({}, 0.0)]
    for _ in range(3):
        RawVM(leased.stub, slice_pages=4)
    RawVM(leased.stub, slice_pages=4).destroy()  # destroyed, not expired
    wait_for(lambda: leased.stats().nr_vms == 0)
    samples = scrape(leased.service)
    assert samples["pkvm_vms_expired_total"] == [({}, 3.0)]
    assert samples["pkvm_vms"] == [({}, 0.0)]
    requests = {(lab["method"], lab["code"]): v for lab, v in samples["pkvm_grpc_requests_total"]}
    assert requests[("CreateVM", "OK")] == 4


def test_reaper_stops_on_shutdown() -> None:
    leased = Leased(lease_settings())
    reaper = leased.service.reaper
    assert reaper is not None and reaper.running and reaper.interval == CHECK
    leased.close()
    assert not reaper.running


def test_lease_table_with_a_fake_clock() -> None:
    now = [100.0]
    table = LeaseTable(default_seconds=10, max_seconds=60, clock=lambda: now[0])
    assert table.validate(0) == 10 and table.validate(30) == 30
    table.grant(1, 10)
    table.grant(2, 30)
    now[0] = 109.0
    table.renew(1)  # to 119
    table.renew(3)  # no lease: ignored
    assert table.expired(now=118.9) == [] and table.expired(now=119.0) == [1]
    assert table.expires_in(2) == pytest.approx(21) and table.expires_in(3) == 0
    assert table.expired(now=200.0) == [1, 2]  # oldest deadline first
    table.drop(1)
    assert table.expired(now=200.0) == [2] and table.lease_seconds(1) == 0
    assert check_interval(600) == 1.0 and check_interval(0.4) == pytest.approx(0.1)
    assert check_interval(0) == 1.0 and check_interval(600, 0.05) == 0.05
    with pytest.raises(ValueError):
        LeaseTable(default_seconds=-1)
    with pytest.raises(ValueError):
        check_interval(600, 0)
