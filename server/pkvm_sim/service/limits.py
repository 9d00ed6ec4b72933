"""What one tenant may take: quotas, request bounds and concurrency limits.

Every limit refuses with a clear status and reason and changes nothing:

- quotas (RESOURCE_EXHAUSTED, `QUOTA_EXCEEDED`): `max_vms` VMs in all, `quota_slice_pages`
  the largest slice one VM may ask for, `quota_hyp_pages` the pages one VM may hold from the
  hyp pool at once (0 = no limit: a single user may drain the pool when they ask to),
  `quota_memcache_pages` the host pages one VM's memcache may hold (TopupMemcache);
- request bounds (INVALID_ARGUMENT): a VM name of at most `MAX_NAME_BYTES` bytes
  (`NAME_TOO_LONG`), at most `max_pages_per_op` pages per page-by-page operation (`BAD_SIZE`;
  this keeps the longest single operation near 4 ms here, see docs/service.md), at most
  MAX_BATCH_OPS operations per batch and no more arguments than operations;
- transport (HTTP/2, before any credential is checked): `max_streams_per_connection`
  concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS: a stream over
  it is reset with REFUSED_STREAM) and `max_connections` connections (one more is closed
  at once);
- per client (RESOURCE_EXHAUSTED; a client is its line of the client token file, else its
  connection): `max_vms_per_client` VMs (`TOO_MANY_VMS_FOR_CLIENT`),
  `max_lease_seconds_per_client` lease seconds its live VMs hold in all
  (`CLIENT_LEASE_EXCEEDED`), `max_streams_per_client` Execute streams on its VMs
  (`TOO_MANY_STREAMS_FOR_CLIENT`);
- concurrency (RESOURCE_EXHAUSTED): `max_streams` open Execute streams in all
  (`TOO_MANY_STREAMS`), `max_streams_per_vm` per VM (`TOO_MANY_STREAMS_FOR_VM`),
  `max_concurrent_rpcs` calls being served at once (`TOO_MANY_RPCS`), and a stream idle for
  `stream_idle_seconds` is closed (`STREAM_IDLE`).

The service holds the mutable side (`Admission`, `HypPageLedger`, `ClientLedger`) on its
event loop; the ledgers are written together with the core under the simulator lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from pkvm_sim.core.hyp_stage1 import HypStage1, Key
from pkvm_sim.settings import MAX_BATCH_OPS, UNLIMITED, Limits

from .errors import ServiceError

__all__ = ["MAX_BATCH_OPS", "MAX_NAME_BYTES", "UNLIMITED", "Admission", "ClientLedger",
           "HypPageLedger", "Limits", "choose_payer"]

MAX_NAME_BYTES = 64


def quota_exceeded(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", message)


def exhausted(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message)


def invalid(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def check_name(name: str) -> None:
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise invalid("NAME_TOO_LONG", f"a VM name holds at most {MAX_NAME_BYTES} bytes, "
                      f"not {size}")


def check_pages(nr_pages: int, limit: int) -> None:
    """A page-by-page operation's size against the service's bound (the core checks >= 1)."""
    if nr_pages > limit:
        raise invalid("BAD_SIZE", f"at most {limit} pages per operation, not {nr_pages}; "
                      "split the range into several calls")


class HypPageLedger:
    """Pages each VM holds from the hyp pool: handle -> {block head pfn: pages}, and the
    hyp stage-1 table pages its host shares (or, v6.16+, its pins) made EL2 take.

    Every alloc from the hyp pool and every put that frees a block passes through the
    service, so the ledger follows the core exactly (tests compare it with the core's pool
    statistics). Blocks of a VM's own pool are not recorded.

    A table page is charged to the VM on whose behalf EL2 allocated it: its share or pin
    (planned and refused over the quota), or its creation and its guest maps' memcache
    refills (charged after the fact, never refused: `charge_new_tables`). The charge is
    released when EL2 frees the table (left empty), whichever VM's unshare empties it. When
    the paying VM is destroyed and the table is still in use, the charge moves to a VM that
    uses it (`choose_payer`), even over that VM's quota: a destroy cannot be refused, and the
    new payer's shares, pins and allocations are refused until it is back under.
    """

    def __init__(self, quota: int = UNLIMITED) -> None:
        self.quota = quota
        # Without a quota nothing is refused, so nothing needs recording (held() is then 0).
        self.tracking = quota != UNLIMITED
        self._blocks: dict[int, dict[int, int]] = {}
        self._pages: dict[int, int] = {}
        self._tables: dict[int, tuple[int, Key]] = {}  # table pfn -> (VM charged, its key)
        # Tables no live VM used when their payer went (none expected: every page EL2 maps
        # at run time is some VM's), never charged again while they last.
        self._unpaid: dict[int, Key] = {}

    def tables_of(self, handle: int) -> int:
        """Stage-1 table pages charged to VM `handle`."""
        return sum(1 for owner, _key in self._tables.values() if owner == handle)

    def check_tables(self, handle: int, keys: list[Key], what: str) -> None:
        """Refuse a share that would make EL2 allocate `keys` over the VM's quota."""
        if keys and len(keys) > self.room(handle):
            raise quota_exceeded(
                f"VM {handle:#x} holds {self.held(handle)} hyp pool pages; {what} would make"
                f" EL2 take {len(keys)} stage-1 table page(s), over its quota of {self.quota}")

    def charge_tables(self, handle: int, stage1: HypStage1, keys: list[Key]) -> None:
        """Charge VM `handle` the tables of `keys` that the operation just made (a key with
        no table: the operation stopped before reaching it)."""
        if not self.tracking:
            return
        for key in keys:
            pfn = stage1.table_at(key)
            if pfn is not None and pfn not in self._tables:
                self._charge(pfn, handle, key)

    def settle_tables(self, stage1: HypStage1, tables_before: int | None = None) -> None:
        """Release the charge of every charged table EL2 has freed. An unmapping operation
        passes the run-time table count it started with: when the count did not go down it
        freed nothing, and the check costs one len() (None: always look, O(charged))."""
        if not (self._tables or self._unpaid) or (tables_before is not None
                                                   and stage1.nr_tables >= tables_before):
            return
        for pfn, (owner, key) in list(self._tables.items()):
            if stage1.table_at(key) != pfn:
                del self._tables[pfn]
                self._pages[owner] -= 1
        for pfn, key in list(self._unpaid.items()):
            if stage1.table_at(key) != pfn:
                del self._unpaid[pfn]

    def held(self, handle: int) -> int:
        return self._pages.get(handle, 0)

    def room(self, handle: int) -> int:
        """Pages VM `handle` may still take from the hyp pool (a large number if unlimited)."""
        if self.quota == UNLIMITED:
            return 1 << 62
        return self.quota - self._pages.get(handle, 0)

    def check(self, handle: int, order: int) -> None:
        """Refuse an order-`order` block over the VM's quota (a bad order is the core's to
        refuse)."""
        if 0 <= order <= 62 and (1 << order) > self.room(handle):
            raise quota_exceeded(
                f"VM {handle:#x} holds {self.held(handle)} hyp pool pages; an order-{order} "
                f"block would exceed its quota of {self.quota}")

    def allocated_one(self, handle: int, pfn: int, order: int) -> None:
        """Record one block (the unary AllocPages)."""
        if self.tracking:
            size = 1 << order
            self._blocks.setdefault(handle, {})[pfn] = size
            self._pages[handle] = self._pages.get(handle, 0) + size

    def put_one(self, handle: int, pfn: int, refcount: int) -> None:
        """Record one put (the unary PutPage); a refcount of 0 freed the block."""
        if refcount or not self.tracking:
            return
        blocks = self._blocks.get(handle)
        if blocks:
            self._pages[handle] -= blocks.pop(pfn, 0)

    def allocated(self, handle: int, pfns: list[int], order: int) -> None:
        if pfns and self.tracking:
            size = 1 << order
            self._blocks.setdefault(handle, {}).update(dict.fromkeys(pfns, size))
            self._pages[handle] = self._pages.get(handle, 0) + size * len(pfns)

    def put(self, handle: int, pfns: list[int], refcounts: list[int]) -> None:
        """Record puts; a refcount of 0 freed the block."""
        blocks = self._blocks.get(handle) if self.tracking else None
        if not blocks:
            return
        pop = blocks.pop
        freed = sum(pop(pfn, 0) for pfn, count in zip(pfns, refcounts, strict=False)
                    if not count)
        if freed:
            self._pages[handle] -= freed

    def charge_new_tables(self, handle: int, stage1: HypStage1, tables_before: int) -> None:
        """Charge VM `handle` the tables an operation on its behalf made EL2 take without a
        plan (its creation, a guest map's memcache refill): the run-time tables nobody is
        charged for yet. `tables_before`: the run-time table count the operation started
        with (unchanged: it made none, and this costs one len())."""
        if not self.tracking or stage1.nr_tables <= tables_before:
            return
        for level, index, pfn in stage1.dump():
            if pfn not in self._tables and pfn not in self._unpaid:
                self._charge(pfn, handle, (level, index))

    def _charge(self, pfn: int, handle: int, key: Key) -> None:
        self._tables[pfn] = (handle, key)
        self._pages[handle] = self._pages.get(handle, 0) + 1

    def tables_charged_to(self, handle: int) -> dict[int, Key]:
        """table pfn -> key of the tables charged to VM `handle`."""
        return {pfn: key for pfn, (owner, key) in self._tables.items() if owner == handle}

    def drop(self, handle: int, payers: dict[int, int | None] | None = None) -> None:
        """The VM is gone: everything it held went back to the pool. Its tables still in
        use (EL2 frees them when empty: settle first) are charged to `payers[pfn]`, the VM
        `choose_payer` named (None, or no entry: no live VM uses it; it is then charged to
        nobody, and not charged again)."""
        self._blocks.pop(handle, None)
        self._pages.pop(handle, None)
        payers = payers or {}
        for pfn, key in self.tables_charged_to(handle).items():
            del self._tables[pfn]
            payer = payers.get(pfn)
            if payer is None:
                self._unpaid[pfn] = key
            else:
                self._charge(pfn, payer, key)

    # -- a state file's service section (service/persist.py) --------------------------------

    def table_charges(self) -> list[list[int]]:
        """[[table pfn, VM charged], ...] in charging order."""
        return [[pfn, owner] for pfn, (owner, _key) in self._tables.items()]

    def restore_tables(self, tables: dict[int, Key], charges: dict[int, int],
                       payers: dict[int, int | None]) -> None:
        """Charge the restored run-time `tables` (pfn -> key): to the VM a saved charge
        names, else (a file from a server without a quota, or older than the charges) to
        `payers[pfn]` (choose_payer; None: nobody)."""
        if not self.tracking:
            return
        for pfn, key in tables.items():
            payer = charges.get(pfn, payers.get(pfn))
            if payer is None:
                self._unpaid[pfn] = key
            else:
                self._charge(pfn, payer, key)


