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

from typing import Any

import grpc

from pkvm_sim.core.hyp_stage1 import HypStage1, Key
from pkvm_sim.settings import MAX_BATCH_OPS, UNLIMITED, Limits

from .errors import ServiceError

__all__ = ["MAX_BATCH_OPS", "MAX_NAME_BYTES", "UNLIMITED", "Admission", "ClientLedger",
           "HypPageLedger", "Limits"]

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

    A table page is charged to the VM whose share allocated it, and released when EL2
    frees it (the table left empty), whichever VM's unshare empties it. A table still in
    use when its VM is destroyed is charged to nobody from then on.
    """

    def __init__(self, quota: int = UNLIMITED) -> None:
        self.quota = quota
        # Without a quota nothing is refused, so nothing needs recording (held() is then 0).
        self.tracking = quota != UNLIMITED
        self._blocks: dict[int, dict[int, int]] = {}
        self._pages: dict[int, int] = {}
        self._tables: dict[int, tuple[int, Key]] = {}  # table pfn -> (VM charged, its key)

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
                self._tables[pfn] = (handle, key)
                self._pages[handle] = self._pages.get(handle, 0) + 1

    def settle_tables(self, stage1: HypStage1, tables_before: int | None = None) -> None:
        """Release the charge of every charged table EL2 has freed. An unmapping operation
        passes the run-time table count it started with: when the count did not go down it
        freed nothing, and the check costs one len() (None: always look, O(charged))."""
        if not self._tables or (tables_before is not None
                                and stage1.nr_tables >= tables_before):
            return
        for pfn, (owner, key) in list(self._tables.items()):
            if stage1.table_at(key) != pfn:
                del self._tables[pfn]
                self._pages[owner] -= 1

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

    def drop(self, handle: int) -> None:
        """The VM is gone: everything it held went back to the pool (its tables still in use
        by other VMs' shares are charged to nobody from now on)."""
        self._blocks.pop(handle, None)
        self._pages.pop(handle, None)
        if self._tables:
            for pfn in [pfn for pfn, (owner, _key) in self._tables.items() if owner == handle]:
                del self._tables[pfn]


class ClientLedger:
    """Which client created each live VM, and what each client holds: its VMs and the
    lease seconds they hold in all. VMs restored from a state file have no client."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._of_vm: dict[int, tuple[str, float]] = {}  # handle -> (client, lease seconds)
        self._vms: dict[str, int] = {}
        self._lease_seconds: dict[str, float] = {}

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
