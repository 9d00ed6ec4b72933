"""HypervisorService: a thin adapter between the pkvm.v1 protocol and the simulation core.

The servicer runs on the asyncio event loop of a `grpc.aio` server (docs/service.md says
why). The core is not thread-safe, so every call into it happens under one `threading.Lock`
(SEMANTICS A.7), which the loop takes for one unary call or one chunk of a batch, and the
other threads (the lease reaper, the metrics scrape's snapshot) take briefly. No request can
see a half-done operation because every core method either completes or raises before its
first write, and both happen inside the lock.

Every unary handler is one small function under `@rpc(...)`: the decorator refuses calls
while the server stops or is over its call limit, checks the credentials the method needs
(`Auth`), takes the lock, counts the operation and the call, and turns refusals into rich
statuses. An Execute stream is authenticated when it starts, counted against the stream
limits, closed when idle, and runs each batch in chunks of `chunk_seconds` (service/batch.py).

VMs are leased (service/leases.py): each authenticated call renews the VM's lease, and
`reap_expired` (run by the server's reaper thread) destroys the VMs whose lease ran out.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import inspect
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

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

from .auth import ClientToken, TokenRegistry, bearer_token
from .batch import BatchRun, batch_functions, validate_batch
from .counters import ServiceCounters
from .decoding import Undecodable
from .errors import ServiceError, describe, to_status
from .leases import LeaseTable
from .limits import (
    Admission,
    HypPageLedger,
    Limits,
    check_name,
    check_pages,
    exhausted,
    quota_exceeded,
)

if TYPE_CHECKING:
    from .persist import StateKeeper

log = logging.getLogger(__name__)
INSTANCE_ID_METADATA_KEY = "pkvm-instance-id"

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

Context = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[["HypervisorServicer", Any], Any]
AsyncHandler = Callable[["HypervisorServicer", Any, Context], Coroutine[Any, Any, Any]]


class Auth(enum.Enum):
    """The credentials a method needs."""

    NONE = "none"  # read-only views
    VM = "vm"  # the token of the VM named by request.handle
    CLIENT = "client"  # the client token, when one is configured (CreateVM, host-wide calls)


def rpc(method: str, auth: Auth = Auth.VM, op: str | None = None) -> Callable[[Handler],
                                                                            AsyncHandler]:
    """A unary handler: `fn(self, request)` runs under the simulator lock and returns the
    response. Around it: admission, credentials, the operation count `op`, the call count by
    status code, and refusals turned into rich statuses.

    A coroutine `fn` (one that must not hold the loop, e.g. SaveState's file write) is
    awaited instead, and takes the simulator lock itself for as long as it needs it."""

    def wrap(fn: Handler) -> AsyncHandler:
        awaited = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def handler(self: HypervisorServicer, request: Any, context: Context) -> Any:
            context.set_trailing_metadata(self.instance_metadata)  # sent with the status
            try:
                self._admit()
                try:
                    token = bearer_token(context.invocation_metadata())
                    if auth is Auth.VM:
                        self.tokens.check(request.handle, token)
                    elif auth is Auth.CLIENT:
                        self.client_token.check(token, method)
                    if awaited:
                        response = await fn(self, request)
                    else:
                        with self.lock:
                            response = fn(self, request)
                            if op is not None:
                                self.counters.operations[op] += 1
                finally:
                    self.admission.leave_rpc()
            except REFUSALS as error:
                self.counters.count_request(method, describe(error)[0].name)
                await self._abort(context, error)
            except Exception as error:
                log.exception("%s failed", method)
                self.counters.count_request(method, "INTERNAL")
                await self._abort(context, ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL",
                                                        repr(error)))
            self.counters.count_request(method, "OK")
            return response

        return handler

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
        self,
        hypervisor: Hypervisor,
        config: SimConfig,
        leases: LeaseTable | None = None,
        *,
        limits: Limits | None = None,
        client_token: ClientToken | None = None,
        chunk_seconds: float = 0.002,
    ) -> None:
        self.hypervisor = hypervisor
        self.config = config
        self.lock = threading.Lock()
        self.leases = leases if leases is not None else LeaseTable()
        self.tokens = TokenRegistry(self.leases)
        self.limits = limits if limits is not None else Limits()
        self.client_token = client_token if client_token is not None else ClientToken(None)
        self.admission = Admission(self.limits)
        self.ledger = HypPageLedger(self.limits.quota_hyp_pages)
        self.counters = ServiceCounters()
        self.reservation = reserve_message(config)
        self.chunk_seconds = chunk_seconds
        # Chunks of long batches run here, one at a time, so the loop stays free to serve
        # every other call meanwhile (they wait at most one chunk for the lock).
        self.batch_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkvm-batch")
        self._batch_fns = batch_functions(
            hypervisor, self.ledger, max_pages_per_op=self.limits.max_pages_per_op,
            count_fault=self.counters.count_fault,
            host_wide_allowed=not self.client_token.required,
        )
        self.stopping = False  # set by begin_shutdown: new calls are refused
        self._stop_deadline = float("inf")  # batches end by then (time.monotonic)
        self._idle_streams: set[asyncio.Task[Any]] = set()  # streams waiting for a batch
        # New at every start: GetStats and every response's trailing metadata carry it, so
        # clients can tell a restart (docs/state-file.md).
        self.instance_id = uuid.uuid4().hex
        self.instance_metadata = ((INSTANCE_ID_METADATA_KEY, self.instance_id),)
        self.state: StateKeeper | None = None  # the --state-file keeper (service/persist.py)

    # -- helpers -----------------------------------------------------------------------------

    async def _abort(self, context: Context, error: BaseException) -> NoReturn:
        """errors.abort, with the instance id kept in the trailing metadata."""
        status = to_status(error)
        await context.abort(status.code, status.details,
                            (*status.trailing_metadata, *self.instance_metadata))
        raise AssertionError("abort returned")  # pragma: no cover

    def _admit(self) -> None:
        """Refuse a new call while stopping; count it against max_concurrent_rpcs."""
        if self.stopping:
            raise shutting_down()
        self.admission.enter_rpc()

    def begin_shutdown(self, grace: float) -> None:
        """New calls and streams are refused (UNAVAILABLE). Open streams keep working until
        shortly before `grace` runs out; then a running batch stops at its next chunk
        boundary and idle streams end, all with UNAVAILABLE. Call on the event loop."""
        self.stopping = True
        self._stop_deadline = time.monotonic() + grace * STOP_MARGIN
        asyncio.get_running_loop().call_later(grace * STOP_MARGIN, self._end_idle_streams)

    def _end_idle_streams(self) -> None:
        for task in list(self._idle_streams):
            task.cancel()  # Execute turns this into UNAVAILABLE (SHUTTING_DOWN)

    def _forget_vm(self, handle: int) -> None:
        """Service bookkeeping of a destroyed VM (under the lock)."""
        self.tokens.revoke(handle)
        self.ledger.drop(handle)

    def reap_expired(self) -> list[int]:
        """Destroy every VM whose lease has run out (reclaiming everything it held) and drop
        its token; returns their handles. Takes the simulator lock once per VM."""
        leases = self.leases
        if not len(leases):
            return []
        reaped: list[int] = []
        for handle in leases.expired():
            with self.lock:
                if handle not in self.tokens:  # a renewal raced the VM's destruction
                    leases.drop(handle)
                    continue
                if not leases.is_expired(handle):  # renewed meanwhile
                    continue
                try:
                    self.hypervisor.destroy_vm(handle)
                except PkvmError:  # cannot happen for a live VM; do not retry it forever
                    log.exception("reaping VM %#x failed", handle)
                    leases.drop(handle)
                    continue
                self._forget_vm(handle)
                self.counters.vms_expired += 1
            reaped.append(handle)
            log.info("VM %#x reaped: its lease expired", handle)
        return reaped

    def statistics(self) -> HypervisorStatistics:
        """A consistent snapshot, O(pools + VMs) under the lock: what the metrics collector
        reads at scrape time (thread-safe; callable from any thread)."""
        with self.lock:
            return self.hypervisor.statistics()

    # -- VMs ---------------------------------------------------------------------------------

    @rpc("CreateVM", Auth.CLIENT, "create_vm")
    def CreateVM(self, request: pb2.CreateVMRequest) -> Any:
        lease = self.leases.validate(request.lease_seconds)
        check_name(request.name)
        limits = self.limits
        if limits.quota_slice_pages and request.slice_pages > limits.quota_slice_pages:
            raise quota_exceeded(f"slice_pages {request.slice_pages} exceeds the quota of "
                                 f"{limits.quota_slice_pages} pages per VM")
        if limits.max_vms and len(self.tokens) >= limits.max_vms:
            raise quota_exceeded(f"the server holds its maximum of {limits.max_vms} VMs")
        info = self.hypervisor.create_vm(
            nr_vcpus=request.nr_vcpus, slice_pages=request.slice_pages,
            name=request.name or None,
        )
        token = self.tokens.issue(info.handle, lease)
        log.info("VM %#x created: %d vCPUs, %d slice pages, lease %g s", info.handle,
                 info.nr_vcpus, info.slice_nr_pages, lease)
        return pb2.CreateVMResponse(vm=vm_message(info), token=token, lease_seconds=lease)

    @rpc("DestroyVM", Auth.VM, "destroy_vm")
    def DestroyVM(self, request: pb2.DestroyVMRequest) -> Any:
        pages = self.hypervisor.destroy_vm(request.handle)
        self._forget_vm(request.handle)
        log.info("VM %#x destroyed: %d pages returned", request.handle, pages)
        return pb2.DestroyVMResponse(pages_returned=pages)

    @rpc("RenewVM", Auth.VM)
    def RenewVM(self, request: pb2.RenewVMRequest) -> Any:
        return pb2.RenewVMResponse(  # the token check renewed the lease
            expires_in_ms=round(self.leases.expires_in(request.handle) * 1000),
            lease_seconds=self.leases.lease_seconds(request.handle),
        )

    # -- pool pages ----------------------------------------------------------------------------

    @rpc("AllocPages", Auth.VM, "alloc_pages")
    def AllocPages(self, request: pb2.AllocPagesRequest) -> Any:
        kind = _POOL_KIND.get(request.pool)
        if kind is None:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POOL", f"unknown pool {request.pool}"
            )
        if kind is PoolKind.HYP:
            self.ledger.check(request.handle, request.order)
        pfn = self.hypervisor.alloc_pages(request.handle, request.order, kind)
        if kind is PoolKind.HYP:
            self.ledger.allocated(request.handle, [pfn], request.order)
        return pb2.AllocPagesResponse(pfn=pfn, order=request.order)

    @rpc("PutPage", Auth.VM, "put_page")
    def PutPage(self, request: pb2.PutPageRequest) -> Any:
        refcount = self.hypervisor.put_page(request.handle, request.pfn)
        self.ledger.put(request.handle, [request.pfn], [refcount])
        return pb2.PutPageResponse(refcount=refcount)

    @rpc("GetPage", Auth.VM, "get_page")
    def GetPage(self, request: pb2.GetPageRequest) -> Any:
        return pb2.GetPageResponse(refcount=self.hypervisor.get_page(request.handle, request.pfn))

    # -- sharing -------------------------------------------------------------------------------

    def _pages(self, nr_pages: int) -> int:
        """A request's page count (0 = 1) within the service's per-operation bound."""
        nr = nr_pages or 1
        check_pages(nr, self.limits.max_pages_per_op)
        return nr

    @staticmethod
    def _share_fields(result: ShareResult) -> dict[str, Any]:
        return {
            "pfn": result.pfn, "nr_pages": result.nr_pages,
            "host_state": _PAGE_STATE[result.host_state],
            "hyp_state": _PAGE_STATE[result.hyp_state],
            "pages_done": result.pages_done, "failed_pfn": result.failed_pfn,
            "failed_reason": result.failed_reason or "", "failed_errno": result.failed_errno or "",
        }

    @rpc("HostShare", Auth.VM, "host_share")
    def HostShare(self, request: pb2.HostShareRequest) -> Any:
        result = self.hypervisor.host_share(request.handle, request.pfn,
                                            self._pages(request.nr_pages),
                                            page_by_page=request.page_by_page)
        return pb2.HostShareResponse(**self._share_fields(result))

    @rpc("HostUnshare", Auth.VM, "host_unshare")
    def HostUnshare(self, request: pb2.HostUnshareRequest) -> Any:
        result = self.hypervisor.host_unshare(request.handle, request.pfn,
                                              self._pages(request.nr_pages))
        return pb2.HostUnshareResponse(**self._share_fields(result))

    @rpc("PinShared", Auth.VM, "pin_shared")
    def PinShared(self, request: pb2.PinSharedRequest) -> Any:
        self.hypervisor.pin_shared(request.handle, request.pfn, self._pages(request.nr_pages))
        return pb2.PinSharedResponse()

    @rpc("UnpinShared", Auth.VM, "unpin_shared")
    def UnpinShared(self, request: pb2.UnpinSharedRequest) -> Any:
        self.hypervisor.unpin_shared(request.handle, request.pfn, self._pages(request.nr_pages))
        return pb2.UnpinSharedResponse()

    # -- host stage-2 faults (host-wide: the client token, when one is configured) -------------

    @rpc("MapMMIO", Auth.CLIENT, "map_mmio")
    def MapMMIO(self, request: pb2.MapMMIORequest) -> Any:
        result = self.hypervisor.map_mmio(request.addr)
        self.counters.count_fault(result)
        return pb2.MapMMIOResponse(fault=fault_message(result))

    @rpc("HostFault", Auth.CLIENT, "host_fault")
    def HostFault(self, request: pb2.HostFaultRequest) -> Any:
        result = self.hypervisor.host_fault(request.addr)
        self.counters.count_fault(result)
        return pb2.HostFaultResponse(fault=fault_message(result))

    # -- guest stage-2 -------------------------------------------------------------------------

    @rpc("TopupMemcache", Auth.VM, "topup_memcache")
    def TopupMemcache(self, request: pb2.TopupMemcacheRequest) -> Any:
        check_pages(request.nr_pages, self.limits.max_pages_per_op)
        size = self.hypervisor.topup_memcache(request.handle, request.nr_pages)
        return pb2.TopupMemcacheResponse(memcache_pages=size)

    @rpc("GuestMap", Auth.VM, "guest_map")
    def GuestMap(self, request: pb2.GuestMapRequest) -> Any:
        result = self.hypervisor.guest_map(request.handle, request.ipa, request.pfn)
        return pb2.GuestMapResponse(
            ipa=result.ipa, pfn=result.pfn, level=result.level,
            tables_allocated=result.tables_allocated, refilled_pages=result.refilled_pages,
        )

    # -- read-only views -------------------------------------------------------------------------

    @rpc("GetStats", Auth.NONE)
    def GetStats(self, request: pb2.GetStatsRequest) -> Any:
        response = stats_message(self.hypervisor.statistics())
        response.instance_id = self.instance_id
        return response

    @rpc("GetPageInfo", Auth.NONE)
    def GetPageInfo(self, request: pb2.GetPageInfoRequest) -> Any:
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

    @rpc("Reserve", Auth.NONE)
    def Reserve(self, request: pb2.ReserveRequest) -> Any:
        return self.reservation

    @rpc("GetMemoryMap", Auth.NONE)
    def GetMemoryMap(self, request: pb2.GetMemoryMapRequest) -> Any:
        from .memory_map import memory_map_message  # observe: read-only view for pictures

        return memory_map_message(self.hypervisor, self.config, self.reservation,
                                  list(request.pools))

    # -- batches ---------------------------------------------------------------------------------

    async def Execute(
        self, request_iterator: AsyncIterator[pb2.ExecuteRequest],
        context: Context,
    ) -> None:
        """Each request is one batch for the stream's VM, answered before the next is read.
        The stream is authenticated when it starts (its token names its VM). A malformed
        batch (empty, oversize, another VM's handle) ends the stream with its status;
        batches answered before it stay done."""
        context.set_trailing_metadata(self.instance_metadata)
        token = bearer_token(context.invocation_metadata())
        try:
            self._admit()  # a stream counts as a call for as long as it is open
            try:
                handle = self.tokens.handle_of(token)
                self.admission.open_stream(handle)
            except BaseException:
                self.admission.leave_rpc()
                raise
        except REFUSALS as error:
            self.counters.count_request("Execute", describe(error)[0].name)
            await self._abort(context, error)
        try:
            await self._serve_stream(handle, token, context)
        except REFUSALS as error:
            self.counters.count_request("Execute", describe(error)[0].name)
            await self._abort(context, error)
        except asyncio.CancelledError:
            if not self.stopping or context.cancelled():
                self.counters.count_request("Execute", "CANCELLED")
                raise
            self.counters.count_request("Execute", "UNAVAILABLE")
            await self._abort(context, shutting_down())
        finally:
            self.admission.close_stream(handle)
            self.admission.leave_rpc()
        self.counters.count_request("Execute", "OK")

    async def _next_batch(self, context: Context) -> Any:
        """The next request, or EOF; an idle stream is closed after stream_idle_seconds."""
        if self.stopping and time.monotonic() >= self._stop_deadline:
            raise shutting_down()
        idle = self.limits.stream_idle_seconds or None
        task = asyncio.current_task()
        assert task is not None
        self._idle_streams.add(task)
        try:
            return await asyncio.wait_for(context.read(), idle)
        except TimeoutError:
            raise exhausted("STREAM_IDLE", f"no batch for {idle} s: the stream is closed "
                            "(open a new one when needed)") from None
        finally:
            self._idle_streams.discard(task)

    async def _serve_stream(
        self, handle: int, token: str | None, context: Context
    ) -> None:
        while True:
            request = await self._next_batch(context)
            if request is grpc.aio.EOF:
                return
            if isinstance(request, Undecodable):
                raise request.refusal()
            validate_batch(request)
            # The stream's token is its VM's, so this also refuses another VM's handle;
            # NOT_FOUND once the VM is destroyed. Renews the lease.
            self.tokens.check(request.handle, token)
            run = BatchRun(self.hypervisor, self._batch_fns, self.ledger, request)
            try:
                await self._run_chunks(run, token)
            finally:
                run.count_into(self.counters.operations)
            await context.write(run.response())
            if run.abort_reason == "SHUTTING_DOWN":
                raise shutting_down("; the batch was cut short")

    async def _run_chunks(self, run: BatchRun, token: str | None) -> None:
        """Run the batch chunk by chunk. The first chunk runs on the loop (most batches
        need no more); later ones on the batch worker thread, so that other calls are
        served while it works. A cancelled call (client gone, deadline passed) stops at
        the next boundary: the await raises CancelledError."""
        if self._chunk(run, token):
            return
        loop = asyncio.get_running_loop()
        while True:
            if self.stopping and time.monotonic() >= self._stop_deadline:
                run.abort_rest("SHUTTING_DOWN", "the server is shutting down")
                return
            chunk = loop.run_in_executor(self.batch_worker, self._chunk, run, token)
            try:
                if await asyncio.shield(chunk):
                    return
            except asyncio.CancelledError:
                # The worker cannot be interrupted: let its chunk end before the caller
                # counts what ran (run.next), or that chunk's operations would go uncounted.
                await asyncio.wait({chunk})
                raise

    def _chunk(self, run: BatchRun, token: str | None) -> bool:
        """One chunk under the lock; True once the batch is done. Between two chunks the
        VM may have been destroyed and its handle given to a new VM: the rest of the batch
        is then not run (ABORTED, VM_NOT_FOUND) rather than run on another VM."""
        with self.lock:
            if not self.tokens.holds(run.request.handle, token):
                run.abort_rest("VM_NOT_FOUND", "the VM was destroyed during the batch")
                return True
            return run.step(self.chunk_seconds)

    # -- the state file ----------------------------------------------------------------------

    @rpc("SaveState", Auth.CLIENT)
    async def SaveState(self, request: pb2.SaveStateRequest) -> pb2.SaveStateResponse:
        """Write the machine to --state-file. A host-wide call (the client token, when one is
        configured). The copy is taken under the lock; compressing and writing run on a
        worker thread, so the event loop keeps serving meanwhile."""
        if self.state is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "NO_STATE_FILE",
                               "the server was started without --state-file")
        try:
            saved = await asyncio.get_running_loop().run_in_executor(
                None, self.state.save, self)
        except OSError as error:
            raise ServiceError(grpc.StatusCode.INTERNAL, "SAVE_FAILED",
                               f"cannot write the state file: {error}") from None
        return pb2.SaveStateResponse(
            path=saved.path, size_bytes=saved.size_bytes, seconds=saved.seconds,
            nr_vms=saved.nr_vms, format_version=saved.format_version,
            instance_id=self.instance_id,
        )


# Open streams may finish their work for this share of the grace period (the rest is margin
# for the last chunk and the answers).
STOP_MARGIN = 0.8


def shutting_down(detail: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN",
                        f"the server is shutting down{detail}")
