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
- concurrency (RESOURCE_EXHAUSTED): `max_streams` open Execute streams in all
  (`TOO_MANY_STREAMS`), `max_streams_per_vm` per VM (`TOO_MANY_STREAMS_FOR_VM`),
  `max_concurrent_rpcs` calls being served at once (`TOO_MANY_RPCS`), and a stream idle for
  `stream_idle_seconds` is closed (`STREAM_IDLE`).

The service holds the mutable side (`Admission`, `HypPageLedger`) on its event loop; the
ledger is written together with the core under the simulator lock.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .errors import ServiceError

MAX_NAME_BYTES = 64
MAX_BATCH_OPS = 4096
UNLIMITED = 0


@dataclass(frozen=True)
class Limits:
    max_vms: int = 1024
    quota_slice_pages: int = 262_144  # 1 GiB of 4 KiB pages: a quarter of the quick-start RAM
    quota_hyp_pages: int = 256  # a tenth of the quick-start hyp pool (2569 pages)
    # Host pages one VM's memcache may hold, topped up but not yet used (a guest map takes
    # a few): without it one VM with a 1-page slice could take every page of host RAM.
    quota_memcache_pages: int = 4096
    max_pages_per_op: int = 256
    max_streams: int = 256
    max_streams_per_vm: int = 4
    max_concurrent_rpcs: int = 1024
    stream_idle_seconds: float = 60.0  # 0: idle streams stay open
    # Transport bounds, enforced by gRPC's HTTP/2 layer before any handler (or credential
    # check) runs: a client that opens streams and sends no body costs at most this many
    # pending calls per connection, and at most max_connections connections are accepted.
    max_connections: int = 256
    max_streams_per_connection: int = 128

    def __post_init__(self) -> None:
        for name in ("max_vms", "quota_slice_pages", "quota_hyp_pages",
                     "quota_memcache_pages", "max_streams",
                     "max_streams_per_vm", "max_concurrent_rpcs", "max_connections",
                     "max_streams_per_connection"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit)")
        if not 1 <= self.max_pages_per_op <= 4096:
            raise ValueError("max_pages_per_op must be in 1..4096 (MAX_PAGES_PER_CALL)")


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
    """Pages each VM holds from the hyp pool: handle -> {block head pfn: pages}.

    Every alloc from the hyp pool and every put that frees a block passes through the
    service, so the ledger follows the core exactly (tests compare it with the core's pool
    statistics). Blocks of a VM's own pool are not recorded.
    """

    def __init__(self, quota: int = UNLIMITED) -> None:
        self.quota = quota
        # Without a quota nothing is refused, so nothing needs recording (held() is then 0).
        self.tracking = quota != UNLIMITED
        self._blocks: dict[int, dict[int, int]] = {}
        self._pages: dict[int, int] = {}

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
        """The VM is gone: everything it held went back to the pool."""
        self._blocks.pop(handle, None)
        self._pages.pop(handle, None)


class Admission:
    """Counts calls and open streams, and refuses those over the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.rpcs = 0
        self.streams = 0
        self._streams_of: dict[int, int] = {}

    def enter_rpc(self) -> None:
        limit = self.limits.max_concurrent_rpcs
        if limit and self.rpcs >= limit:
            raise exhausted("TOO_MANY_RPCS", f"the server is serving {limit} calls; retry later")
        self.rpcs += 1

    def leave_rpc(self) -> None:
        self.rpcs -= 1

    def open_stream(self, handle: int) -> None:
        limits = self.limits
        if limits.max_streams and self.streams >= limits.max_streams:
            raise exhausted("TOO_MANY_STREAMS",
                            f"{limits.max_streams} Execute streams are open; retry later")
        mine = self._streams_of.get(handle, 0)
        if limits.max_streams_per_vm and mine >= limits.max_streams_per_vm:
            raise exhausted("TOO_MANY_STREAMS_FOR_VM",
                            f"VM {handle:#x} has {mine} Execute streams open "
                            f"(at most {limits.max_streams_per_vm})")
        self.streams += 1
        self._streams_of[handle] = mine + 1

    def close_stream(self, handle: int) -> None:
        self.streams -= 1
        left = self._streams_of[handle] - 1
        if left:
            self._streams_of[handle] = left
        else:
            del self._streams_of[handle]
