"""Execute: batches of per-VM operations in a packed encoding (PERFORMANCE.md).

A batch is parallel packed arrays: operation i is (ops[i], arg0[i], arg1[i]). The service
runs a whole batch under one acquisition of the simulator lock, operations in order. Each
operation is either fully done or refused with the status code the unary RPC would give
(INVALID_ARGUMENT for an unknown op code); a refusal does not stop the batch unless
`stop_on_error`, in which case every later operation is reported ABORTED and not run.
The response has one code and one value per operation, and one BatchError per refusal.

A FATAL host fault (the real hypervisor would panic) is OK with outcome FATAL in the unary
RPCs; in a batch it is reported as FAILED_PRECONDITION (reason WOULD_PANIC) so that one int
per operation says whether it took effect.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from pkvm.v1 import hypervisor_pb2 as pb2

from pkvm_sim.core.errors import InvalidArgument, PkvmError, WouldPanic
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, FaultResult, PoolKind

from .errors import status_code_of

MAX_BATCH_OPS = 4096
_ABORTED = 10  # google.rpc.Code.ABORTED
_INVALID_ARGUMENT = 3
_INTERNAL = 13

_POOL_OF_ARG = {0: PoolKind.HYP, 1: PoolKind.HYP, 2: PoolKind.VM}

BatchFn = Callable[..., int]


def _nr(value: int) -> int:
    return value or 1


def batch_functions(
    hv: Hypervisor, count_fault: Callable[[FaultResult], None] = lambda result: None
) -> tuple[tuple[BatchFn, int] | None, ...]:
    """Per BatchOp value: (function, number of args it takes after the handle).

    The hot operations are the core's own bound methods, so a batch op costs one call more
    than the in-process core, not two.
    """

    def _fault_value(result: FaultResult) -> int:
        count_fault(result)
        if result.outcome is FaultOutcome.FATAL:
            raise WouldPanic(f"{result.errno_name}: {result.reason}", reason="WOULD_PANIC")
        return result.range_start

    def alloc_pages(handle: int, order: int, pool: int) -> int:
        kind = _POOL_OF_ARG.get(pool)
        if kind is None:
            raise InvalidArgument(f"unknown pool {pool}", reason="INVALID_POOL")
        return hv.alloc_pages(handle, order, kind)

    def host_share(handle: int, pfn: int, nr: int) -> int:
        return hv.host_share(handle, pfn, _nr(nr)).pfn

    def host_unshare(handle: int, pfn: int, nr: int) -> int:
        return hv.host_unshare(handle, pfn, _nr(nr)).pfn

    def map_mmio(handle: int, addr: int) -> int:
        return _fault_value(hv.map_mmio(addr))

    def host_fault(handle: int, addr: int) -> int:
        return _fault_value(hv.host_fault(addr))

    def guest_map(handle: int, ipa: int, pfn: int) -> int:
        return hv.guest_map(handle, ipa, pfn).level

    return (
        None,
        (alloc_pages, 2),
        (hv.put_page, 1),
        (hv.get_page, 1),
        (host_share, 2),
        (host_unshare, 2),
        (map_mmio, 1),
        (host_fault, 1),
        (hv.topup_memcache, 1),
        (guest_map, 2),
    )


def _padded(values: Sequence[int], n: int) -> list[int]:
    out = list(values)
    if len(out) < n:
        out += [0] * (n - len(out))
    return out


def run_batch(
    hv: Hypervisor,
    fns: tuple[tuple[BatchFn, int] | None, ...],
    operation_counts: list[int],
    request: pb2.ExecuteRequest,
) -> pb2.ExecuteResponse:
    """Run one validated batch; the caller holds the simulator lock.

    Runs of allocs (same order and pool) and runs of puts go through the core's run methods,
    which do exactly what the single calls do, minus the per-call lookups.
    """
    ops: list[int] = list(request.ops)
    n = len(ops)
    arg0 = _padded(request.arg0, n)
    arg1 = _padded(request.arg1, n)
    handle = request.handle
    codes = [0] * n
    values = [0] * n
    errors: list[pb2.BatchError] = []
    refused: list[int] = []  # indices of valid ops that were refused (not counted as done)
    nr_fns = len(fns)
    i = 0
    while i < n:
        op = ops[i]
        error: BaseException | None = None
        end = _run_end(ops, arg0, arg1, i) if op in _RUN_OPS else i + 1
        if end - i > 1:
            if op == _ALLOC:
                done, error = hv.alloc_pages_run(handle, arg0[i], _POOL_OF_ARG[arg1[i]], end - i)
            else:
                done, error = hv.put_pages_run(handle, arg0[i:end])
            values[i:i + len(done)] = done
            i += len(done)
            if error is None:
                continue
        else:
            entry = fns[op] if 0 <= op < nr_fns else None
            if entry is None:
                codes[i] = _INVALID_ARGUMENT
                errors.append(pb2.BatchError(index=i, reason="INVALID_OP", message=f"op {op}"))
            else:
                fn, nr_args = entry
                try:
                    values[i] = fn(handle, arg0[i]) if nr_args == 1 \
                        else fn(handle, arg0[i], arg1[i])
                    i += 1
                    continue
                except Exception as exc:  # noqa: BLE001 (reported per operation below)
                    error = exc
        if error is not None:
            codes[i] = _record_refusal(errors, i, error)
            refused.append(i)
        i += 1
        if request.stop_on_error:
            for j in range(i, n):
                codes[j] = _ABORTED
            break
    _count_done(operation_counts, ops[:i], refused, nr_fns)
    return pb2.ExecuteResponse(
        batch_id=request.batch_id, codes=codes, values=values, errors=errors,
        completed=i - len(errors),
    )


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
    if pool not in _POOL_OF_ARG:
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


def _record_refusal(errors: list[pb2.BatchError], index: int, error: BaseException) -> int:
    """Describe a refused operation; returns its google.rpc.Code."""
    if isinstance(error, PkvmError):
        errors.append(pb2.BatchError(index=index, reason=error.reason, message=error.message,
                                     would_panic=error.would_panic, errno=error.errno_name))
        return int(status_code_of(error).value[0])
    # A simulator bug: report it, keep serving.
    errors.append(pb2.BatchError(index=index, reason="INTERNAL", message=repr(error)))
    return _INTERNAL


def _count_done(counts: list[int], ran: list[int], refused: list[int], nr_fns: int) -> None:
    """pkvm_operations_total: every op that ran and was not refused, once per batch."""
    for op, number in Counter(ran).items():
        if 0 < op < nr_fns:
            counts[op] += number
    for i in refused:
        counts[ran[i]] -= 1
