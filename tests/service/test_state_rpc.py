"""serve --state-file, in process: SaveState, restore at start, tokens, leases, instance id."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_client import (
    AuthenticationError,
    FailedPreconditionError,
    Hypervisor,
    NotFoundError,
)
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.auth import ClientToken
from pkvm_sim.service.persist import StateKeeper
from pkvm_sim.service.server import RunningService, ServerSettings, start

from tests.core.machine_compare import assert_same_machine

CONFIG = SimConfig.from_mapping({"memblocks": ["0x80000000:512M"]})
SETTINGS = ServerSettings(listen="127.0.0.1:0", metrics_listen=None, workers=4)
META_KEY = "pkvm-instance-id"


def serve(path: Path) -> RunningService:
    """What `serve --state-file path` does: restore if the file exists, else boot."""
    keeper = StateKeeper(path)
    restored = keeper.load()
    if restored is None:
        return start(CONFIG, SETTINGS, state=keeper)
    return start(restored.config, SETTINGS, state=keeper, hypervisor=restored.hypervisor)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[RunningService]]:
    services: list[RunningService] = []
    yield services
    for service in services:
        service.stop(0)


def drive(hv: Hypervisor) -> dict[str, Any]:
    """Create VMs holding a bit of everything; returns what the test needs to check."""
    a = hv.create_vm(nr_vcpus=2, slice_pages=64, lease_seconds=3600)
    b = hv.create_vm(nr_vcpus=1, slice_pages=32)
    gone = hv.create_vm(nr_vcpus=1, slice_pages=8)
    gone.destroy()
    block = a.alloc_pages(order=2)
    a.get_page(block)  # refcount 2
    base = a.info.slice_base_pfn
    a.host_share(base, 4)
    a.pin_shared(base + 1, 2)
    a.topup_memcache(4)
    a.guest_map(0x4000_0000, base + 8)
    b.alloc_pages(order=1)
    hv.host_fault(0x8000_0000)
    hv.map_mmio(0x1000_0000)
    return {"a": a, "b": b, "gone": gone.handle, "block": block, "base": base}


def test_save_state_and_restore_keep_the_machine_tokens_and_leases(
    tmp_path: Path, running: list[RunningService]
) -> None:
    path = tmp_path / "machine.pkvm"
    first = serve(path)
    running.append(first)
    with Hypervisor(first.target) as hv:
        held = drive(hv)
        before_id = hv.instance_id()
        saved = hv.save_state()
        assert (saved.path, saved.nr_vms, saved.format_version) == (str(path), 2, 2)
        assert saved.size_bytes == path.stat().st_size and saved.instance_id == before_id
        stats_before = hv.stats()
        pages_before = [hv.page_info(held["base"] + i) for i in range(10)]
    original = first.servicer.hypervisor
    first.stop(0)

    second = serve(path)
    running.append(second)
    assert_same_machine(original, second.servicer.hypervisor)
    with Hypervisor(second.target) as hv:
        assert hv.instance_id() != before_id
        stats_after = hv.stats()
        assert dataclasses.replace(stats_after, instance_id=stats_before.instance_id) \
            == stats_before
        assert [hv.page_info(held["base"] + i) for i in range(10)] == pages_before
        # the same tokens work and the same operations give the same answers
        a = hv.attach(held["a"].handle, held["a"].token)
        assert a.put_page(held["block"]) == 1
        assert 3590 < a.renew() <= 3600 and a.lease_seconds == 3600
        with pytest.raises(FailedPreconditionError):
            a.host_unshare(held["base"] + 1)  # still pinned
        a.unpin_shared(held["base"] + 1, 2)
        a.host_unshare(held["base"], 4)
        wrong = hv.attach(held["a"].handle, held["b"].token)
        with pytest.raises(AuthenticationError):
            wrong.renew()
        with pytest.raises(NotFoundError):
            hv.attach(held["gone"], "x").renew()
        new = hv.create_vm(slice_pages=8)
        assert new.handle not in (held["a"].handle, held["b"].handle, held["gone"])
        assert new.handle == held["gone"] + 1
        second.servicer.hypervisor.audit()


def test_counters_survive_a_restore(tmp_path: Path, running: list[RunningService]) -> None:
    path = tmp_path / "machine.pkvm"
    first = serve(path)
    running.append(first)
    with Hypervisor(first.target) as hv:
        vm = hv.create_vm(slice_pages=8)
        vm.alloc_pages()
        hv.save_state()
    ops = first.servicer.counters.operations_by_name()
    requests = first.servicer.counters.requests()
    first.stop(0)
    second = serve(path)
    running.append(second)
    assert second.servicer.counters.operations_by_name() == ops
    # the file is written before the SaveState call itself is counted
    assert requests.pop(("SaveState", "OK")) == 1
    assert second.servicer.counters.requests() == requests
    assert requests[("CreateVM", "OK")] == requests[("AllocPages", "OK")] == 1


def test_save_state_without_a_state_file_is_failed_precondition(
    running: list[RunningService],
) -> None:
    service = start(CONFIG, SETTINGS)
    running.append(service)
    with Hypervisor(service.target) as hv, pytest.raises(FailedPreconditionError) as caught:
        hv.save_state()
    assert caught.value.reason == "NO_STATE_FILE"


def test_save_state_goes_through_the_admin_authorization_hook(
    tmp_path: Path, running: list[RunningService]
) -> None:
    service = serve(tmp_path / "m.pkvm")
    running.append(service)
    service.servicer.client_token = ClientToken("admin-secret")
    with grpc.insecure_channel(service.target) as channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.SaveState(pb2.SaveStateRequest(), metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert not (tmp_path / "m.pkvm").exists()
        ok = stub.SaveState(pb2.SaveStateRequest(),
                            metadata=(("authorization", "Bearer admin-secret"),))
        assert ok.nr_vms == 0 and (tmp_path / "m.pkvm").exists()


def test_every_response_carries_the_instance_id(running: list[RunningService]) -> None:
    services = [start(CONFIG, SETTINGS), start(CONFIG, SETTINGS)]
    running.extend(services)
    ids = []
    for service in services:
        with grpc.insecure_channel(service.target) as channel:
            stub = pb2_grpc.HypervisorServiceStub(channel)
            stats, call = stub.GetStats.with_call(pb2.GetStatsRequest())
            assert dict(call.trailing_metadata())[META_KEY] == stats.instance_id
            with pytest.raises(grpc.RpcError) as caught:  # refusals carry it too
                stub.GetPage(pb2.GetPageRequest(handle=0x9999, pfn=1))
            metadata = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
            assert metadata[META_KEY] == stats.instance_id
            assert "grpc-status-details-bin" in metadata  # the rich status is still there
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
            stream = stub.Execute(iter(()))
            with contextlib.suppress(grpc.RpcError):  # a stream may need a token at start
                list(stream)
            assert dict(stream.trailing_metadata())[META_KEY] == stats.instance_id
            ids.append(stats.instance_id)
    assert len(set(ids)) == 2 and all(len(i) == 32 for i in ids)


# -- a seeded workload split by a restart, over the wire --------------------------------------


class RpcClient:
    """Seeded RPCs. The client (its RNG, VMs, tokens and blocks) outlives a server restart:
    only the stub changes under it."""

    OPS = ("create", "alloc", "alloc", "put", "share", "pin", "topup", "map", "fault", "mmio")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vms: list[tuple[int, Any, int]] = []  # (handle, metadata, slice base)
        self.blocks: list[tuple[int, Any, int]] = []  # (handle, metadata, head pfn)

    def run(self, stub: Any, steps: int) -> list[Any]:
        answers: list[Any] = []
        for _ in range(steps):
            op = self.rng.choice(self.OPS if self.vms else ("create",))
            try:
                answers.append(self._rpc(stub, op))
            except grpc.RpcError as error:
                answers.append((op, error.code(), error.details()))
        return answers

    def _rpc(self, stub: Any, op: str) -> Any:
        rng = self.rng
        if op == "create":
            r = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=rng.choice((16, 64))))
            md = (("authorization", f"Bearer {r.token}"),)
            self.vms.append((r.vm.handle, md, r.vm.slice_base_pfn))
            return (op, r.vm)
        if op == "fault":
            addr = 0x8000_0000 + rng.randrange(512 << 20)
            return (op, stub.HostFault(pb2.HostFaultRequest(addr=addr)).fault)
        if op == "mmio":
            return (op, stub.MapMMIO(pb2.MapMMIORequest(addr=rng.randrange(1 << 30))).fault)
        handle, md, base = rng.choice(self.vms)
        if op == "alloc":
            request = pb2.AllocPagesRequest(handle=handle, order=rng.randrange(3))
            pfn = stub.AllocPages(request, metadata=md).pfn
            self.blocks.append((handle, md, pfn))
            return (op, pfn)
        if op == "put":
            if not self.blocks:
                return (op, None)
            handle, md, pfn = self.blocks.pop(rng.randrange(len(self.blocks)))
            return (op, stub.PutPage(pb2.PutPageRequest(handle=handle, pfn=pfn), metadata=md))
        pfn = base + rng.randrange(8)
        if op == "share":
            request = pb2.HostShareRequest(handle=handle, pfn=pfn)
            return (op, stub.HostShare(request, metadata=md))
        if op == "pin":
            return (op, stub.PinShared(pb2.PinSharedRequest(handle=handle, pfn=pfn), metadata=md))
        if op == "topup":
            request = pb2.TopupMemcacheRequest(handle=handle, nr_pages=2)
            return (op, stub.TopupMemcache(request, metadata=md))
        request = pb2.GuestMapRequest(handle=handle, ipa=rng.randrange(512) << 21, pfn=pfn)
        return (op, stub.GuestMap(request, metadata=md))


def test_a_seeded_workload_split_by_a_restart_gives_the_same_answers(
    tmp_path: Path, running: list[RunningService]
) -> None:
    unbroken = start(CONFIG, SETTINGS)
    running.append(unbroken)
    with grpc.insecure_channel(unbroken.target) as channel:
        expected = RpcClient(11).run(pb2_grpc.HypervisorServiceStub(channel), 300)

    path = tmp_path / "m.pkvm"
    client = RpcClient(11)
    first = serve(path)
    running.append(first)
    with grpc.insecure_channel(first.target) as channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)
        answers = client.run(stub, 150)
        stub.SaveState(pb2.SaveStateRequest())
    first.stop(0)
    second = serve(path)
    running.append(second)
    with grpc.insecure_channel(second.target) as channel:
        answers += client.run(pb2_grpc.HypervisorServiceStub(channel), 150)

    assert len({a[0] for a in answers}) == len(RpcClient.OPS) - 1  # every op was exercised
    assert answers == expected
    assert second.servicer.hypervisor.canonical_dump(host_tables=True) \
        == unbroken.servicer.hypervisor.canonical_dump(host_tables=True)


def test_a_malformed_service_section_is_refused_at_load(tmp_path: Path) -> None:
    from pkvm_sim.core import state_file
    from pkvm_sim.core.hypervisor import Hypervisor as CoreHypervisor
    from pkvm_sim.core.state_file import StateFileError

    hv = CoreHypervisor.boot(CONFIG)
    vm = hv.create_vm(nr_vcpus=1, slice_pages=4)
    for service, says in (({"tokens": [[vm.handle, "t"]], "leases": [["x", 1, 2]]}, "corrupt"),
                          ({"tokens": []}, "do not match"),
                          ({"tokens": [[vm.handle, "t"]], "counters": {"operations": {"x": 1}}},
                           "unknown operation")):
        path = tmp_path / "m.pkvm"
        state_file.save(path, hv, service)
        with pytest.raises(StateFileError, match=says):
            StateKeeper(path).load()


def test_leases_come_back_only_if_the_new_server_grants_leases(
    tmp_path: Path, running: list[RunningService]
) -> None:
    path = tmp_path / "m.pkvm"
    first = serve(path)
    running.append(first)
    with Hypervisor(first.target) as hv:
        vm = hv.create_vm(slice_pages=4, lease_seconds=100)
        hv.save_state()
    first.stop(0)
    keeper = StateKeeper(path)
    restored = keeper.load()
    assert restored is not None
    no_leases = ServerSettings(listen="127.0.0.1:0", metrics_listen=None, vm_lease_seconds=0)
    second = start(restored.config, no_leases, state=keeper, hypervisor=restored.hypervisor)
    running.append(second)
    with Hypervisor(second.target) as hv:
        assert hv.attach(vm.handle, vm.token).renew() == 0.0  # no lease: lives until destroyed


def test_the_async_sdk_saves_and_reads_the_instance_id(
    tmp_path: Path, running: list[RunningService]
) -> None:
    import asyncio

    from pkvm_client import AsyncHypervisor

    service = serve(tmp_path / "m.pkvm")
    running.append(service)

    async def main() -> tuple[str, Any]:
        async with AsyncHypervisor(service.target) as hv:
            await hv.create_vm(slice_pages=4)
            return await hv.instance_id(), await hv.save_state()

    instance, saved = asyncio.run(main())
    assert instance == service.servicer.instance_id == saved.instance_id
    assert saved.nr_vms == 1 and (tmp_path / "m.pkvm").stat().st_size == saved.size_bytes


def test_a_save_that_cannot_write_is_an_error_and_changes_nothing(
    tmp_path: Path, running: list[RunningService]
) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    service = serve(folder / "m.pkvm")
    running.append(service)
    folder.rmdir()  # the directory disappears under the running server
    with grpc.insecure_channel(service.target) as channel:
        stub = pb2_grpc.HypervisorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SaveState(pb2.SaveStateRequest())
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "cannot write the state file" in caught.value.details()
        assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == 0  # still serving
    assert not folder.exists()


def test_a_restored_vm_streams_with_its_token_and_keeps_its_quota(
    tmp_path: Path, running: list[RunningService]
) -> None:
    from pkvm_client import Batch, PkvmError
    from pkvm_sim.service.limits import Limits

    path = tmp_path / "m.pkvm"
    first = serve(path)
    running.append(first)
    def hyp_free(hv: Hypervisor) -> int:
        return next(p.free_pages for p in hv.stats().pools if p.name == "hyp")

    with Hypervisor(first.target) as hv:
        booted = hyp_free(hv)
        vm = hv.create_vm(slice_pages=8)
        # The stage-1 tables its creation made EL2 take are the VM's (the only VM).
        tables = booted - hyp_free(hv)
        vm.alloc_pages(order=2)  # 4 pages of the hyp pool
        hv.save_state()
    first.stop(0)
    keeper = StateKeeper(path)
    restored = keeper.load()
    assert restored is not None
    quota = ServerSettings(listen="127.0.0.1:0", metrics_listen=None,
                           limits=Limits(quota_hyp_pages=tables + 5))
    second = start(restored.config, quota, state=keeper, hypervisor=restored.hypervisor)
    running.append(second)
    with Hypervisor(second.target) as hv:
        same = hv.attach(vm.handle, vm.token)
        batch = Batch()
        batch.alloc_pages(0)
        result = same.execute(batch)  # an Execute stream: its token is checked at start
        assert result.completed == 1
        with pytest.raises(PkvmError) as caught:  # tables + 4 + 1 held: the quota reached
            same.alloc_pages(order=0)
        assert caught.value.reason == "QUOTA_EXCEEDED"
