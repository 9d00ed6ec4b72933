"""Batches for `Execute`: build packed operation arrays, read packed results.

    batch = Batch()
    a = batch.alloc_pages(order=0)          # returns the operation's index
    batch.alloc_pages(order=3, pool="vm")
    result = vm.execute(batch)
    pfn = result.value(a)                    # raises the operation's typed error if refused

Operations run in order under one acquisition of the simulator lock; each is fully done or
refused, and a refusal does not stop the batch unless `stop_on_error=True` (the rest are then
reported ABORTED and not run). A batch holds 1 to MAX_BATCH_OPS operations.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from pkvm.v1 import hypervisor_pb2 as pb2

from ._errors import PkvmError, make_error

MAX_BATCH_OPS = 4096
POOLS = {"hyp": pb2.POOL_KIND_HYP, "vm": pb2.POOL_KIND_VM}


def pool_kind(pool: str | int) -> int:
    if isinstance(pool, int):
        return pool
    try:
        return POOLS[pool]
    except KeyError:
        raise ValueError(f"pool must be 'hyp' or 'vm', not {pool!r}") from None


class Batch:
    """A list of operations for one VM, encoded as parallel packed arrays."""

    def __init__(self, *, stop_on_error: bool = False) -> None:
        self.stop_on_error = stop_on_error
        self.ops: list[int] = []
        self.arg0: list[int] = []
        self.arg1: list[int] = []

    def __len__(self) -> int:
        return len(self.ops)

    def _add(self, op: int, arg0: int = 0, arg1: int = 0) -> int:
        self.ops.append(op)
        self.arg0.append(arg0)
        self.arg1.append(arg1)
        return len(self.ops) - 1

    def alloc_pages(self, order: int = 0, pool: str | int = "hyp") -> int:
        return self._add(pb2.BATCH_OP_ALLOC_PAGES, order, pool_kind(pool))

    def put_page(self, pfn: int) -> int:
        return self._add(pb2.BATCH_OP_PUT_PAGE, pfn)

    def get_page(self, pfn: int) -> int:
        return self._add(pb2.BATCH_OP_GET_PAGE, pfn)

    def host_share(self, pfn: int, nr_pages: int = 1) -> int:
        return self._add(pb2.BATCH_OP_HOST_SHARE, pfn, nr_pages)

    def host_unshare(self, pfn: int, nr_pages: int = 1) -> int:
        return self._add(pb2.BATCH_OP_HOST_UNSHARE, pfn, nr_pages)

    def map_mmio(self, addr: int) -> int:
        return self._add(pb2.BATCH_OP_MAP_MMIO, addr)

    def host_fault(self, addr: int) -> int:
        return self._add(pb2.BATCH_OP_HOST_FAULT, addr)

    def topup_memcache(self, nr_pages: int) -> int:
        return self._add(pb2.BATCH_OP_TOPUP_MEMCACHE, nr_pages)

    def guest_map(self, ipa: int, pfn: int) -> int:
        return self._add(pb2.BATCH_OP_GUEST_MAP, ipa, pfn)

    def request(self, handle: int, batch_id: int = 0) -> pb2.ExecuteRequest:
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
        codes = tuple(response.codes)
        errors: dict[int, PkvmError] = {
            e.index: make_error(codes[e.index], e.message or e.reason, e.reason, "",
                                e.would_panic)
            for e in response.errors
        }
        for index, code in enumerate(codes):  # ABORTED ops have no BatchError
            if code and index not in errors:
                errors[index] = make_error(code, "not run: an earlier operation was refused",
                                           "ABORTED")
        return cls(codes, tuple(response.values), errors, response.completed)

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def ok(self) -> bool:
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
