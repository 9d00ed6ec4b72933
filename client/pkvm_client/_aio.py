"""The asyncio twin of the SDK: `AsyncHypervisor` and `AsyncVM`, same methods, awaitable.

    async with AsyncHypervisor("localhost:50051") as hv:
        await hv.wait_ready()
        async with hv.create_vm(slice_pages=256) as vm:      # destroyed on exit
            pfn = await vm.alloc_pages(order=1)
            await vm.put_page(pfn, timeout=1.0)

`hv.create_vm(...)` returns an `AsyncVMCreation`: use it in `async with` directly, or await it
for the `AsyncVM` (`vm = await hv.create_vm(...)`; `async with await hv.create_vm(...)` works
too). Timeouts work as in the sync client (see `pkvm_client._client`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from . import _client as calls  # the call table
from ._batch import Batch, BatchResult
from ._client import (
    CHANNEL_OPTIONS,
    HEALTH_CHECK,
    Call,
    VmHandle,
    channel_credentials,
    create_vm_fields,
    is_serving,
    with_client_token,
)
from ._errors import TransportError, from_rpc_error
from ._refused import CallEnd, RefusedRetry, deadline_in, earliest, seconds_left
from ._types import (
    USE_CLIENT_DEFAULT,
    Fault,
    GuestMapping,
    MemoryMap,
    PageInfo,
    Pool,
    PoolName,
    Reservation,
    SavedState,
    ShareResult,
    Stats,
    Timeout,
    VmInfo,
    resolve_timeout,
)

T = TypeVar("T")


class ClientTokenInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """The asyncio twin of _client.ClientTokenInterceptor."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout,
            grpc.aio.Metadata(*with_client_token(details.metadata, self.token)),
            details.credentials, details.wait_for_ready,
        )
        return await continuation(details, request)


async def _invoke(stub: Any, call: Call[T], timeout: float | None,
                  metadata: Sequence[tuple[str, str]] | None, fields: dict[str, Any]) -> T:
    """Make one unary call of the call table; a failure is raised as its typed PkvmError.
    A call the server refused unprocessed (REFUSED_STREAM) is sent again (see _refused)."""
    request, retry = call.request(**fields), RefusedRetry(timeout)
    while True:
        try:
            response = await getattr(stub, call.rpc)(request, metadata=metadata,
                                                     timeout=retry.timeout())
        except grpc.RpcError as error:
            wait_s = retry.backoff(error)
            if wait_s is None:
                raise from_rpc_error(error) from None
            await asyncio.sleep(wait_s)
        else:
            return call.result(response)


