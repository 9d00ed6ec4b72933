"""HypervisorService: a thin adapter between the pkvm.v1 protocol and the simulation core.

The servicer runs on the asyncio event loop of a `grpc.aio` server (docs/service.md says
why). The core is not thread-safe, so every call into it happens under one `threading.Lock`
(docs/service.md, Server), which the loop takes for one unary call or one chunk of a batch, and the
other threads (the lease reaper, the metrics scrape's snapshot) take briefly. No request can
see a half-done operation because every core method either completes or raises before its
first write, and both happen inside the lock.

Every unary handler is made by `unary_handler` from the operation's record
(service/operations.py, which holds the core call, its bounds, quota ledger and reply), as
one coroutine: the handler counts itself in the grpc_server_* metrics, refuses an
undecodable request, waits for its tenant's turn at the gate, refuses calls while the
server stops or is over its call limit, checks the credentials the method needs (`Auth`),
runs the operation under the lock, counts the operation and the call, and turns refusals
into rich statuses. An Execute stream is
authenticated when it starts, counted against the stream limits, closed when idle, and runs
each batch in chunks of `chunk_seconds` (service/batch.py, whose table of operations is made
from the same records).

VMs are leased (service/leases.py): each authenticated call renews the VM's lease, and
`reap_expired` (run by the server's reaper thread) destroys the VMs whose lease ran out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from google.protobuf.message import Message
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import HypervisorStatistics
from pkvm_sim.core.reservation import compute_reservation, partition_carveout
from pkvm_sim.metrics.rpc import RpcStats, counts_itself

from .auth import ClientToken, TokenRegistry, bearer_token, client_of
from .batch import BatchRun, batch_functions, validate_batch
from .coalesce import Coalesced
from .counters import ServiceCounters
from .decoding import REASON as UNDECODABLE_REASON
from .decoding import Undecodable
from .errors import ServiceError, describe, to_status
from .fairness import SHORT_SWITCH_INTERVAL, FairLock, Queue, TenantGate, Turn
from .leases import LeaseTable
from .limits import Admission, ClientLedger, HypPageLedger, Limits, exhausted
from .operations import OPERATIONS, Auth, Machine, Operation, stats_response

if TYPE_CHECKING:
    from .persist import SaveResult, StateKeeper

__all__ = ["Auth", "HypervisorServicer", "reserve_message"]

log = logging.getLogger(__name__)
INSTANCE_ID_METADATA_KEY = "pkvm-instance-id"

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["HypervisorService"].full_name
REFUSALS = (PkvmError, ServiceError)

Context = grpc.aio.ServicerContext[Any, Any]
UnaryHandler = Callable[[Any, Context], Coroutine[Any, Any, Any]]


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
        # The grpc_server_* series: the unary handlers count themselves in it, the server
        # wraps the other handlers it serves to count in it too (server.py).
        self.rpc_stats = RpcStats()
        self.reservation = reserve_message(config)
        self.chunk_seconds = chunk_seconds
        # Every unary operation and batch chunk takes the lock through this: tenants get
        # fair turns, and the loop stays free to take in calls (fairness.py).
        self.fair = FairLock(self.lock)
        # At most GATE_PER_TENANT calls or batches of one tenant on the loop at a time: a
        # flood of one tenant's calls cannot fill the loop's queue ahead of another's.
        self.gate = TenantGate(GATE_PER_TENANT)
        self.stopping = False  # set by begin_shutdown: new calls are refused
        self._stop_deadline = float("inf")  # batches end by then (time.monotonic)
        self._idle_streams: set[asyncio.Task[Any]] = set()  # streams waiting for a batch
        # New at every start: GetStats and every response's trailing metadata carry it, so
        # clients can tell a restart (docs/state-file.md).
        self.instance_id = uuid.uuid4().hex
        self.instance_metadata = ((INSTANCE_ID_METADATA_KEY, self.instance_id),)
        self.state: StateKeeper | None = None  # the --state-file keeper (service/persist.py)
        self._saves: Coalesced[SaveResult] | None = None  # SaveState calls share saves
        # GetStats calls share snapshots: O(pools + VMs) each, under the lock.
        self._stats = Coalesced(self._stats_response, spacing=STATS_SPACING)
        self.machine = Machine(
            hypervisor, config, self.limits, self.ledger, self.counters, self.leases,
            self.tokens, self.reservation, self.instance_id, ClientLedger(self.limits),
            self._save_state, self._shared_stats,
        )
        self._batch_fns = batch_functions(self.machine,
                                          host_wide_allowed=not self.client_token.required)
        for operation in OPERATIONS:  # what add_HypervisorServiceServicer_to_server reads
            setattr(self, operation.rpc, self.unary_handler(operation))

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
                self.machine.forget_vm(handle)
                self.counters.vms_expired += 1
            reaped.append(handle)
            log.info("VM %#x reaped: its lease expired", handle)
        return reaped

    async def _adopt(self, handle: int, peer: str) -> str | None:
        """A VM restored without a client is adopted by the connection that first calls it
        with its token (no client token file: a client is its connection); under the lock,
        in the caller's fair turn, as the ledger's other writes are."""
        clients = self.machine.clients
        if handle not in clients.adoptable:
            return clients.owner_of(handle)
        adopted: str | None = await self.fair.run(
            peer, functools.partial(clients.adopt, handle, client_of(None, peer)))
        return adopted

    def unary_handler(self, operation: Operation) -> UnaryHandler:
        """The whole of one unary RPC, as one coroutine built once. Each step used to be a
        coroutine wrapping the next (metrics, undecodable requests, the tenant gate, the
        call), and those layers cost more than the call's own work (docs/service.md, "Where
        a unary call spends its time"). In order: the call is counted as started in the
        grpc_server_* metrics (metrics/rpc.py: this handler `counts_itself`); an undecodable
        request is refused (decoding.py); the call waits for its tenant's turn at the gate
        (fairness.TenantGate; not SaveState, whose callers share saves and wait at no cost);
        then admission, credentials, the operation under the simulator lock in the tenant's
        fair turn (fairness.FairLock), the operation count, the call count by status code,
        and refusals turned into rich statuses. The tenant is the call's connection (its
        peer, read once). The reply is built after the lock is released (results are
        immutable snapshots). A coroutine `run` (SaveState) is awaited instead, and takes
        the lock itself for as long as it needs it."""
        method, auth, counted = operation.rpc, operation.auth, operation.counted
        run, read_args, reply = operation.run, operation.read_args, operation.replier
        awaited, admitted, machine = operation.awaited, operation.admitted, self.machine
        with_client = operation.with_client
        operations, count_request = self.counters.operations, self.counters.count_request
        tokens, admission, clients = self.tokens, self.admission, machine.clients
        instance_metadata, fair, gate = self.instance_metadata, self.fair, self.gate
        stats = self.rpc_stats
        record = stats.record_for(f"/{SERVICE_NAME}/{method}", "unary")
        gated = not awaited

        def locked(*args: Any) -> Any:
            result = run(machine, *args)
            if counted is not None:
                operations[counted] += 1
            return result

        async def handler(request: Any, context: Context) -> Any:
            # Only this handler, on the event loop, writes `record`: no lock needed.
            start = stats.started_unlocked(record)
            refused: tuple[str, str] | None = None  # (code, reason) of the status sent
            try:
                context.set_trailing_metadata(instance_metadata)  # sent with the status
                if type(request) is Undecodable:  # changes nothing, waits for nothing
                    refused = ("INVALID_ARGUMENT", UNDECODABLE_REASON)
                    count_request(method, "INVALID_ARGUMENT")
                    await self._abort(context, request.refusal())
                tenant = context.peer()
                if gated and not gate.try_enter(tenant):
                    await gate.enter(tenant)
                try:
                    if self.stopping:
                        raise shutting_down()
                    if admitted:  # SaveState's callers share saves and hold no slot
                        admission.enter_rpc()
                    try:
                        named = None
                        if auth is Auth.VM:
                            tokens.check(request.handle,
                                         bearer_token(context.invocation_metadata()))
                            if clients.adoptable:  # a restored VM's first caller adopts it
                                await self._adopt(request.handle, tenant)
                        elif auth is Auth.CLIENT:
                            named = self.client_token.check(
                                bearer_token(context.invocation_metadata()), method)
                        args = read_args(request)
                        if with_client:  # the per-client caps (limits.ClientLedger)
                            args = (*args, client_of(named, tenant))
                        if awaited:
                            result = await run(machine, *args)
                        else:  # under the lock, in this client's fair turn (fairness.py)
                            result = fair.run_now(tenant, locked, *args)
                            if result is Queue.JOB:
                                result = await fair.submit(tenant, locked, *args)
                        response = reply(machine, request, result)
                    finally:
                        if admitted:
                            admission.leave_rpc()
                except REFUSALS as error:
                    code, reason = describe(error)[:2]
                    refused = (code.name, reason)
                    count_request(method, code.name)
                    await self._abort(context, error)
                except Exception as error:
                    log.exception("%s failed", method)
                    refused = ("INTERNAL", "INTERNAL")
                    count_request(method, "INTERNAL")
                    await self._abort(context, ServiceError(grpc.StatusCode.INTERNAL,
                                                            "INTERNAL", repr(error)))
                finally:
                    if gated:
                        gate.leave(tenant)
            except BaseException as error:  # the abort that sent a refusal, or cancellation
                if refused is not None:
                    stats.ended_unlocked(record, refused[0], start, refused[1] or None)
                else:
                    stats.finish(record, context, start, error)
                raise
            count_request(method, "OK")
            stats.ended_unlocked(record, "OK", start)
            return response

        handler.__name__ = handler.__qualname__ = method
        return counts_itself(handler)

    async def _save_state(self) -> SaveResult:
        """SaveState: the copy is taken under the lock; compressing and writing run on a
        worker thread, so the event loop keeps serving meanwhile. Concurrent calls share
        saves (persist.CoalescedSaves)."""
        if self.state is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "NO_STATE_FILE",
                               "the server was started without --state-file")
        if self._saves is None:
            self._saves = Coalesced(functools.partial(self.state.save, self),
                                    spacing=SAVE_SPACING)
        try:
            return await self._saves()
        except OSError as error:
            raise ServiceError(grpc.StatusCode.INTERNAL, "SAVE_FAILED",
                               f"cannot write the state file: {error}") from None

    async def _shared_stats(self) -> Message:
        return await self._stats()

    def _stats_response(self) -> Message:
        """GetStats' answer: the snapshot under the lock, the message built outside it
        (on a worker thread; the callers that shared the snapshot share the message). With
        1000 VMs that is about 10 ms of Python: meanwhile the switch interval is short, so
        the loop thread gets the GIL back within it (fairness.SwitchInterval)."""
        with SHORT_SWITCH_INTERVAL.held():
            return stats_response(self.machine, self.statistics())

    def statistics(self) -> HypervisorStatistics:
        """A consistent snapshot, O(pools + VMs) under the lock: what the metrics collector
        reads at scrape time (thread-safe; callable from any thread)."""
        with self.lock:
            return self.hypervisor.statistics()

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
                client = self.machine.clients.owner_of(handle)
                if client is None and handle in self.machine.clients.adoptable:
                    client = await self._adopt(handle, context.peer())
                self.admission.open_stream(handle, client)
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
            self.admission.close_stream(handle, client)
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
            async with asyncio.timeout(idle):  # no task per read, unlike asyncio.wait_for
                return await context.read()
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
            # In the tenant's turn (fairness.TenantGate): its streams' next batches stay
            # unread until this one's first chunk has run.
            tenant = context.peer()
            turn = await self.gate.turn(tenant)
            try:
                validate_batch(request)
                # The stream's token is its VM's, so this also refuses another VM's handle;
                # NOT_FOUND once the VM is destroyed. Renews the lease.
                self.tokens.check(request.handle, token)
                run = BatchRun(self.machine, self._batch_fns, request)
                await self._run_chunks(run, token, tenant, turn)  # each chunk counts its ops
            finally:
                turn.end()
            await context.write(run.response())
            if run.abort_reason == "SHUTTING_DOWN":
                raise shutting_down("; the batch was cut short")

    async def _run_chunks(self, run: BatchRun, token: str | None, tenant: str,
                          turn: Turn) -> None:
        """Run the batch chunk by chunk, each in the tenant's fair turn for the lock
        (fairness.py), so other calls are served between two chunks. A cancelled call
        (client gone, deadline passed) stops at the next boundary: the await raises
        CancelledError."""
        chunk_fn = functools.partial(self._chunk, run, token)
        if await self.fair.run(tenant, chunk_fn):
            return
        turn.end()  # a long batch's later chunks leave its tenant's other calls their turns
        while True:
            if self.stopping and time.monotonic() >= self._stop_deadline:
                run.abort_rest("SHUTTING_DOWN", "the server is shutting down")
                return
            chunk = self.fair.submit(tenant, chunk_fn)
            try:
                if await asyncio.shield(chunk):
                    return
            except asyncio.CancelledError:
                # The worker cannot be interrupted: the handler ends after its chunk (which
                # counts its own operations), not while the run is still being stepped.
                await asyncio.wait({chunk})
                raise

    def _chunk(self, run: BatchRun, token: str | None) -> bool:
        """One chunk (the caller holds the lock); True once the batch is done. Between two
        chunks the VM may have been destroyed and its handle given to a new VM: the rest of
        the batch is then not run (ABORTED, VM_NOT_FOUND) rather than run on another VM."""
        if not self.tokens.holds(run.request.handle, token):
            run.abort_rest("VM_NOT_FOUND", "the VM was destroyed during the batch")
            return True
        # Contended, a chunk is shorter: another tenant's job waits for at most the one
        # that is running (fairness.py).
        budget = min(self.chunk_seconds, CONTENDED_CHUNK_SECONDS) if self.fair.contended \
            else self.chunk_seconds
        start = run.next
        done = run.step(budget)
        run.count_into(self.counters.operations, start)  # under the lock, as unary ops are
        return done


# Calls or batches of one tenant (connection) on the loop at a time (fairness.TenantGate).
GATE_PER_TENANT = 1

# A batch's chunk while two tenants or more use the lock (chunk_seconds otherwise): about
# half a 256-page share, the heaviest single operation, so chunks end at each operation.
CONTENDED_CHUNK_SECONDS = 0.0005

# Saves are spaced by their duration (busy at most half of the time), GetStats snapshots by
# ten times theirs (a tenth): see coalesce.py.
SAVE_SPACING = 1.0
STATS_SPACING = 10.0

# Open streams may finish their work for this share of the grace period (the rest is margin
# for the last chunk and the answers).
STOP_MARGIN = 0.8


def shutting_down(detail: str = "") -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN",
                        f"the server is shutting down{detail}")
