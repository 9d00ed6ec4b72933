"""Execute: batches of per-VM operations in a packed encoding (docs/performance.md).

A batch is parallel packed arrays: operation i is (ops[i], arg0[i], arg1[i]). Operations run
in order; each is either fully done or refused with the status code the unary RPC would give
(INVALID_ARGUMENT for an unknown op code). A refusal does not stop the batch unless
`stop_on_error`, in which case every later operation is reported ABORTED and not run. The
response has one code and one value per operation, and one BatchError per refusal.

A batch runs in chunks (`BatchRun.step`): the service holds the simulator lock for one chunk
of at most `budget` seconds (plus the one operation that crosses it), then lets every other
call in before the next chunk. So no batch, however heavy, holds the lock for long, and a
batch whose client went away, whose deadline passed or whose server is stopping ends at a
chunk boundary (`abort_rest` reports the operations that did not run as ABORTED).

A FATAL host fault (the real hypervisor would panic) is OK with outcome FATAL in the unary
RPCs; in a batch it is reported as FAILED_PRECONDITION (reason WOULD_PANIC) so that one int
per operation says whether it took effect.
"""

from __future__ import annotations

import bisect
import functools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2

from pkvm_sim.core.errors import PkvmError

from .errors import ServiceError, status_code_of
from .limits import MAX_BATCH_OPS, invalid
from .operations import (
    BY_BATCH_OP,
    Auth,
    Machine,
    Operation,
    alloc_pages_run,
    put_pages_run,
)

__all__ = ["MAX_BATCH_OPS", "BatchRun", "batch_functions", "validate_batch"]

_ABORTED = 10  # google.rpc.Code.ABORTED
_INVALID_ARGUMENT = 3
_INTERNAL = 13

_VALID_POOL_ARGS = (pb2.POOL_KIND_UNSPECIFIED, pb2.POOL_KIND_HYP, pb2.POOL_KIND_VM)

BatchFn = Callable[..., int]
BatchTable = dict[int, tuple[BatchFn, int]]


def batch_functions(machine: Machine, *, host_wide_allowed: bool = True) -> BatchTable:
    """BatchOp -> (function(handle, arg0[, arg1]) -> value, number of args after the
    handle), made from the operation records (service/operations.py)."""
    return {op: batch_entry(operation, machine, host_wide_allowed)
            for op, operation in BY_BATCH_OP.items()}


def batch_entry(operation: Operation, machine: Machine,
                host_wide_allowed: bool) -> tuple[BatchFn, int]:
    """One operation as a batch runs it: the batch's handle (when the operation takes one)
    then arg0 and arg1 for its next arguments; its value is `batch_value(result)`."""
    takes_handle = operation.args[:1] == ("handle",)
    nr_args = min(2, len(operation.args) - takes_handle)
    if operation.auth is Auth.CLIENT and not host_wide_allowed:
        return _host_wide_refused, nr_args
    run: Callable[..., Any] = functools.partial(operation.run, machine)
    value = operation.batch_value
    if value is None:
        if takes_handle:
            return run, nr_args  # the hot case: no wrapper at all
        return (lambda handle, *args: run(*args)), nr_args
    if takes_handle:
        return (lambda handle, *args: value(run(handle, *args))), nr_args
    return (lambda handle, *args: value(run(*args))), nr_args


def _host_wide_refused(handle: int, *args: int) -> int:
    """A batch carries its VM's token, not the client token a host-wide call needs."""
    raise ServiceError(
        grpc.StatusCode.PERMISSION_DENIED, "CLIENT_TOKEN_REQUIRED",
        "host-wide operations need the client token: use the MapMMIO/HostFault RPCs")


def validate_batch(request: pb2.ExecuteRequest) -> None:
    """The batch's shape: 1..MAX_BATCH_OPS operations, no more arguments than operations."""
    n = len(request.ops)
    if not 0 < n <= MAX_BATCH_OPS:
        raise invalid("BAD_BATCH_SIZE", f"a batch holds 1 to {MAX_BATCH_OPS} operations, not {n}")
    if len(request.arg0) > n or len(request.arg1) > n:
        raise invalid("BAD_BATCH_SIZE", "a batch has more arguments than operations")


