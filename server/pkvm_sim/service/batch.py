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

from collections.abc import Callable

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

BatchFn = Callable[[int, int, int], int]


def _nr(value: int) -> int:
    return value or 1


def batch_functions(
    hv: Hypervisor, count_fault: Callable[[FaultResult], None] = lambda result: None
) -> tuple[BatchFn | None, ...]:
    """One function per BatchOp value: (handle, arg0, arg1) -> result value."""

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

    def put_page(handle: int, pfn: int, _: int) -> int:
        return hv.put_page(handle, pfn)

    def get_page(handle: int, pfn: int, _: int) -> int:
        return hv.get_page(handle, pfn)

    def host_share(handle: int, pfn: int, nr: int) -> int:
        return hv.host_share(handle, pfn, _nr(nr)).pfn

    def host_unshare(handle: int, pfn: int, nr: int) -> int:
        return hv.host_unshare(handle, pfn, _nr(nr)).pfn

    def map_mmio(handle: int, addr: int, _: int) -> int:
        return _fault_value(hv.map_mmio(addr))

    def host_fault(handle: int, addr: int, _: int) -> int:
        return _fault_value(hv.host_fault(addr))

    def topup_memcache(handle: int, nr_pages: int, _: int) -> int:
        return hv.topup_memcache(handle, nr_pages)

    def guest_map(handle: int, ipa: int, pfn: int) -> int:
        return hv.guest_map(handle, ipa, pfn).level

    return (
        None, alloc_pages, put_page, get_page, host_share, host_unshare, map_mmio,
        host_fault, topup_memcache, guest_map,
    )


def run_batch(
    fns: tuple[BatchFn | None, ...],
    operation_counts: list[int],
    request: pb2.ExecuteRequest,
) -> pb2.ExecuteResponse:
    """Run one validated batch; the caller holds the simulator lock."""
    ops = list(request.ops)
    n = len(ops)
    arg0 = list(request.arg0)
    arg1 = list(request.arg1)
    if len(arg0) < n:
        arg0 += [0] * (n - len(arg0))
    if len(arg1) < n:
        arg1 += [0] * (n - len(arg1))
    handle = request.handle
    codes = [0] * n
    values = [0] * n
    errors: list[pb2.BatchError] = []
    nr_fns = len(fns)
    completed = 0
    for i in range(n):
        op = ops[i]
        fn = fns[op] if 0 <= op < nr_fns else None
        if fn is None:
            codes[i] = _INVALID_ARGUMENT
            errors.append(pb2.BatchError(index=i, reason="INVALID_OP", message=f"op {op}"))
        else:
            try:
                values[i] = fn(handle, arg0[i], arg1[i])
                operation_counts[op] += 1
                completed += 1
                continue
            except PkvmError as error:
                codes[i] = status_code_of(error).value[0]
                errors.append(
                    pb2.BatchError(
                        index=i, reason=error.reason, message=error.message,
                        would_panic=error.would_panic,
                    )
                )
            except Exception as error:  # a simulator bug: report it, keep serving
                codes[i] = _INTERNAL
                errors.append(pb2.BatchError(index=i, reason="INTERNAL", message=repr(error)))
        if request.stop_on_error:
            for j in range(i + 1, n):
                codes[j] = _ABORTED
            break
    return pb2.ExecuteResponse(
        batch_id=request.batch_id, codes=codes, values=values, errors=errors,
        completed=completed,
    )
