"""Per-client caps and the hyp pool quota of a VM's shares, against a real `pkvm-sim serve`
subprocess driven over gRPC (issue 20, "quotas leak around the side").

Expected figures come from the flags given and from the kernel's behaviour, never from the
server's own bookkeeping: the hyp pool's free pages (GetStats) show what EL2 really spent on
stage-1 tables (pkvm_create_mappings_locked takes a missing table from the hyp pool, order
0; kvm_pgtable_hyp_unmap gives empty ones back), and a 4K leaf table spans 512 pages, so a
share of one page in each fresh 2 MiB of the linear map needs a table of its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from tests.service.attack_helpers import ServeProcess
from tests.service.fixtures import bearer
from tests.service.tenants import OpenStream, refusal

Stub = pb2_grpc.HypervisorServiceStub
LEAF_TABLE_SPAN_PAGES = 512  # 4K pages: one level-3 table maps 2 MiB
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class Client:
    """One client: its own connection (and so its own gRPC peer), and optionally a token."""

    def __init__(self, target: str, token: str | None = None) -> None:
        # grpc-python channels to one target share a connection unless told not to: a
        # client without a token is its connection.
        self.channel = grpc.insecure_channel(target,
                                             options=[("grpc.use_local_subchannel_pool", 1)])
        self.stub = Stub(self.channel)
        self.metadata = bearer(token) if token else ()

    def create(self, slice_pages: int = 64, lease_seconds: float = 0) -> pb2.VM:
        response = self.stub.CreateVM(pb2.CreateVMRequest(
            nr_vcpus=1, slice_pages=slice_pages, lease_seconds=lease_seconds),
            metadata=self.metadata, timeout=30)
        vm: pb2.VM = response.vm
        self.tokens = getattr(self, "tokens", {})
        self.tokens[vm.handle] = response.token
        return vm

    def creating(self, **kwargs: float) -> tuple[grpc.StatusCode, str]:
        return refusal(lambda: self.create(**kwargs))  # type: ignore[arg-type]

    def vm_metadata(self, vm: pb2.VM) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[vm.handle])

    def destroy(self, vm: pb2.VM) -> None:
        self.stub.DestroyVM(pb2.DestroyVMRequest(handle=vm.handle),
                            metadata=self.vm_metadata(vm), timeout=30)

    def close(self) -> None:
        self.channel.close()


def hyp_free_pages(stub: Stub) -> int:
    stats = stub.GetStats(pb2.GetStatsRequest(), timeout=30)
    (hyp,) = [pool for pool in stats.pools if pool.name == "hyp"]
    return int(hyp.free_pages)


# -- per-client caps ---------------------------------------------------------------------------


def test_one_client_cannot_take_every_vm(clients: list[Client]) -> None:
    """--max-vms 4 with --max-vms-per-client 2: the first client's third VM is refused and a
    second client still gets its two; a destroyed VM gives its client the room back."""
    with ServeProcess("--max-vms", "4", "--max-vms-per-client", "2") as server:
        greedy, other = Client(server.target), Client(server.target)
        clients += [greedy, other]
        first = greedy.create()
        greedy.create()
        assert greedy.creating() == (EXHAUSTED, "TOO_MANY_VMS_FOR_CLIENT")
        other.create()
        other.create()
        assert other.creating() == (EXHAUSTED, "QUOTA_EXCEEDED")  # the server holds 4
        greedy.destroy(first)
        greedy.create()  # its destroyed VM no longer counts against it


def test_a_client_token_is_the_client_whatever_its_connections(tmp_path: Path,
                                                                 clients: list[Client]) -> None:
    """Per-client tokens: alice's VMs count against alice on any connection; bob has his."""
    token_file = tmp_path / "clients"
    token_file.write_text("# name token\nalice alice-secret-1\nbob bob-secret-2\n")
    with ServeProcess("--client-token-file", str(token_file),
                      "--max-vms-per-client", "1") as server:
        alice, alice_again = Client(server.target, "alice-secret-1"), Client(
            server.target, "alice-secret-1")
        bob, stranger = Client(server.target, "bob-secret-2"), Client(server.target, "guess")
        clients += [alice, alice_again, bob, stranger]
        alice.create()
        assert alice_again.creating() == (EXHAUSTED, "TOO_MANY_VMS_FOR_CLIENT")
        bob.create()
        assert stranger.creating() == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CLIENT_TOKEN")