class AsyncHypervisor:
    """An asyncio connection to a pkvm-sim server (the twin of `Hypervisor`)."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        client_token: str | None = None,
    ) -> None:
        """TLS and client-token settings as `Hypervisor`'s."""
        self._owns_channel = channel is None
        credentials = channel_credentials(tls, root_certificates, private_key,
                                          certificate_chain)
        interceptors = [ClientTokenInterceptor(client_token)] if client_token else None
        all_options = [*CHANNEL_OPTIONS, *options]
        self.channel = channel or (
            grpc.aio.insecure_channel(target, options=all_options, interceptors=interceptors)
            if credentials is None else grpc.aio.secure_channel(
                target, credentials, options=all_options, interceptors=interceptors)
        )
        self.stub: Any = pb2_grpc.HypervisorServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    async def __aenter__(self) -> AsyncHypervisor:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (unless it was passed in). VMs are not destroyed."""
        if self._owns_channel:
            await self.channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the channel is connected; TransportError if not within `timeout` s."""
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except TimeoutError:
            raise TransportError(
                f"server not reachable within {timeout} s", code=grpc.StatusCode.UNAVAILABLE
            ) from None

    def _deadline(self, timeout: Timeout) -> float | None:
        return resolve_timeout(timeout, self.timeout)

    async def _invoke(self, call: Call[T], timeout: Timeout, **fields: Any) -> T:
        return await _invoke(self.stub, call, self._deadline(timeout), None, fields)

    async def serving(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """The server's grpc.health.v1 answer (see `Hypervisor.serving`)."""
        check: Any = self.channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                              response_deserializer=None)
        try:
            return is_serving(await check(b"", timeout=self._deadline(timeout)))
        except grpc.RpcError:
            return False

    def create_vm(
        self, nr_vcpus: int = 1, slice_pages: int = 256, name: str = "",
        lease_seconds: float | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AsyncVMCreation:
        """Create a VM (see `Hypervisor.create_vm`): `async with hv.create_vm(...) as vm`
        destroys it on exit; `vm = await hv.create_vm(...)` just creates it."""
        fields = create_vm_fields(nr_vcpus, slice_pages, name, lease_seconds)

        async def create() -> AsyncVM:
            response = await self._invoke(calls.CREATE_VM, timeout, **fields)
            return AsyncVM(self, response.vm, response.token, response.lease_seconds)

        return AsyncVMCreation(create)

    def attach(self, handle: int, token: str) -> AsyncVM:
        """A VM handle for a VM created elsewhere (e.g. by another process); no call is made."""
        return AsyncVM(self, VmInfo(handle=handle), token)

    async def map_mmio(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on MMIO address `addr` (InvalidArgumentError if it is RAM)."""
        return await self._invoke(calls.MAP_MMIO, timeout, addr=addr)

    async def host_fault(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on any address; a FATAL outcome is reported, not raised."""
        return await self._invoke(calls.HOST_FAULT, timeout, addr=addr)

    async def stats(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Stats:
        """A consistent snapshot of the pools, vmemmap, host stage-2 and carve-out."""
        return await self._invoke(calls.GET_STATS, timeout)

    async def page_info(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> PageInfo:
        """The vmemmap entry, owner and page states of `pfn`."""
        return await self._invoke(calls.GET_PAGE_INFO, timeout, pfn=pfn)

    async def reserve(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Reservation:
        """The carve-out report (kvm_hyp_reserve) of the server's configuration."""
        return await self._invoke(calls.RESERVE, timeout)

    async def memory_map(
        self, pools: Sequence[str] = (), *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> MemoryMap:
        """Where RAM, the carve-out and the free blocks of `pools` are (see
        `Hypervisor.memory_map`)."""
        return await self._invoke(calls.GET_MEMORY_MAP, timeout, pools=list(pools))

    async def save_state(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SavedState:
        """Have the server write its whole machine to its --state-file now (a host-wide
        call: the client token when the server has one)."""
        return await self._invoke(calls.SAVE_STATE, timeout)

    async def instance_id(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The server process's id, new at every start: a change means it restarted."""
        return (await self.stats(timeout=timeout)).instance_id


class AsyncVMCreation:
    """What `AsyncHypervisor.create_vm` returns: an `async with` block that creates the VM
    and destroys it on exit, or an awaitable that creates it. Await it once."""

    def __init__(self, create: Callable[[], Awaitable[AsyncVM]]) -> None:
        self._create = create
        self._vm: AsyncVM | None = None

    async def _get(self) -> AsyncVM:
        if self._vm is None:
            self._vm = await self._create()
        return self._vm

    def __await__(self) -> Generator[Any, None, AsyncVM]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncVM:
        return await self._get()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._vm is not None:
            await self._vm.destroy()



class AsyncVM(VmHandle):
    """One client VM over asyncio (the twin of `VM`); `async with` destroys it on exit."""

    hypervisor: AsyncHypervisor

    async def __aenter__(self) -> AsyncVM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.destroy()

    async def _invoke(self, call: Call[T], timeout: Timeout, **fields: Any) -> T:
        return await _invoke(self._stub, call, self._deadline(timeout), self._md,
                             {"handle": self.handle, **fields})

    async def destroy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Tear the VM down; returns the number of pages given back to the host. Idempotent:
        once this handle has destroyed the VM, later calls send nothing and return 0."""
        if self.destroyed:
            return 0
        pages = await self._invoke(calls.DESTROY_VM, timeout)
        self.destroyed = True
        return pages

    async def renew(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Renew the VM's lease; returns the seconds left on it (0.0: the VM has no lease)."""
        return self._renewed(await self._invoke(calls.RENEW_VM, timeout))

    async def alloc_pages(
        self, order: int = 0, pool: Pool | PoolName = Pool.HYP, *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> int:
        """hyp_alloc_pages: a 2**order block from the hyp pool or the VM's own (`Pool.VM`),
        owned by this VM; returns its head pfn."""
        return await self._invoke(calls.ALLOC_PAGES, timeout, order=order, pool=Pool.of(pool))

    async def put_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_put_page on a block head this VM owns; returns the refcount after."""
        return await self._invoke(calls.PUT_PAGE, timeout, pfn=pfn)

    async def get_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_get_page on a block head this VM owns; returns the refcount after."""
        return await self._invoke(calls.GET_PAGE, timeout, pfn=pfn)

    async def host_share(
        self, pfn: int, nr_pages: int = 1, *, page_by_page: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ShareResult:
        """__pkvm_host_share_hyp on pages of the VM's slice; returns their new states.
        All or nothing, or with page_by_page=True one page at a time as the host's loop does,
        stopping at the first refusal (`pages_done`, `failed_pfn`, `failed_reason`)."""
        return await self._invoke(calls.HOST_SHARE, timeout, pfn=pfn, nr_pages=nr_pages,
                                  page_by_page=page_by_page)

    async def host_unshare(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> ShareResult:
        """__pkvm_host_unshare_hyp (BusyError while EL2 has a page pinned)."""
        return await self._invoke(calls.HOST_UNSHARE, timeout, pfn=pfn, nr_pages=nr_pages)

    async def pin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_pin_shared_mem: EL2 takes a reference on shared pages (blocks unshare)."""
        await self._invoke(calls.PIN_SHARED, timeout, pfn=pfn, nr_pages=nr_pages)

    async def unpin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_unpin_shared_mem: drop EL2's reference taken by `pin_shared`."""
        await self._invoke(calls.UNPIN_SHARED, timeout, pfn=pfn, nr_pages=nr_pages)

    async def map_mmio(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """`AsyncHypervisor.map_mmio` (a host-level call: it needs no VM)."""
        return await self.hypervisor.map_mmio(addr, timeout=self._deadline(timeout))

    async def host_fault(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """`AsyncHypervisor.host_fault` (a host-level call: it needs no VM)."""
        return await self.hypervisor.host_fault(addr, timeout=self._deadline(timeout))

    async def topup_memcache(
        self, nr_pages: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> int:
        """Donate host pages to the VM's memcache; returns the memcache size after."""
        return await self._invoke(calls.TOPUP_MEMCACHE, timeout, nr_pages=nr_pages)

    async def guest_map(
        self, ipa: int, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> GuestMapping:
        """Map slice page `pfn` at `ipa` of the guest stage-2 (tables from the memcache)."""
        return await self._invoke(calls.GUEST_MAP, timeout, ipa=ipa, pfn=pfn)

    async def stats(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Stats:
        """`AsyncHypervisor.stats`."""
        return await self.hypervisor.stats(timeout=self._deadline(timeout))

    async def execute(
        self, batch: Batch, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> BatchResult:
        """Run one batch on a short-lived Execute stream whose deadline is `timeout`."""
        async with self.stream(timeout=self._deadline(timeout)) as stream:
            return await stream.execute(batch)

    def stream(self, *, timeout: float | None = None) -> AsyncBatchStream:
        """A long-lived Execute stream (`async with vm.stream() as s`); `timeout`: a deadline
        for the whole stream, in seconds (None: none)."""
        return AsyncBatchStream(self, timeout=timeout)


class AsyncBatchStream:
    """An open Execute stream over asyncio (`async with vm.stream() as s`). Deadlines end
    the stream as in `BatchStream`; a stream the server refused is opened again as there.
    Send its batches one after another (await each `execute`)."""

    def __init__(self, vm: AsyncVM, *, timeout: float | None = None) -> None:
        self.vm = vm
        self._deadline = deadline_in(timeout)  # the whole stream's, across new streams
        self._next_id = 0
        self._failed = False
        self._open()

    def _open(self) -> None:
        """Open the Execute call (again, after a refusal: with what is left of the deadline)."""
        self._call = self.vm._stub.Execute(metadata=self.vm._md,
                                           timeout=seconds_left(self._deadline))
        self._end = CallEnd(self._call)
        self._answered = 0  # batches answered on this call: once one was, none is resent

    async def __aenter__(self) -> AsyncBatchStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        """Send one batch and wait for its result; `timeout`: this batch's deadline, in
        seconds (None: only the stream's). A failure of the stream itself is raised, but a
        first batch the server refused with its stream (REFUSED_STREAM: nothing ran) is sent
        again on a new stream, within both deadlines (see _refused)."""
        self._next_id += 1
        request = batch.request(self.vm.handle, self._next_id)
        batch_deadline = deadline_in(timeout)
        retry: RefusedRetry | None = None  # made at the first failure (none: no cost)
        while True:
            try:
                response = await self._exchange(request, seconds_left(batch_deadline))
            except TimeoutError:
                self._failed = True
                self._call.cancel()
                raise TransportError(
                    f"no result for batch {self._next_id} within {timeout} s",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
            except grpc.RpcError as error:
                retry = retry or RefusedRetry(earliest(seconds_left(batch_deadline),
                                                       seconds_left(self._deadline)))
                wait_s = None if self._answered else retry.backoff(error)
                if wait_s is None:
                    self._failed = True
                    raise from_rpc_error(error) from None
                await asyncio.sleep(wait_s)
                self._open()
            else:
                return BatchResult.from_response(response)

    async def _exchange(self, request: Any, timeout: float | None) -> Any:
        """Write one batch on the call and read its answer. A call that ended raises its
        real status (CallEnd), whichever of the write or the read found it ended."""
        try:
            await self._call.write(request)
            response = await asyncio.wait_for(self._call.read(), timeout)
        except (grpc.RpcError, asyncio.InvalidStateError):  # InvalidState: already ended
            raise await self._end.error() from None
        if response is grpc.aio.EOF:
            raise await self._end.error()
        self._answered += 1
        return response

    async def close(self) -> None:
        """Half-close the stream and wait for the server to end it."""
        if self._failed and self._call.done():
            return
        try:
            await self._call.done_writing()
            code = await self._call.code()
        except grpc.RpcError as error:
            if not self._failed:
                raise from_rpc_error(error) from None
            return
        if code is not grpc.StatusCode.OK and not self._failed:
            raise from_rpc_error(await self._end.error())