def _padded(values: Sequence[int], n: int) -> list[int]:
    out = cast(list[int], values[:])  # a repeated field sliced is a new list
    if len(out) < n:
        out += [0] * (n - len(out))
    return out


class BatchRun:
    """One validated batch, run chunk by chunk; the caller holds the simulator lock for
    each `step`.

    Runs of allocs (same order and pool) and runs of puts go through the core's run methods,
    which do exactly what the single calls do, minus the per-call lookups.
    """

    def __init__(
        self, machine: Machine, fns: BatchTable, request: pb2.ExecuteRequest,
    ) -> None:
        self.machine = machine
        self.fns = fns
        self.request = request
        self.ops = cast(list[int], request.ops[:])  # slicing: 3x faster than list()
        n = self.n = len(self.ops)
        self.arg0 = _padded(request.arg0, n)
        self.arg1 = _padded(request.arg1, n)
        self.codes = [0] * n
        self.values = [0] * n
        self.errors: list[pb2.BatchError] = []
        self.refused: list[int] = []  # indices of valid ops that were refused
        self.failed = 0  # refused and invalid operations
        self.next = 0  # the first operation not yet run
        self.stopped = False  # stop_on_error hit, or aborted
        self.abort_reason: str | None = None  # why abort_rest cut the batch short

    @property
    def done(self) -> bool:
        return self.stopped or self.next >= self.n

    def step(self, budget: float) -> bool:
        """Run operations for about `budget` seconds (at least one); True once done."""
        clock = time.perf_counter
        deadline = clock() + budget
        fns, ops, arg0, arg1 = self.fns, self.ops, self.arg0, self.arg1
        handle, n, i = self.request.handle, self.n, self.next
        while i < n:
            op = ops[i]
            error: BaseException | None = None
            end = _run_end(ops, arg0, arg1, i) if op in _RUN_OPS else i + 1
            if end - i > 1:
                done, error = self._run(op, i, end)
                i += done
                if error is None:
                    if clock() >= deadline:
                        break
                    continue
            else:
                entry = fns.get(op)
                if entry is None:
                    error = _InvalidOp(op)
                else:
                    fn, nr_args = entry
                    try:
                        self.values[i] = fn(handle, arg0[i]) if nr_args == 1 \
                            else fn(handle, arg0[i], arg1[i])
                    except Exception as exc:  # noqa: BLE001 (reported per operation below)
                        error = exc
                    else:
                        i += 1
                        if clock() >= deadline:
                            break
                        continue
            assert error is not None
            self.codes[i] = _record_refusal(self.errors, i, error)
            self.failed += 1
            if not isinstance(error, _InvalidOp):
                self.refused.append(i)
            i += 1
            if self.request.stop_on_error:
                self.next = i
                self.abort_rest(None)
                return True
            if clock() >= deadline:
                break
        self.next = i
        return self.done

    def _run(self, op: int, i: int, end: int) -> tuple[int, BaseException | None]:
        """A run of identical allocs or puts from i: (operations done, the refusal)."""
        handle = self.request.handle
        if op == _ALLOC:
            values, error = alloc_pages_run(self.machine, handle, self.arg0[i], self.arg1[i],
                                            end - i)
        else:
            values, error = put_pages_run(self.machine, handle, self.arg0[i:end])
        self.values[i:i + len(values)] = values
        return len(values), error

    def abort_rest(self, reason: str | None, message: str = "") -> None:
        """Report every operation not yet run as ABORTED (with one BatchError naming
        `reason` at the first of them, when given); the batch is done."""
        if self.next < self.n and reason is not None:
            self.errors.append(pb2.BatchError(index=self.next, reason=reason, message=message))
        for j in range(self.next, self.n):
            self.codes[j] = _ABORTED
        self.stopped = True
        self.abort_reason = reason

    def response(self) -> pb2.ExecuteResponse:
        if self.failed or self.next < self.n:  # some code is not OK
            return pb2.ExecuteResponse(
                batch_id=self.request.batch_id, codes=self.codes, values=self.values,
                errors=self.errors, completed=self.next - self.failed,
            )
        # Every operation OK: the n zero codes come from a parsed template (C speed), not
        # from n Python ints converted one by one (about half of building the response);
        # so do the values when all are 0 (a batch of puts that freed every page).
        n = self.n
        zero_values = self.values.count(0) == n  # at C speed
        response = pb2.ExecuteResponse.FromString(_all_ok(n, zero_values))
        response.batch_id = self.request.batch_id
        if not zero_values:
            response.values.extend(self.values)
        response.completed = n
        return response

    def count_into(self, operations: dict[str, int], start: int = 0) -> None:
        """pkvm_operations_total: every op from `start` to the next one to run that ran and
        was not refused. Call under the simulator lock, which guards `operations` (the
        service counts each chunk's ops as the chunk ends)."""
        ran = self.ops if start == 0 and self.next == self.n else self.ops[start:self.next]
        if ran and ran.count(ran[0]) == len(ran):  # one kind of op (counted at C speed)
            kinds: dict[int, int] = {ran[0]: len(ran)}
        else:
            kinds = Counter(ran)
        for op, number in kinds.items():
            name = _COUNTED.get(op)
            if name is not None:
                operations[name] += number
        for i in self.refused[bisect.bisect_left(self.refused, start):]:
            name = _COUNTED.get(self.ops[i])
            if name is not None and i < self.next:
                operations[name] -= 1


