"""HypervisorService: a thin adapter between the pkvm.v1 protocol and the simulation core.

The core is not thread-safe, so every call into it happens under one `threading.Lock`
(SEMANTICS A.7): one acquisition per unary call and one per Execute batch. No request can
see a half-done operation because every core method either completes or raises before its
first write, and both happen inside the lock. Conversions to protobuf run outside it.

VMs are leased (service/leases.py): each authenticated call renews the VM's lease, and
`reap_expired` (run by the server's reaper thread) destroys the VMs whose lease ran out.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import (
    FaultResult,
    HypervisorStatistics,
    PageState,
    PoolKind,
    ShareResult,
    VmInfo,
)
from pkvm_sim.core.reservation import compute_reservation, partition_carveout

from .auth import TokenRegistry, bearer_token
from .batch import MAX_BATCH_OPS, batch_functions, run_batch
from .counters import OP_INDEX, ServiceCounters
from .errors import ServiceError, abort, describe
from .leases import LeaseTable

log = logging.getLogger(__name__)

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["HypervisorService"].full_name

_POOL_KIND = {
    pb2.POOL_KIND_UNSPECIFIED: PoolKind.HYP,
    pb2.POOL_KIND_HYP: PoolKind.HYP,
    pb2.POOL_KIND_VM: PoolKind.VM,
}
_PAGE_STATE = {
    PageState.OWNED: pb2.PAGE_STATE_OWNED,
    PageState.SHARED_OWNED: pb2.PAGE_STATE_SHARED_OWNED,
    PageState.SHARED_BORROWED: pb2.PAGE_STATE_SHARED_BORROWED,
    PageState.NOPAGE: pb2.PAGE_STATE_NOPAGE,
}
_OUTCOME = {
    "mapped": pb2.FAULT_OUTCOME_MAPPED,
    "spurious": pb2.FAULT_OUTCOME_SPURIOUS,
    "fatal": pb2.FAULT_OUTCOME_FATAL,
}
REFUSALS = (PkvmError, ServiceError)

F = TypeVar("F", bound=Callable[..., Any])


def _unary(method: str) -> Callable[[F], F]:
    """Count the call by status code and turn refusals into rich statuses."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def handler(self: HypervisorServicer, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = fn(self, request, context)
            except REFUSALS as error:
                self.counters.count_request(method, describe(error)[0].name)
                abort(context, error)
            except Exception as error:
                log.exception("%s failed", method)
                self.counters.count_request(method, "INTERNAL")
                abort(context, ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", repr(error)))
            self.counters.count_request(method, "OK")
            return response

        return handler  # type: ignore[return-value]

    return wrap


def vm_message(info: VmInfo) -> pb2.VM:
    return pb2.VM(
        handle=info.handle, vmid=info.vmid, name=info.name, nr_vcpus=info.nr_vcpus,
        slice_base_pfn=info.slice_base_pfn, slice_nr_pages=info.slice_nr_pages,
        donated_pages=info.donated_pages,
    )


def fault_message(result: FaultResult) -> pb2.Fault:
    return pb2.Fault(
        addr=result.addr, is_memory=result.is_memory, outcome=_OUTCOME[result.outcome.value],
        range_start=result.range_start, range_end=result.range_end, level=result.level,
        recycled=result.recycled, recycled_pages=result.recycled_pages,
        tables_allocated=result.tables_allocated, errno_name=result.errno_name or "",
        reason=result.reason or "",
    )


def stats_message(stats: HypervisorStatistics) -> pb2.GetStatsResponse:
    v = stats.vmemmap
    h = stats.host_stage2
    return pb2.GetStatsResponse(
        pools=[
            pb2.PoolStats(
                name=p.name, base_pfn=p.base_pfn, nr_pages=p.nr_pages,
                admitted_pages=p.admitted_pages, reserved_pages=p.reserved_pages,
                free_pages=p.free_pages, allocated_pages=p.allocated_pages,
                max_order=p.max_order, free_blocks_per_order=list(p.free_blocks_per_order),
                alloc_failures=p.alloc_failures, total_pages=p.total_pages,
            )
            for p in stats.pools
        ],
        vmemmap=pb2.VmemmapStats(
            layout=v.layout, entry_bytes=v.entry_bytes, coverage=v.coverage,
            covered_pages=v.covered_pages, modelled_bytes=v.modelled_bytes,
            stored_bytes=v.stored_bytes, bytes_per_gib=v.bytes_per_gib,
        ),
        host_stage2=pb2.HostStage2Stats(
            faults_memory=h.faults_memory, faults_mmio=h.faults_mmio,
            spurious_faults=h.spurious_faults, fatal_faults=h.fatal_faults,
            mmio_recycles=h.mmio_recycles, mmio_recycled_pages=h.mmio_recycled_pages,
            map_failures=h.map_failures, table_pages=h.table_pages,
            refcount_limit_hits=h.refcount_limit_hits,
        ),
        nr_vms=stats.nr_vms, shared_pages=stats.shared_pages,
        hyp_mem_pages=stats.hyp_mem_pages, carveout_base=stats.carveout_base,
        carveout_bytes=stats.carveout_bytes,
    )


def reserve_message(config: SimConfig) -> pb2.ReserveResponse:
    reservation = compute_reservation(config)
    layout = partition_carveout(reservation, config)
    return pb2.ReserveResponse(
        **reservation.to_json_dict(),
        profile=reservation.profile.value, page_size=reservation.page_size,
        hyp_page_layout=reservation.layout_name, carveout_base=reservation.carveout_base,
        regions=[
            pb2.CarveoutRegion(name=r.name, base_pfn=r.base_pfn, nr_pages=r.nr_pages)
            for r in layout.regions
        ],
    )


class HypervisorServicer(pb2_grpc.HypervisorServiceServicer):
    """Serves one booted Hypervisor to any number of concurrent clients."""

    def __init__(
        self, hypervisor: Hypervisor, config: SimConfig, leases: LeaseTable | None = None
    ) -> None:
        self.hypervisor = hypervisor
        self.config = config
        self.lock = threading.Lock()
        self.leases = leases if leases is not None else LeaseTable()
        self.tokens = TokenRegistry(self.leases)
        self.counters = ServiceCounters()
        self.reservation = reserve_message(config)
        self._batch_fns = batch_functions(hypervisor, self.counters.count_fault)
        self._ops = self.counters.operations

    # -- helpers -----------------------------------------------------------------------------

    def _authorize(self, handle: int, context: grpc.ServicerContext) -> None:
        self.tokens.check(handle, bearer_token(context.invocation_metadata()))

    def reap_expired(self) -> list[int]:
        """Destroy every VM whose lease has run out (reclaiming everything it held) and drop
        its token; returns their handles. Runs under the simulator lock."""
        leases = self.leases
        if not len(leases):
            return []
        reaped: list[int] = []
        with self.lock:
            now = leases.clock()
            for handle in leases.expired(now):
                if handle not in self.tokens:  # a renewal raced the VM's destruction
                    leases.drop(handle)
                    continue
                if not leases.is_expired(handle, now):  # renewed meanwhile
                    continue
                try:
                    self.hypervisor.destroy_vm(handle)
                except PkvmError:  # cannot happen for a live VM; do not retry it forever
                    log.exception("reaping VM %#x failed", handle)
                    leases.drop(handle)
                    continue
                self.tokens.revoke(handle)
                self.counters.vms_expired += 1
                reaped.append(handle)
        for handle in reaped:
            log.info("VM %#x destroyed: its lease expired", handle)
        return reaped

    def statistics(self) -> HypervisorStatistics:
        """A consistent snapshot (also what the metrics collector reads at scrape time)."""
        with self.lock:
            return self.hypervisor.statistics()

    # -- VMs ---------------------------------------------------------------------------------

    @_unary("CreateVM")
    def CreateVM(self, request: pb2.CreateVMRequest, context: grpc.ServicerContext) -> Any:
        lease = self.leases.validate(request.lease_seconds)
        with self.lock:
            info = self.hypervisor.create_vm(
                nr_vcpus=request.nr_vcpus, slice_pages=request.slice_pages,
                name=request.name or None,
            )
            token = self.tokens.issue(info.handle, lease)
            self._ops[OP_INDEX["create_vm"]] += 1
        return pb2.CreateVMResponse(vm=vm_message(info), token=token, lease_seconds=lease)

    @_unary("DestroyVM")
    def DestroyVM(self, request: pb2.DestroyVMRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            pages = self.hypervisor.destroy_vm(request.handle)
            self.tokens.revoke(request.handle)
            self._ops[OP_INDEX["destroy_vm"]] += 1
        return pb2.DestroyVMResponse(pages_returned=pages)

    @_unary("RenewVM")
    def RenewVM(self, request: pb2.RenewVMRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)  # renews the lease
        return pb2.RenewVMResponse(
            expires_in_ms=round(self.leases.expires_in(request.handle) * 1000),
            lease_seconds=self.leases.lease_seconds(request.handle),
        )

    # -- pool pages ----------------------------------------------------------------------------

    @_unary("AllocPages")
    def AllocPages(self, request: pb2.AllocPagesRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        kind = _POOL_KIND.get(request.pool)
        if kind is None:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL", f"unknown pool {request.pool}"
            )
        with self.lock:
            pfn = self.hypervisor.alloc_pages(request.handle, request.order, kind)
            self._ops[OP_INDEX["alloc_pages"]] += 1
        return pb2.AllocPagesResponse(pfn=pfn, order=request.order)

    @_unary("PutPage")
    def PutPage(self, request: pb2.PutPageRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            refcount = self.hypervisor.put_page(request.handle, request.pfn)
            self._ops[OP_INDEX["put_page"]] += 1
        return pb2.PutPageResponse(refcount=refcount)

    @_unary("GetPage")
    def GetPage(self, request: pb2.GetPageRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            refcount = self.hypervisor.get_page(request.handle, request.pfn)
            self._ops[OP_INDEX["get_page"]] += 1
        return pb2.GetPageResponse(refcount=refcount)

    # -- sharing -------------------------------------------------------------------------------

    @staticmethod
    def _share_fields(result: ShareResult) -> dict[str, Any]:
        return {
            "pfn": result.pfn, "nr_pages": result.nr_pages,
            "host_state": _PAGE_STATE[result.host_state],
            "hyp_state": _PAGE_STATE[result.hyp_state],
        }

    @_unary("HostShare")
    def HostShare(self, request: pb2.HostShareRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            result = self.hypervisor.host_share(request.handle, request.pfn, request.nr_pages or 1,
                                                page_by_page=request.page_by_page)
            self._ops[OP_INDEX["host_share"]] += 1
        return pb2.HostShareResponse(
            **self._share_fields(result), pages_done=result.pages_done,
            failed_pfn=result.failed_pfn, failed_reason=result.failed_reason or "",
            failed_errno=result.failed_errno or "",
        )

    @_unary("HostUnshare")
    def HostUnshare(self, request: pb2.HostUnshareRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            result = self.hypervisor.host_unshare(
                request.handle, request.pfn, request.nr_pages or 1
            )
            self._ops[OP_INDEX["host_unshare"]] += 1
        return pb2.HostUnshareResponse(**self._share_fields(result))

    @_unary("PinShared")
    def PinShared(self, request: pb2.PinSharedRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            self.hypervisor.pin_shared(request.handle, request.pfn, request.nr_pages or 1)
            self._ops[OP_INDEX["pin_shared"]] += 1
        return pb2.PinSharedResponse()

    @_unary("UnpinShared")
    def UnpinShared(self, request: pb2.UnpinSharedRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            self.hypervisor.unpin_shared(request.handle, request.pfn, request.nr_pages or 1)
            self._ops[OP_INDEX["unpin_shared"]] += 1
        return pb2.UnpinSharedResponse()

    # -- host stage-2 faults -------------------------------------------------------------------

    @_unary("MapMMIO")
    def MapMMIO(self, request: pb2.MapMMIORequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            result = self.hypervisor.map_mmio(request.addr)
            self._ops[OP_INDEX["map_mmio"]] += 1
            self.counters.count_fault(result)
        return pb2.MapMMIOResponse(fault=fault_message(result))

    @_unary("HostFault")
    def HostFault(self, request: pb2.HostFaultRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            result = self.hypervisor.host_fault(request.addr)
            self._ops[OP_INDEX["host_fault"]] += 1
            self.counters.count_fault(result)
        return pb2.HostFaultResponse(fault=fault_message(result))

    # -- guest stage-2 -------------------------------------------------------------------------

    @_unary("TopupMemcache")
    def TopupMemcache(
        self, request: pb2.TopupMemcacheRequest, context: grpc.ServicerContext
    ) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            size = self.hypervisor.topup_memcache(request.handle, request.nr_pages)
            self._ops[OP_INDEX["topup_memcache"]] += 1
        return pb2.TopupMemcacheResponse(memcache_pages=size)

    @_unary("GuestMap")
    def GuestMap(self, request: pb2.GuestMapRequest, context: grpc.ServicerContext) -> Any:
        self._authorize(request.handle, context)
        with self.lock:
            result = self.hypervisor.guest_map(request.handle, request.ipa, request.pfn)
            self._ops[OP_INDEX["guest_map"]] += 1
        return pb2.GuestMapResponse(
            ipa=result.ipa, pfn=result.pfn, level=result.level,
            tables_allocated=result.tables_allocated, refilled_pages=result.refilled_pages,
        )

    # -- read-only views -------------------------------------------------------------------------

    @_unary("GetStats")
    def GetStats(self, request: pb2.GetStatsRequest, context: grpc.ServicerContext) -> Any:
        return stats_message(self.statistics())

    @_unary("GetPageInfo")
    def GetPageInfo(self, request: pb2.GetPageInfoRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            info = self.hypervisor.page_info(request.pfn)
        response = pb2.GetPageInfoResponse(
            pfn=info.pfn, covered=info.covered, owner=info.owner, pool=info.pool or "",
            host_state=_PAGE_STATE[info.host_state], hyp_state=_PAGE_STATE[info.hyp_state],
        )
        if info.refcount is not None:
            response.refcount = info.refcount
        if info.order is not None:
            response.order = info.order
        return response

    @_unary("Reserve")
    def Reserve(self, request: pb2.ReserveRequest, context: grpc.ServicerContext) -> Any:
        return self.reservation

    # -- batches ---------------------------------------------------------------------------------

    def Execute(
        self, request_iterator: Iterator[pb2.ExecuteRequest], context: grpc.ServicerContext
    ) -> Iterator[pb2.ExecuteResponse]:
        """Each request is one batch, answered before the next is read. A malformed batch
        (empty, oversize, wrong token) ends the stream with its status; batches answered
        before it stay done."""
        token = bearer_token(context.invocation_metadata())
        fns = self._batch_fns
        ops = self._ops
        try:
            for request in request_iterator:
                n = len(request.ops)
                if not 0 < n <= MAX_BATCH_OPS:
                    raise ServiceError(
                        grpc.StatusCode.INVALID_ARGUMENT, "BAD_BATCH_SIZE",
                        f"a batch holds 1 to {MAX_BATCH_OPS} operations, not {n}",
                    )
                self.tokens.check(request.handle, token)
                with self.lock:
                    response = run_batch(self.hypervisor, fns, ops, request)
                yield response
        except REFUSALS as error:
            self.counters.count_request("Execute", describe(error)[0].name)
            abort(context, error)
        except BaseException:  # the client went away (cancelled) or the server is stopping
            self.counters.count_request("Execute", "CANCELLED")
            raise
        self.counters.count_request("Execute", "OK")
