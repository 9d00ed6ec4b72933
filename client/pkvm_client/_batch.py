"""Batches for `Execute`: build packed operation arrays, read packed results.

    batch = Batch()
    a = batch.alloc_pages(order=0)          # returns the operation's index
    batch.alloc_pages(order=3, pool=Pool.VM)
    result = vm.execute(batch)
    pfn = result.value(a)                    # raises the operation's typed error if refused

Operations run in order under one acquisition of the simulator lock; each is fully done or
refused, and a refusal does not stop the batch unless `stop_on_error=True` (the rest are then
reported ABORTED and not run). A batch holds 1 to MAX_BATCH_OPS operations.

A refused operation raises (from `value()`) the same exception class, with the same `reason`
and `errno`, as the unary call would: the server reports both per operation. The one
documented difference: a FATAL host fault is an outcome of the unary `map_mmio`/`host_fault`,
but a `WouldPanicError` in a batch, so that each operation's code says whether it took effect.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from pkvm.v1 import hypervisor_pb2 as pb2

from ._errors import PkvmError, make_error
from ._types import Pool, PoolName

MAX_BATCH_OPS = 4096
# Pool or pool name -> the protocol's PoolKind number (a Pool hashes as its value).
_POOL_ARG: dict[object, int] = {key: int(p) for p in Pool for key in (p, p.name.lower())}


class Batch:
    """A list of operations for one VM, encoded as parallel packed arrays."""

    def __init__(self, *, stop_on_error: bool = False) -> None:
        self.stop_on_error = stop_on_error
        self.ops: list[int] = []
        self.arg0: list[int] = []
        self.arg1: list[int] = []

    def __len__(self) -> int:
        """The number of operations in the batch."""
        return len(self.ops)

    def _add(self, op: int, arg0: int = 0, arg1: int = 0) -> int:
        self.ops.append(op)
        self.arg0.append(arg0)
        self.arg1.append(arg1)
        return len(self.ops) - 1

    def alloc_pages(self, order: int = 0, pool: Pool | PoolName = Pool.HYP) -> int:
        """Add hyp_alloc_pages of a 2**order block; its value is the block's head pfn."""
        arg = _POOL_ARG.get(pool)  # one lookup on the hot path; Pool.of explains a bad pool
        return self._add(pb2.BATCH_OP_ALLOC_PAGES, order, arg or int(Pool.of(pool)))

    def put_page(self, pfn: int) -> int:
        """Add hyp_put_page on a block head; its value is the refcount after."""
        return self._add(pb2.BATCH_OP_PUT_PAGE, pfn)

    def get_page(self, pfn: int) -> int:
        """Add hyp_get_page on a block head; its value is the refcount after."""
        return self._add(pb2.BATCH_OP_GET_PAGE, pfn)

    def host_share(self, pfn: int, nr_pages: int = 1) -> int:
        """Add __pkvm_host_share_hyp of slice pages; its value is `pfn`."""
        return self._add(pb2.BATCH_OP_HOST_SHARE, pfn, nr_pages)

    def host_unshare(self, pfn: int, nr_pages: int = 1) -> int:
        """Add __pkvm_host_unshare_hyp of slice pages; its value is `pfn`."""
        return self._add(pb2.BATCH_OP_HOST_UNSHARE, pfn, nr_pages)

    def map_mmio(self, addr: int) -> int:
        """Add a host stage-2 MMIO fault; its value is the mapped range's start."""
        return self._add(pb2.BATCH_OP_MAP_MMIO, addr)

    def host_fault(self, addr: int) -> int:
        """Add a host stage-2 fault on any address; its value is the mapped range's start."""
        return self._add(pb2.BATCH_OP_HOST_FAULT, addr)

    def topup_memcache(self, nr_pages: int) -> int:
        """Add a memcache top-up; its value is the memcache size after."""
        return self._add(pb2.BATCH_OP_TOPUP_MEMCACHE, nr_pages)

    def guest_map(self, ipa: int, pfn: int) -> int:
        """Add a guest stage-2 mapping of slice page `pfn` at `ipa`; its value is the level."""
        return self._add(pb2.BATCH_OP_GUEST_MAP, ipa, pfn)

    def request(self, handle: int, batch_id: int = 0) -> pb2.ExecuteRequest:
        """The protocol message for VM `handle` (ValueError for an empty or oversize batch)."""
        if not 0 < len(self.ops) <= MAX_BATCH_OPS:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH_OPS} operations, not {len(self)}")
        return pb2.ExecuteRequest(
            handle=handle, ops=cast(list[pb2.BatchOp], self.ops), arg0=self.arg0, arg1=self.arg1,
            stop_on_error=self.stop_on_error, batch_id=batch_id,
        )


@dataclass(frozen=True)
class BatchResult:
    """Per-operation codes (google.rpc.Code, 0 = OK) and values of one executed batch."""

    codes: tuple[int, ...]
    values: tuple[int, ...]
    errors: dict[int, PkvmError]
    completed: int

    @classmethod
    def from_response(cls, response: pb2.ExecuteResponse) -> BatchResult:
        """Read a protocol ExecuteResponse: each refusal becomes its typed exception."""
        codes = tuple(response.codes)
        errors: dict[int, PkvmError] = {
            e.index: make_error(codes[e.index], e.message or e.reason, e.reason, e.errno,
                                e.would_panic)
            for e in response.errors
        }
        for index, code in enumerate(codes):  # ABORTED ops have no BatchError
            if code and index not in errors:
                errors[index] = make_error(code, "not run: an earlier operation was refused",
                                           "ABORTED")
        return cls(codes, tuple(response.values), errors, response.completed)

    def __len__(self) -> int:
        """The number of operations in the batch."""
        return len(self.codes)

    @property
    def ok(self) -> bool:
        """Every operation succeeded."""
        return not self.errors

    def value(self, index: int) -> int:
        """Operation `index`'s result value, or raise its typed error."""
        error = self.errors.get(index)
        if error is not None:
            raise error
        return self.values[index]

    def raise_first(self) -> None:
        """Raise the first refusal, if any."""
        if self.errors:
            raise self.errors[min(self.errors)]

    def __iter__(self) -> Iterator[int | PkvmError]:
        """Each operation's value, or its error (not raised)."""
        for index, value in enumerate(self.values):
            yield self.errors.get(index, value)