def test_a_bad_client_token_file_stops_the_server(tmp_path: Path) -> None:
    token_file = tmp_path / "clients"
    token_file.write_text("alice same-secret\nbob same-secret\n")
    with pytest.raises(AssertionError, match="given twice"):
        ServeProcess("--client-token-file", str(token_file))


def test_the_lease_seconds_a_client_holds_are_capped(clients: list[Client]) -> None:
    """150 lease seconds per client: 100 + 100 is over, 100 + 50 is not."""
    with ServeProcess("--vm-lease-seconds", "60", "--max-vm-lease-seconds", "1000",
                      "--max-lease-seconds-per-client", "150") as server:
        client, other = Client(server.target), Client(server.target)
        clients += [client, other]
        first = client.create(lease_seconds=100)
        assert client.creating(lease_seconds=100) == (EXHAUSTED, "CLIENT_LEASE_EXCEEDED")
        client.create(lease_seconds=50)
        assert client.creating(lease_seconds=0.5) == (EXHAUSTED, "CLIENT_LEASE_EXCEEDED")
        other.create(lease_seconds=150)
        client.destroy(first)
        client.create(lease_seconds=100)


def test_one_client_cannot_hold_every_stream(clients: list[Client]) -> None:
    """--max-streams-per-client 1: a client's second stream (even on another of its VMs) is
    refused; another client's stream opens; closing the first frees the slot."""
    with ServeProcess("--max-streams-per-client", "1", "--max-streams-per-vm", "4") as server:
        greedy, other = Client(server.target), Client(server.target)
        clients += [greedy, other]
        vm, second_vm, others_vm = greedy.create(), greedy.create(), other.create()
        get = pb2.ExecuteRequest(handle=vm.handle, ops=[pb2.BATCH_OP_GET_PAGE],
                                 arg0=[vm.slice_base_pfn])
        stream = OpenStream(greedy.stub, greedy.vm_metadata(vm), timeout=60)
        stream.send(get)  # answered: the stream is open and counted
        for target in (vm, second_vm):
            call = greedy.stub.Execute(iter(()), metadata=greedy.vm_metadata(target), timeout=30)
            assert refusal(lambda c=call: list(c)) == (EXHAUSTED, "TOO_MANY_STREAMS_FOR_CLIENT")
        theirs = OpenStream(other.stub, other.vm_metadata(others_vm), timeout=60)
        theirs.send(pb2.ExecuteRequest(handle=others_vm.handle, ops=[pb2.BATCH_OP_GET_PAGE],
                                       arg0=[others_vm.slice_base_pfn]))
        theirs.close()
        stream.close()
        again = OpenStream(greedy.stub, greedy.vm_metadata(second_vm), timeout=60)
        # The server may see the first stream's end a little after the client: retry.
        for _attempt in range(100):
            try:
                again.send(pb2.ExecuteRequest(handle=second_vm.handle,
                                              ops=[pb2.BATCH_OP_GET_PAGE],
                                              arg0=[second_vm.slice_base_pfn]))
                break
            except grpc.RpcError as error:
                assert error.code() == EXHAUSTED
                again = OpenStream(greedy.stub, greedy.vm_metadata(second_vm), timeout=60)
        else:
            raise AssertionError("the closed stream's slot never came back")
        again.close()


# -- the hyp stage-1 tables of a VM's shares ---------------------------------------------------


def share(client: Client, vm: pb2.VM, pfn: int, nr_pages: int = 1,
          page_by_page: bool = False) -> pb2.HostShareResponse:
    response: pb2.HostShareResponse = client.stub.HostShare(
        pb2.HostShareRequest(handle=vm.handle, pfn=pfn, nr_pages=nr_pages,
                             page_by_page=page_by_page),
        metadata=client.vm_metadata(vm), timeout=30)
    return response


def unshare(client: Client, vm: pb2.VM, pfn: int) -> None:
    client.stub.HostUnshare(pb2.HostUnshareRequest(handle=vm.handle, pfn=pfn, nr_pages=1),
                            metadata=client.vm_metadata(vm), timeout=30)