@functools.lru_cache(maxsize=64)
def _all_ok(n: int, zero_values: bool) -> bytes:
    """An ExecuteResponse holding n OK codes (and n zero values if `zero_values`) and
    nothing else, serialized: packed fields, each its tag, its length and n zero bytes."""
    return pb2.ExecuteResponse(codes=[0] * n, values=[0] * n if zero_values else []
                               ).SerializeToString()


_COUNTED = {op: operation.counted for op, operation in BY_BATCH_OP.items()
            if operation.counted is not None}
_ALLOC = pb2.BATCH_OP_ALLOC_PAGES
_PUT = pb2.BATCH_OP_PUT_PAGE
_RUN_OPS = (_ALLOC, _PUT)


def _run_end(ops: list[int], arg0: list[int], arg1: list[int], start: int) -> int:
    """End of the run of identical operations from `start`: puts, or allocs of one order
    from one valid pool."""
    op, n, end = ops[start], len(ops), start + 1
    if op == _PUT:
        if _tail_is(ops, start, _PUT):  # the common case, checked at C speed
            return n
        while end < n and ops[end] == _PUT:
            end += 1
        return end
    order, pool = arg0[start], arg1[start]
    if pool not in _VALID_POOL_ARGS:
        return end
    if _tail_is(ops, start, _ALLOC) and _tail_is(arg0, start, order) \
            and _tail_is(arg1, start, pool):
        return n
    while end < n and ops[end] == _ALLOC and arg0[end] == order and arg1[end] == pool:
        end += 1
    return end


def _tail_is(values: list[int], start: int, value: int) -> bool:
    """values[start:] all equal `value` (list.count runs in C)."""
    return values[start:].count(value) == len(values) - start


class _InvalidOp(Exception):
    """An op code with no function (BATCH_OP_UNSPECIFIED or unknown)."""


def _record_refusal(errors: list[pb2.BatchError], index: int, error: BaseException) -> int:
    """Describe a refused operation; returns its google.rpc.Code."""
    if isinstance(error, _InvalidOp):
        errors.append(pb2.BatchError(index=index, reason="INVALID_OP", message=f"op {error}"))
        return _INVALID_ARGUMENT
    if isinstance(error, PkvmError):
        errors.append(pb2.BatchError(index=index, reason=error.reason, message=error.message,
                                     would_panic=error.would_panic, errno=error.errno_name))
        return int(status_code_of(error).value[0])
    if isinstance(error, ServiceError):
        errors.append(pb2.BatchError(index=index, reason=error.reason, message=error.message))
        return int(error.code.value[0])
    # A simulator bug: report it, keep serving.
    errors.append(pb2.BatchError(index=index, reason="INTERNAL", message=repr(error)))
    return _INTERNAL
