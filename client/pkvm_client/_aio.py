"""The asyncio twin of the SDK: `AsyncHypervisor` and `AsyncVM`, same methods, awaitable.

    async with AsyncHypervisor("localhost:50051") as hv:
        async with await hv.create_vm(slice_pages=256) as vm:
            pfn = await vm.alloc_pages(order=1)
            await vm.put_page(pfn)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast

import grpc
import grpc.aio
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from ._batch import Batch, BatchResult, pool_kind
from ._client import (
    CHANNEL_OPTIONS,
    VmHandle,
    channel_credentials,
    create_vm_request,
    with_client_token,
)
from ._errors import from_rpc_error


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
    try:
        return await fn(request, **kwargs)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


class AsyncHypervisor:
    """An asyncio connection to a pkvm-sim server."""

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
        if self._owns_channel:
            await self.channel.close()

    async def create_vm(
        self, nr_vcpus: int = 1, slice_pages: int = 256, name: str = "",
        lease_seconds: float | None = None,
    ) -> AsyncVM:
        response = await _call(
            self.stub.CreateVM,
            create_vm_request(nr_vcpus, slice_pages, name, lease_seconds),
            timeout=self.timeout,
        )
        return AsyncVM(self, response.vm, response.token, response.lease_seconds)

    def attach(self, handle: int, token: str) -> AsyncVM:
        return AsyncVM(self, pb2.VM(handle=handle), token)

    async def map_mmio(self, addr: int) -> pb2.Fault:
        response = await _call(self.stub.MapMMIO, pb2.MapMMIORequest(addr=addr),
                               timeout=self.timeout)
        return response.fault  # type: ignore[no-any-return]

    async def host_fault(self, addr: int) -> pb2.Fault:
        response = await _call(self.stub.HostFault, pb2.HostFaultRequest(addr=addr),
                               timeout=self.timeout)
        return response.fault  # type: ignore[no-any-return]

    async def stats(self) -> pb2.GetStatsResponse:
        return await _call(self.stub.GetStats, pb2.GetStatsRequest(),  # type: ignore[no-any-return]
                           timeout=self.timeout)

    async def page_info(self, pfn: int) -> pb2.GetPageInfoResponse:
        return await _call(  # type: ignore[no-any-return]
            self.stub.GetPageInfo, pb2.GetPageInfoRequest(pfn=pfn), timeout=self.timeout
        )

    async def reserve(self) -> pb2.ReserveResponse:
        return await _call(self.stub.Reserve, pb2.ReserveRequest(),  # type: ignore[no-any-return]
                           timeout=self.timeout)


class AsyncVM(VmHandle):
    """One client VM over asyncio; `async with` destroys it on exit."""

    hypervisor: AsyncHypervisor

    async def __aenter__(self) -> AsyncVM:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.destroyed:
            await self.destroy()

    async def _call(self, fn: Any, request: Any) -> Any:
        return await _call(fn, request, metadata=self._md, timeout=self._timeout)

    async def destroy(self) -> int:
        response = await self._call(self._stub.DestroyVM, pb2.DestroyVMRequest(handle=self.handle))
        self.destroyed = True
        return response.pages_returned  # type: ignore[no-any-return]

    async def renew(self) -> float:
        """Renew the VM's lease; returns the seconds left on it (0.0: the VM has no lease)."""
        response = await self._call(self._stub.RenewVM, pb2.RenewVMRequest(handle=self.handle))
        self.lease_seconds = float(response.lease_seconds)
        return int(response.expires_in_ms) / 1000

    async def alloc_pages(self, order: int = 0, pool: str | int = "hyp") -> int:
        kind = cast(pb2.PoolKind, pool_kind(pool))
        request = pb2.AllocPagesRequest(handle=self.handle, order=order, pool=kind)
        return (await self._call(self._stub.AllocPages, request)).pfn  # type: ignore[no-any-return]

    async def put_page(self, pfn: int) -> int:
        request = pb2.PutPageRequest(handle=self.handle, pfn=pfn)
        return (await self._call(self._stub.PutPage, request)).refcount  # type: ignore[no-any-return]

    async def get_page(self, pfn: int) -> int:
        request = pb2.GetPageRequest(handle=self.handle, pfn=pfn)
        return (await self._call(self._stub.GetPage, request)).refcount  # type: ignore[no-any-return]

    async def host_share(self, pfn: int, nr_pages: int = 1) -> pb2.HostShareResponse:
        request = pb2.HostShareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        return await self._call(self._stub.HostShare, request)  # type: ignore[no-any-return]

    async def host_unshare(self, pfn: int, nr_pages: int = 1) -> pb2.HostUnshareResponse:
        request = pb2.HostUnshareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        return await self._call(self._stub.HostUnshare, request)  # type: ignore[no-any-return]

    async def pin_shared(self, pfn: int, nr_pages: int = 1) -> None:
        request = pb2.PinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        await self._call(self._stub.PinShared, request)

    async def unpin_shared(self, pfn: int, nr_pages: int = 1) -> None:
        request = pb2.UnpinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages)
        await self._call(self._stub.UnpinShared, request)

    async def map_mmio(self, addr: int) -> pb2.Fault:
        return await self.hypervisor.map_mmio(addr)

    async def host_fault(self, addr: int) -> pb2.Fault:
        return await self.hypervisor.host_fault(addr)

    async def topup_memcache(self, nr_pages: int) -> int:
        request = pb2.TopupMemcacheRequest(handle=self.handle, nr_pages=nr_pages)
        response = await self._call(self._stub.TopupMemcache, request)
        return response.memcache_pages  # type: ignore[no-any-return]

    async def guest_map(self, ipa: int, pfn: int) -> pb2.GuestMapResponse:
        request = pb2.GuestMapRequest(handle=self.handle, ipa=ipa, pfn=pfn)
        return await self._call(self._stub.GuestMap, request)  # type: ignore[no-any-return]

    async def stats(self) -> pb2.GetStatsResponse:
        return await self.hypervisor.stats()

    async def execute(self, batch: Batch) -> BatchResult:
        """Run one batch on a short-lived Execute stream."""
        async with self.stream() as stream:
            return await stream.execute(batch)

    def stream(self) -> AsyncBatchStream:
        return AsyncBatchStream(self)


class AsyncBatchStream:
    """An open Execute stream over asyncio (`async with vm.stream() as s`)."""

    def __init__(self, vm: AsyncVM) -> None:
        self.vm = vm
        self._call = vm._stub.Execute(metadata=vm._md)
        self._next_id = 0
        self._failed = False

    async def __aenter__(self) -> AsyncBatchStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, batch: Batch) -> BatchResult:
        self._next_id += 1
        try:
            await self._call.write(batch.request(self.vm.handle, self._next_id))
            response = await self._call.read()
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
        try:
            await self._call.done_writing()
            code = await self._call.code()
        except grpc.RpcError as error:
            if not self._failed:
                raise from_rpc_error(error) from None
            return
        if code is not grpc.StatusCode.OK and not self._failed:
            raise from_rpc_error(await self._error())