def share_until_refused(client: Client, vm: pb2.VM, limit: int) -> tuple[list[int], str]:
    """Share one page per 2 MiB of the slice until a share is refused: the pfns shared and
    the reason of the refusal."""
    shared: list[int] = []
    for step in range(limit):
        pfn = vm.slice_base_pfn + step * LEAF_TABLE_SPAN_PAGES
        code, reason = refusal_or_none(lambda p=pfn: share(client, vm, p))
        if code is not None:
            assert code == EXHAUSTED, reason
            return shared, reason
        shared.append(pfn)
    raise AssertionError(f"{limit} shares in fresh 2 MiB regions were never refused")


def refusal_or_none(call: Callable[[], object]) -> tuple[grpc.StatusCode | None, str]:
    """(code, reason) of a refused call; (None, "") when it succeeded."""
    try:
        call()
    except grpc.RpcError as error:
        return refusal(functools.partial(_reraise, error))
    return None, ""


def _reraise(error: BaseException) -> None:
    raise error


QUOTA = 12
SLICE_PAGES = 64 * LEAF_TABLE_SPAN_PAGES  # 128 MiB: 64 leaf tables' worth


def test_shares_cannot_take_more_hyp_pages_than_the_quota(clients: list[Client]) -> None:
    """v6.12 maps a shared page at EL2 (hyp_complete_share): one page in each fresh 2 MiB
    costs a table from the hyp pool. With --quota-hyp-pages 12 the VM's shares spend at most
    12 pool pages (before the fix: a table per share, without end), counting the tables its
    creation took (the host's shares of its structs, its donations), the refused share
    changes nothing, and unsharing gives the pages and the quota back."""
    with ServeProcess("--profile", "v6.12", "--quota-hyp-pages", str(QUOTA)) as server:
        client, neighbour = Client(server.target), Client(server.target)
        clients += [client, neighbour]
        booted = hyp_free_pages(client.stub)
        vm = client.create(slice_pages=SLICE_PAGES)
        start = hyp_free_pages(client.stub)
        shared, reason = share_until_refused(client, vm, limit=64)
        assert reason == "QUOTA_EXCEEDED"
        # A table per shared page (each is in its own 2 MiB) but maybe the first: the
        # slice may start in a 2 MiB its creation mapped already. With the tables of the
        # VM's creation (the first VM: nobody else uses them), at most the quota.
        assert len(shared) - 1 <= start - hyp_free_pages(client.stub)
        spent = booted - hyp_free_pages(client.stub)
        assert spent <= QUOTA
        assert spent > QUOTA - 3  # refused only when the next fresh region (1..3 tables)
        refused_pfn = vm.slice_base_pfn + len(shared) * LEAF_TABLE_SPAN_PAGES
        info = client.stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=refused_pfn), timeout=30)
        assert info.owner != "hyp" and booted - hyp_free_pages(client.stub) == spent
        # Sharing in a region already mapped needs no table: still allowed.
        share(client, vm, shared[0] + 1)
        # A second VM has its own quota.
        other = neighbour.create(slice_pages=SLICE_PAGES)
        neighbour_shared, _ = share_until_refused(neighbour, other, limit=64)
        assert neighbour_shared
        for pfn in [*shared, shared[0] + 1]:
            unshare(client, vm, pfn)
        # The tables the first VM's shares took are back, and so is its quota.
        again, reason = share_until_refused(client, vm, limit=64)
        assert reason == "QUOTA_EXCEEDED" and len(again) == len(shared)


def test_a_page_by_page_share_stops_at_the_quota(clients: list[Client]) -> None:
    """Page by page (kvm_share_hyp's loop): the pages whose tables fit are shared, the first
    one over the quota is reported refused with QUOTA_EXCEEDED."""
    with ServeProcess("--profile", "v6.12", "--quota-hyp-pages", "8",
                      "--max-pages-per-op", "4096") as server:
        client = Client(server.target)
        clients.append(client)
        vm = client.create(slice_pages=SLICE_PAGES)
        start = hyp_free_pages(client.stub)
        nr_pages = 8 * LEAF_TABLE_SPAN_PAGES  # 8 leaf tables and the creation's: over 8
        result = share(client, vm, vm.slice_base_pfn, nr_pages, page_by_page=True)
        spent = start - hyp_free_pages(client.stub)
        assert spent <= QUOTA
        assert 0 < result.pages_done < nr_pages
        assert result.pages_done % LEAF_TABLE_SPAN_PAGES == 0  # stops at a region's start
        assert result.failed_pfn == vm.slice_base_pfn + result.pages_done
        assert result.failed_reason == "QUOTA_EXCEEDED"