def choose_payer(users: list[int], client_of: Callable[[int], str | None],
                 payer_client: str | None) -> int | None:
    """Who pays for a table once its payer is gone: among the live VMs that use it
    (`users`), a VM of the same client as the payer first, then the lowest handle (the
    oldest VM). Deterministic, so a restored server charges as the saved one did."""
    if not users:
        return None
    return min(users, key=lambda handle: (
        payer_client is None or client_of(handle) != payer_client, handle))


class ClientLedger:
    """Which client created each live VM, and what each client holds: its VMs and the
    lease seconds they hold in all.

    A VM restored from a state file keeps the client saved with it when that client is a
    line of this server's client token file (`restored`); otherwise (a connection's client,
    which a restart cannot name again, or a name the file no longer has) the VM waits to be
    adopted: without a token file, the first connection to call it with its VM token
    becomes its client (`adopt`), even over that client's caps."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._of_vm: dict[int, tuple[str, float]] = {}  # handle -> (client, lease seconds)
        self._vms: dict[str, int] = {}
        self._lease_seconds: dict[str, float] = {}
        self.adoptable: dict[int, float] = {}  # restored VM -> its lease seconds

    def state(self) -> list[list[object]]:
        """[[handle, client], ...] of the VMs with a client (a state file's section)."""
        return [[handle, client] for handle, (client, _lease) in self._of_vm.items()]

    def restored(self, handle: int, client: str | None, lease_seconds: float,
                 adoptable: bool) -> None:
        """A VM restored from a state file, saved with `client` (None: no client known)."""
        if client is not None:
            self.created(handle, client, lease_seconds)
        elif adoptable:
            self.adoptable[handle] = lease_seconds

    def adopt(self, handle: int, client: str) -> str | None:
        """`client` called restored VM `handle` with its token: it is now the VM's client
        when the VM had none. The VM's client (None: none, and not adoptable)."""
        lease_seconds = self.adoptable.pop(handle, None)
        if lease_seconds is not None:
            self.created(handle, client, lease_seconds)
        return self.owner_of(handle)

    def owner_of(self, handle: int) -> str | None:
        entry = self._of_vm.get(handle)
        return None if entry is None else entry[0]

    def vms_of(self, client: str) -> int:
        return self._vms.get(client, 0)

    def lease_seconds_of(self, client: str) -> float:
        return self._lease_seconds.get(client, 0.0)

    def check_create(self, client: str, lease_seconds: float) -> None:
        """Refuse a CreateVM over the client's caps (`lease_seconds`: the lease it gets)."""
        limits = self.limits
        vms = self.vms_of(client)
        if limits.max_vms_per_client and vms >= limits.max_vms_per_client:
            raise exhausted("TOO_MANY_VMS_FOR_CLIENT",
                            f"client {client} holds {vms} VMs (at most "
                            f"{limits.max_vms_per_client} per client)")
        held = self.lease_seconds_of(client)
        cap = limits.max_lease_seconds_per_client
        if cap and held + lease_seconds > cap:
            raise exhausted("CLIENT_LEASE_EXCEEDED",
                            f"client {client}'s VMs hold {held:g} lease seconds; a lease of "
                            f"{lease_seconds:g} s would exceed its {cap:g} (ask a shorter "
                            "lease, or destroy a VM)")

    def created(self, handle: int, client: str, lease_seconds: float) -> None:
        self._of_vm[handle] = (client, lease_seconds)
        self._vms[client] = self._vms.get(client, 0) + 1
        self._lease_seconds[client] = self._lease_seconds.get(client, 0.0) + lease_seconds

    def forget(self, handle: int) -> None:
        """VM `handle` is gone: its client holds one VM and its lease less."""
        self.adoptable.pop(handle, None)
        entry = self._of_vm.pop(handle, None)
        if entry is None:
            return
        client, lease_seconds = entry
        left = self._vms[client] - 1
        if left:
            self._vms[client] = left
            self._lease_seconds[client] -= lease_seconds
        else:  # no float residue left behind
            del self._vms[client]
            del self._lease_seconds[client]


class Admission:
    """Counts calls and open streams, and refuses those over the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rpcs = 0
        self.streams = 0
        self._streams_of: dict[int, int] = {}
        self._streams_of_client: dict[str, int] = {}

    def enter_rpc(self) -> None:
        limit = self.limits.max_concurrent_rpcs
        if limit and self.rpcs >= limit:
            raise exhausted("TOO_MANY_RPCS", f"the server is serving {limit} calls; retry later")
        self.rpcs += 1

    def leave_rpc(self) -> None:
        self.rpcs -= 1

    def open_stream(self, handle: int, client: str | None = None) -> None:
        """Count a stream on VM `handle`, created by `client` (None: no client known)."""
        limits = self.limits
        if limits.max_streams and self.streams >= limits.max_streams:
            raise exhausted("TOO_MANY_STREAMS",
                            f"{limits.max_streams} Execute streams are open; retry later")
        mine = self._streams_of.get(handle, 0)
        if limits.max_streams_per_vm and mine >= limits.max_streams_per_vm:
            raise exhausted("TOO_MANY_STREAMS_FOR_VM",
                            f"VM {handle:#x} has {mine} Execute streams open "
                            f"(at most {limits.max_streams_per_vm})")
        if client is not None:
            theirs = self._streams_of_client.get(client, 0)
            if limits.max_streams_per_client and theirs >= limits.max_streams_per_client:
                raise exhausted("TOO_MANY_STREAMS_FOR_CLIENT",
                                f"client {client} has {theirs} Execute streams open on its "
                                f"VMs (at most {limits.max_streams_per_client})")
            self._streams_of_client[client] = theirs + 1
        self.streams += 1
        self._streams_of[handle] = mine + 1

    def close_stream(self, handle: int, client: str | None = None) -> None:
        self.streams -= 1
        _count_down(self._streams_of, handle)
        if client is not None:
            _count_down(self._streams_of_client, client)


def _count_down(counts: dict[Any, int], key: Any) -> None:
    """One less of `key`; a count reaching 0 leaves the dict (it would grow forever)."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
