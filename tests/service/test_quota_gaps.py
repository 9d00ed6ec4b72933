"""Quotas and caps nobody can walk around (issue 20, item 15), against a real `pkvm-sim
serve` subprocess over gRPC: a table whose payer VM is destroyed, tables and clients across a
restart, the tables of a VM's creation and of its guest maps' memcache refills.

Expected figures come from the flags and from the hyp pool itself (GetStats), never from the
server's ledger: every run-time hyp stage-1 table is taken from the hyp pool
(pkvm_create_mappings_locked, order 0) and given back when empty (kvm_pgtable_hyp_unmap), and
every page EL2 maps at run time is mapped on some VM's behalf, so the pool pages the live VMs
do not hold as blocks are their tables, and each is charged to one of them. What a VM is
charged is read from what it may still allocate (`room`: AllocPages until QUOTA_EXCEEDED,
then everything put back).
"""

from __future__ import annotations

import functools
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_sim.core import state_file

from tests.service.attack_helpers import ServeProcess
from tests.service.fixtures import bearer
from tests.service.tenants import OpenStream, refusal
from tests.service.test_client_caps import (
    Client,
    hyp_free_pages,
    refusal_or_none,
    share,
    unshare,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
QUOTA = 32


def room(client: Client, vm: pb2.VM, token: str | None = None) -> int:
    """Order-0 hyp pool pages VM `vm` may still allocate (all given back afterwards)."""
    metadata = bearer(token) if token else client.vm_metadata(vm)
    pfns: list[int] = []
    for _ in range(4 * QUOTA):
        try:
            response = client.stub.AllocPages(pb2.AllocPagesRequest(
                handle=vm.handle, order=0, pool=pb2.POOL_KIND_HYP), metadata=metadata,
                timeout=30)
        except grpc.RpcError as error:
            assert refusal(functools.partial(_raise, error)) == (EXHAUSTED, "QUOTA_EXCEEDED")
            break
        pfns.append(response.pfn)
    else:
        raise AssertionError("the hyp pool quota never refused an allocation")
    for pfn in pfns:
        client.stub.PutPage(pb2.PutPageRequest(handle=vm.handle, pfn=pfn), metadata=metadata,
                            timeout=30)
    return len(pfns)


def _raise(error: BaseException) -> None:
    raise error


def neighbours(client: Client, count: int) -> list[pb2.VM]:
    """VMs with 64-page slices, which v6.12 places back to back in one 2 MiB region (so one
    leaf table maps a page of each)."""
    vms = [client.create(slice_pages=64) for _ in range(count)]
    bases = [vm.slice_base_pfn for vm in vms]
    assert len({(base + 63) // 512 for base in bases}) == 1, bases
    return vms


# -- 1. a table outlives the VM that paid for it ---------------------------------------------


def test_a_destroyed_payers_tables_are_charged_to_the_vm_still_using_them(
        clients: list[Client]) -> None:
    """A shares a page (its share takes the region's leaf table, and its creation took the
    tables of the structs and donations), B shares a page under the same table; A is
    destroyed. B, the only VM left, uses every table left, so it is charged every table page
    the pool lost since boot (before the fix: none of them, and B could allocate its whole
    quota while the tables stayed taken)."""
    with ServeProcess("--profile", "v6.12", "--quota-hyp-pages", str(QUOTA)) as server:
        client = Client(server.target)
        clients.append(client)
        booted = hyp_free_pages(client.stub)
        payer, user = neighbours(client, 2)
        share(client, payer, payer.slice_base_pfn + 63)
        before = hyp_free_pages(client.stub)
        share(client, user, user.slice_base_pfn + 63)
        assert hyp_free_pages(client.stub) == before  # the table was there already
        client.destroy(payer)
        tables = booted - hyp_free_pages(client.stub)
        assert tables > 0  # the leaf table of the two shares is still in use
        assert room(client, user) == QUOTA - tables
        unshare(client, user, user.slice_base_pfn + 63)
        assert room(client, user) == QUOTA - (booted - hyp_free_pages(client.stub))


def test_the_charge_moves_to_a_vm_of_the_same_client_first(clients: list[Client]) -> None:
    """Three neighbours share a page under one leaf table: A and C are one client's, B
    another's. A (who paid) is destroyed: its tables go to C, its client's VM, not to B,
    whatever their handles; every table page stays charged to B or C."""
    with ServeProcess("--profile", "v6.12", "--quota-hyp-pages", str(QUOTA)) as server:
        mine, theirs = Client(server.target), Client(server.target)
        clients += [mine, theirs]
        booted = hyp_free_pages(mine.stub)
        payer = mine.create(slice_pages=64)
        other = theirs.create(slice_pages=64)
        sibling = mine.create(slice_pages=64)
        assert len({(vm.slice_base_pfn + 63) // 512 for vm in (payer, other, sibling)}) == 1
        share(mine, payer, payer.slice_base_pfn + 63)
        share(theirs, other, other.slice_base_pfn + 63)
        share(mine, sibling, sibling.slice_base_pfn + 63)
        others_room, siblings_room = room(theirs, other), room(mine, sibling)
        mine.destroy(payer)
        assert room(theirs, other) == others_room  # B is charged nothing more
        assert room(mine, sibling) < siblings_room  # C took A's tables
        tables = booted - hyp_free_pages(mine.stub)
        assert room(theirs, other) + room(mine, sibling) == 2 * QUOTA - tables


def test_a_moved_charge_may_put_a_vm_over_its_quota(clients: list[Client]) -> None:
    """With a quota of 1 page, the first VM's creation takes more tables than that (its
    structs' and donations' regions; a creation is never refused for its tables). The second
    VM's structs are placed beside the first's, under the same tables. Destroying the first
    cannot be refused, so the second is charged those tables over its quota: it may allocate
    nothing, and a share that would take a table is refused, until it is destroyed, which
    gives the pool back whole."""
    with ServeProcess("--profile", "v6.12", "--quota-hyp-pages", "1") as server:
        client = Client(server.target)
        clients.append(client)
        booted = hyp_free_pages(client.stub)
        payer, user = neighbours(client, 2)
        client.destroy(payer)
        tables = booted - hyp_free_pages(client.stub)
        assert tables > 1  # what the user's structs still use: over its quota
        assert room(client, user) == 0
        code, reason = refusal_or_none(lambda: share(client, user, user.slice_base_pfn))
        if code is None:  # its slice's region was mapped already: no table, no charge
            assert booted - hyp_free_pages(client.stub) == tables
        else:
            assert (code, reason) == (EXHAUSTED, "QUOTA_EXCEEDED")
        client.destroy(user)
        assert hyp_free_pages(client.stub) == booted


# -- 2. a restart keeps the charges and the clients ------------------------------------------


def rooms(client: Client, vms: list[pb2.VM]) -> list[int]:
    return [room(client, vm) for vm in vms]


def reconnect(server: ServeProcess, before: Client) -> Client:
    """A new connection with the same VM tokens."""
    again = Client(server.target)
    again.tokens = dict(before.tokens)
    return again


def test_a_restored_server_charges_the_tables_as_the_saved_one(
        tmp_path: Path, clients: list[Client]) -> None:
    """B shares first (it pays the region's leaf table), then A (lower handle) under the same
    table; A allocates a block. After SIGTERM and a restart on the state file each VM may
    allocate exactly what it could before (before the fix: the restored ledger charged no
    table, and each VM got its whole quota back)."""
    path = tmp_path / "machine.pkvm"
    flags = ("--profile", "v6.12", "--quota-hyp-pages", str(QUOTA), "--state-file", str(path))
    with ServeProcess(*flags) as server:
        client = Client(server.target)
        clients.append(client)
        first, second = neighbours(client, 2)
        share(client, second, second.slice_base_pfn + 63)
        share(client, first, first.slice_base_pfn + 63)
        client.stub.AllocPages(pb2.AllocPagesRequest(handle=first.handle, order=1,
                                                     pool=pb2.POOL_KIND_HYP),
                               metadata=client.vm_metadata(first), timeout=30)
        saved = rooms(client, [first, second])
        assert saved[0] < QUOTA - 2 and saved[1] < QUOTA
        assert server.stop() == 0
    with ServeProcess(*flags) as again:
        client = reconnect(again, client)
        clients.append(client)
        assert rooms(client, [first, second]) == saved


def test_a_state_file_without_charges_restores_with_every_table_charged(
        tmp_path: Path, clients: list[Client]) -> None:
    """A file written before the charges were saved (its service section lacks them)
    restores, and every table page the pool lost is charged to a VM that uses it."""
    path = tmp_path / "machine.pkvm"
    flags = ("--profile", "v6.12", "--quota-hyp-pages", str(QUOTA), "--state-file", str(path))
    with ServeProcess(*flags) as server:
        client = Client(server.target)
        clients.append(client)
        booted = hyp_free_pages(client.stub)
        first, second = neighbours(client, 2)
        share(client, second, second.slice_base_pfn + 63)
        share(client, first, first.slice_base_pfn + 63)
        tables = booted - hyp_free_pages(client.stub)
        assert server.stop() == 0
    decoded = state_file.load(path)
    service = {key: value for key, value in decoded.service.items()
               if key not in ("hyp_tables", "clients")}
    assert service != decoded.service  # the new keys were saved, and are gone now
    path.write_bytes(state_file.encode(state_file.restore(decoded), service))
    with ServeProcess(*flags) as again:
        client = reconnect(again, client)
        clients.append(client)
        assert sum(rooms(client, [first, second])) == 2 * QUOTA - tables


def test_a_named_clients_vms_still_count_after_a_restart(tmp_path: Path,
                                                         clients: list[Client]) -> None:
    """With a token file, a VM is saved with its client's name: after the restart alice
    still holds her VM (--max-vms-per-client 1 refuses her next one), bob does not."""
    token_file = tmp_path / "clients"
    token_file.write_text("alice alice-secret-1\nbob bob-secret-2\n")
    path = tmp_path / "machine.pkvm"
    flags = ("--client-token-file", str(token_file), "--max-vms-per-client", "1",
             "--state-file", str(path))
    with ServeProcess(*flags) as server:
        alice = Client(server.target, "alice-secret-1")
        clients.append(alice)
        alice.create()
        assert server.stop() == 0
    with ServeProcess(*flags) as again:
        alice, bob = Client(again.target, "alice-secret-1"), Client(again.target, "bob-secret-2")
        clients += [alice, bob]
        assert alice.creating() == (EXHAUSTED, "TOO_MANY_VMS_FOR_CLIENT")
        bob.create()


def test_a_connections_vm_is_adopted_by_its_first_caller_after_a_restart(
        tmp_path: Path, clients: list[Client]) -> None:
    """Without a token file a client is its connection, which a restart cannot name again:
    the restored VM belongs to the first connection that calls it with its VM token
    (RenewVM here), and counts against it; another connection's streams on it count against
    the adopter too."""
    path = tmp_path / "machine.pkvm"
    flags = ("--max-vms-per-client", "1", "--max-streams-per-client", "1",
             "--state-file", str(path))
    with ServeProcess(*flags) as server:
        creator = Client(server.target)
        clients.append(creator)
        vm = creator.create()
        assert server.stop() == 0
    with ServeProcess(*flags) as again:
        adopter, stranger = reconnect(again, creator), Client(again.target)
        clients += [adopter, stranger]
        stranger.create()  # the restored VM is nobody's yet
        adopter.stub.RenewVM(pb2.RenewVMRequest(handle=vm.handle),
                             metadata=adopter.vm_metadata(vm), timeout=30)
        assert adopter.creating() == (EXHAUSTED, "TOO_MANY_VMS_FOR_CLIENT")
        # The stranger holds the VM's token too (the file keeps tokens): the VM is the
        # adopter's, and so is a stream on it; one is the adopter's cap.
        stranger.tokens[vm.handle] = adopter.tokens[vm.handle]
        get = pb2.ExecuteRequest(handle=vm.handle, ops=[pb2.BATCH_OP_GET_PAGE],
                                 arg0=[vm.slice_base_pfn])
        stream = OpenStream(stranger.stub, stranger.vm_metadata(vm), timeout=60)
        stream.send(get)
        call = adopter.stub.Execute(iter(()), metadata=adopter.vm_metadata(vm), timeout=30)
        assert refusal(lambda: list(call)) == (EXHAUSTED, "TOO_MANY_STREAMS_FOR_CLIENT")
        stream.close()


# -- 3. the tables of a VM's creation and of its guest maps -----------------------------------


@pytest.mark.parametrize("profile", ["v6.12", "v7.3"])
def test_the_tables_a_vms_creation_and_guest_maps_take_are_its_own(
        profile: str, clients: list[Client]) -> None:
    """The host's shares of struct kvm and the vCPUs (v6.12; v7.3 pins them), the donations
    of the VM's first run and (v7.3) the memcache pages a guest map refills make EL2 take
    stage-1 tables from the hyp pool on the VM's behalf: the lone VM is charged every one
    (before the fix: none, and it could allocate its whole quota on top)."""
    with ServeProcess("--profile", profile, "--quota-hyp-pages", str(QUOTA),
                      "--max-pages-per-op", "1024") as server:
        client = Client(server.target)
        clients.append(client)
        booted = hyp_free_pages(client.stub)
        vm = client.create(slice_pages=4096)
        metadata = client.vm_metadata(vm)
        if profile == "v7.3":
            # 1024 host memcache pages reach past the 2 MiB regions EL2 maps already; the
            # guest map's refill donates them all, and EL2 maps them with new tables.
            client.stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=vm.handle,
                                                               nr_pages=1024),
                                      metadata=metadata, timeout=30)
            before = hyp_free_pages(client.stub)
            client.stub.GuestMap(pb2.GuestMapRequest(
                handle=vm.handle, ipa=0x4000_0000, pfn=vm.slice_base_pfn),
                metadata=metadata, timeout=30)
            assert hyp_free_pages(client.stub) < before
        tables = booted - hyp_free_pages(client.stub)
        assert tables > 0
        assert room(client, vm) == QUOTA - tables