def test_pins_cannot_take_more_hyp_pages_than_the_quota(clients: list[Client]) -> None:
    """v7.3 maps a shared page at its first pin (hyp_pin_shared_mem): shares cost nothing,
    pins are charged, and an unpin that frees tables gives the quota back."""
    with ServeProcess("--profile", "v7.3", "--quota-hyp-pages", str(QUOTA)) as server:
        client = Client(server.target)
        clients.append(client)
        vm = client.create(slice_pages=SLICE_PAGES)
        start = hyp_free_pages(client.stub)
        pfns = [vm.slice_base_pfn + step * LEAF_TABLE_SPAN_PAGES for step in range(32)]
        for pfn in pfns:
            share(client, vm, pfn)
        assert hyp_free_pages(client.stub) == start  # v6.16+: a share maps nothing at EL2

        def pin(pfn: int, unpin: bool = False) -> None:
            request_type = pb2.UnpinSharedRequest if unpin else pb2.PinSharedRequest
            rpc = client.stub.UnpinShared if unpin else client.stub.PinShared
            rpc(request_type(handle=vm.handle, pfn=pfn, nr_pages=1),
                metadata=client.vm_metadata(vm), timeout=30)

        pinned: list[int] = []
        for pfn in pfns:
            code, reason = refusal_or_none(lambda p=pfn: pin(p))
            if code is not None:
                assert (code, reason) == (EXHAUSTED, "QUOTA_EXCEEDED")
                break
            pinned.append(pfn)
        else:
            raise AssertionError("pins in 32 fresh 2 MiB regions were never refused")
        spent = start - hyp_free_pages(client.stub)
        assert len(pinned) <= spent <= QUOTA
        for pfn in pinned:
            pin(pfn, unpin=True)
        assert hyp_free_pages(client.stub) == start
        pin(pinned[0])  # the quota is back


def test_the_ledger_follows_the_pool_whoever_frees_a_shared_table() -> None:
    """Two VMs with small neighbouring slices (v6.12 places them in one 2 MiB region) share
    a page each: the first share takes the leaf table, the second uses it. Whichever VM
    unshares first, the pages charged to the two add up to the hyp pool pages their
    creations and shares took (GetStats), down to their creations' once the last unshare
    frees the table, and the pool is whole again once both are destroyed."""
    from pkvm_sim.core.config import SimConfig
    from pkvm_sim.service.limits import Limits
    from pkvm_sim.service.server import ServerSettings, start

    service = start(SimConfig.from_mapping({"profile": "v6.12"}), ServerSettings(
        listen="127.0.0.1:0", metrics_listen=None, limits=Limits(quota_hyp_pages=64)))
    try:
        ledger = service.servicer.ledger
        for order in ((0, 1), (1, 0)):
            client = Client(service.target)
            booted = hyp_free_pages(client.stub)
            vms = [client.create(slice_pages=64) for _ in range(2)]
            created = hyp_free_pages(client.stub)

            def charged(vms: list[pb2.VM] = vms) -> int:
                return sum(ledger.held(vm.handle) for vm in vms)

            assert charged() == booted - created
            for vm in vms:
                share(client, vm, vm.slice_base_pfn + 63)
            assert charged() == booted - hyp_free_pages(client.stub) > booted - created
            first, second = (vms[i] for i in order)
            unshare(client, first, first.slice_base_pfn + 63)
            assert charged() == booted - hyp_free_pages(client.stub)
            unshare(client, second, second.slice_base_pfn + 63)
            assert hyp_free_pages(client.stub) == created
            assert charged() == booted - created
            for vm in vms:
                client.destroy(vm)
            assert hyp_free_pages(client.stub) == booted
            assert charged() == 0
            client.close()
    finally:
        service.stop(0)
