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
from typing import Any, cast

import grpc
import grpc.aio
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from ._batch import Batch, BatchResult
from ._client import (
    CHANNEL_OPTIONS,
    VmHandle,
    channel_credentials,
    create_vm_request,
    with_client_token,
)
from ._errors import TransportError, from_rpc_error
from ._types import (
    USE_CLIENT_DEFAULT,
    Fault,
    GuestMapping,
    PageInfo,
    Pool,
    PoolName,
    Reservation,
    SavedState,
    ShareResult,
    Stats,
    Timeout,
    VmInfo,
    from_message,
    resolve_timeout,
)


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


async def _call(fn: Any, request: Any, **kwargs: Any) -> Any:
    """Make one unary call; a failure is raised as its typed PkvmError."""
    try:
        return await fn(request, **kwargs)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


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

    def create_vm(
        self, nr_vcpus: int = 1, slice_pages: int = 256, name: str = "",
        lease_seconds: float | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> AsyncVMCreation:
        """Create a VM (see `Hypervisor.create_vm`): `async with hv.create_vm(...) as vm`
        destroys it on exit; `vm = await hv.create_vm(...)` just creates it."""
        request = create_vm_request(nr_vcpus, slice_pages, name, lease_seconds)

        async def create() -> AsyncVM:
            response = await _call(self.stub.CreateVM, request, timeout=self._deadline(timeout))
            return AsyncVM(self, response.vm, response.token, response.lease_seconds)

        return AsyncVMCreation(create)

    def attach(self, handle: int, token: str) -> AsyncVM:
        """A VM handle for a VM created elsewhere (e.g. by another process); no call is made."""
        return AsyncVM(self, VmInfo(handle=handle), token)

    async def map_mmio(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on MMIO address `addr` (InvalidArgumentError if it is RAM)."""
        response = await _call(self.stub.MapMMIO, pb2.MapMMIORequest(addr=addr),
                               timeout=self._deadline(timeout))
        return from_message(Fault, response.fault)

    async def host_fault(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on any address; a FATAL outcome is reported, not raised."""
        response = await _call(self.stub.HostFault, pb2.HostFaultRequest(addr=addr),
                               timeout=self._deadline(timeout))
        return from_message(Fault, response.fault)

    async def stats(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Stats:
        """A consistent snapshot of the pools, vmemmap, host stage-2 and carve-out."""
        response = await _call(self.stub.GetStats, pb2.GetStatsRequest(),
                               timeout=self._deadline(timeout))
        return from_message(Stats, response)

    async def page_info(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> PageInfo:
        """The vmemmap entry, owner and page states of `pfn`."""
        response = await _call(self.stub.GetPageInfo, pb2.GetPageInfoRequest(pfn=pfn),
                               timeout=self._deadline(timeout))
        return from_message(PageInfo, response)

    async def reserve(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Reservation:
        """The carve-out report (kvm_hyp_reserve) of the server's configuration."""
        response = await _call(self.stub.Reserve, pb2.ReserveRequest(),
                               timeout=self._deadline(timeout))
        return from_message(Reservation, response)

    async def save_state(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SavedState:
        """Have the server write its whole machine to its --state-file now (a host-wide
        call: the client token when the server has one)."""
        response = await _call(self.stub.SaveState, pb2.SaveStateRequest(),
                               timeout=self._deadline(timeout))
        return from_message(SavedState, response)

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

    async def _call(self, fn: Any, request: Any, timeout: Timeout) -> Any:
        return await _call(fn, request, metadata=self._md, timeout=self._deadline(timeout))

    async def destroy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Tear the VM down; returns the number of pages given back to the host. Idempotent:
        once this handle has destroyed the VM, later calls send nothing and return 0."""
        if self.destroyed:
            return 0
        request = pb2.DestroyVMRequest(handle=self.handle)
        response = await self._call(self._stub.DestroyVM, request, timeout)
        self.destroyed = True
        return int(response.pages_returned)

    async def renew(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Renew the VM's lease; returns the seconds left on it (0.0: the VM has no lease)."""
        request = pb2.RenewVMRequest(handle=self.handle)
        response = await self._call(self._stub.RenewVM, request, timeout)
        self.lease_seconds = float(response.lease_seconds)
        return int(response.expires_in_ms) / 1000

    async def alloc_pages(
        self, order: int = 0, pool: Pool | PoolName = Pool.HYP, *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> int:
        """hyp_alloc_pages: a 2**order block from the hyp pool or the VM's own (`Pool.VM`),
        owned by this VM; returns its head pfn."""
        kind = cast(pb2.PoolKind, Pool.of(pool))
        request = pb2.AllocPagesRequest(handle=self.handle, order=order, pool=kind)
        return int((await self._call(self._stub.AllocPages, request, timeout)).pfn)

    async def put_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_put_page on a block head this VM owns; returns the refcount after."""
        request = pb2.PutPageRequest(handle=self.handle, pfn=pfn)
        return int((await self._call(self._stub.PutPage, request, timeout)).refcount)

    async def get_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_get_page on a block head this VM owns; returns the refcount after."""
        request = pb2.GetPageRequest(handle=self.handle, pfn=pfn)
        return int((await self._call(self._stub.GetPage, request, timeout)).refcount)

    async def host_share(
        self, pfn: int, nr_pages: int = 1, *, page_by_page: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ShareResult:
        """__pkvm_host_share_hyp on pages of the VM's slice; returns their new states.
        All or nothing, or with page_by_page=True one page at a time as the host's loop does,
        stopping at the first refusal (`pages_done`, `failed_pfn`, `failed_reason`)."""
        request = pb2.HostShareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages,
                                       page_by_page=page_by_page)
        return from_message(ShareResult, await self._call(self._stub.HostShare, request, timeout))

    async def host_unshare(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> ShareResult:
        """__pkvm_host_unshare_hyp (BusyError while EL2 has a page pinned)."""
        request = pb2.HostUnshareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        response = await self._call(self._stub.HostUnshare, request, timeout)
        return from_message(ShareResult, response)

    async def pin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_pin_shared_mem: EL2 takes a reference on shared pages (blocks unshare)."""
        request = pb2.PinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        await self._call(self._stub.PinShared, request, timeout)

    async def unpin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_unpin_shared_mem: drop EL2's reference taken by `pin_shared`."""
        request = pb2.UnpinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        await self._call(self._stub.UnpinShared, request, timeout)

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
        request = pb2.TopupMemcacheRequest(handle=self.handle, nr_pages=nr_pages)
        response = await self._call(self._stub.TopupMemcache, request, timeout)
        return int(response.memcache_pages)

    async def guest_map(
        self, ipa: int, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> GuestMapping:
        """Map slice page `pfn` at `ipa` of the guest stage-2 (tables from the memcache)."""
        request = pb2.GuestMapRequest(handle=self.handle, ipa=ipa, pfn=pfn)
        return from_message(GuestMapping, await self._call(self._stub.GuestMap, request, timeout))

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
    the stream as in `BatchStream`."""

    def __init__(self, vm: AsyncVM, *, timeout: float | None = None) -> None:
        self.vm = vm
        self._call = vm._stub.Execute(metadata=vm._md, timeout=timeout)
        self._next_id = 0
        self._failed = False

    async def __aenter__(self) -> AsyncBatchStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        """Send one batch and wait for its result; `timeout`: this batch's deadline, in
        seconds (None: only the stream's). A failure of the stream itself is raised."""
        self._next_id += 1
        try:
            await self._call.write(batch.request(self.vm.handle, self._next_id))
            response = await asyncio.wait_for(self._call.read(), timeout)
        except TimeoutError:
            self._failed = True
            self._call.cancel()
            raise TransportError(
                f"no result for batch {self._next_id} within {timeout} s",
                code=grpc.StatusCode.DEADLINE_EXCEEDED,
            ) from None
        except grpc.RpcError as error:
            self._failed = True
            raise from_rpc_error(error) from None
        if response is grpc.aio.EOF:
            self._failed = True
            raise from_rpc_error(await self._error())
        return BatchResult.from_response(response)

    async def _error(self) -> grpc.RpcError:
        code = await self._call.code()
        details = await self._call.details()
        trailing = await self._call.trailing_metadata()
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)

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
            raise from_rpc_error(await self._error())
