"""The synchronous SDK: a `Hypervisor` connection and the `VM` handles it creates.

    with Hypervisor("localhost:50051") as hv:
        with hv.create_vm(nr_vcpus=2, slice_pages=256) as vm:   # destroyed on exit
            pfn = vm.alloc_pages(order=2)
            vm.put_page(pfn)
        print(hv.stats().pools[0].free_pages)

Retries: only the read-only calls (GetStats, GetPageInfo, Reserve, health) are retried, by
gRPC's own retry policy, when the server is UNAVAILABLE; a mutation is never retried because
the client cannot know whether it ran.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from ._batch import Batch, BatchResult, pool_kind
from ._errors import PkvmError, from_rpc_error

T = TypeVar("T")
SERVICE = "pkvm.v1.HypervisorService"
READ_ONLY_METHODS = ("GetStats", "GetPageInfo", "Reserve")

# gRPC retry policy: transparent retries of the idempotent, read-only calls only.
SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in READ_ONLY_METHODS]
        + [{"service": "grpc.health.v1.Health", "method": "Check"}],
        "retryPolicy": {
            "maxAttempts": 4,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
})
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 4 << 20),
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def channel_credentials(
    tls: bool, root_certificates: bytes | None, private_key: bytes | None,
    certificate_chain: bytes | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: plaintext). Any PEM given implies TLS; root_certificates None
    trusts the system's CAs; private_key + certificate_chain present a client certificate
    (mutual TLS)."""
    if not (tls or root_certificates or private_key or certificate_chain):
        return None
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (mutual TLS)")
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def with_client_token(
    metadata: Sequence[tuple[str, str | bytes]] | None, token: str
) -> list[tuple[str, str | bytes]]:
    """The call's metadata plus the client token, unless it already names a credential
    (a VM's token)."""
    entries = list(metadata or ())
    if not any(key == "authorization" for key, _ in entries):
        entries.extend(auth_metadata(token))
    return entries


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: Any) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class ClientTokenInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Sends `authorization: Bearer <client token>` on unary calls that carry no VM token:
    CreateVM and the host-wide calls need it when the server has --client-token-file."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details, with_client_token(details.metadata,
                                                                    self.token)), request)


def make_channel(
    target: str, options: Sequence[tuple[str, Any]], credentials: grpc.ChannelCredentials | None,
    client_token: str | None,
) -> grpc.Channel:
    options = [*CHANNEL_OPTIONS, *options]
    channel = grpc.insecure_channel(target, options=options) if credentials is None \
        else grpc.secure_channel(target, credentials, options=options)
    if client_token:
        channel = grpc.intercept_channel(channel, ClientTokenInterceptor(client_token))
    return channel


def create_vm_request(
    nr_vcpus: int, slice_pages: int, name: str, lease_seconds: float | None
) -> pb2.CreateVMRequest:
    return pb2.CreateVMRequest(
        nr_vcpus=nr_vcpus, slice_pages=slice_pages, name=name,
        lease_seconds=lease_seconds or 0.0,
    )


def _call(fn: Callable[..., T], request: Any, **kwargs: Any) -> T:
    try:
        return fn(request, **kwargs)
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


class Hypervisor:
    """A connection to a pkvm-sim server. Thread-safe; share one per process."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        channel: grpc.Channel | None = None,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        client_token: str | None = None,
    ) -> None:
        """`tls` (implied by any PEM argument) connects with TLS: `root_certificates` is the
        CA bundle to trust (None: the system's), `private_key` + `certificate_chain` a client
        certificate for mutual TLS. `client_token` is sent on CreateVM and the host-wide
        calls (servers started with --client-token-file need it)."""
        self._owns_channel = channel is None
        credentials = channel_credentials(tls, root_certificates, private_key,
                                          certificate_chain)
        self.channel = channel or make_channel(target, options, credentials, client_token)
        self.stub: Any = pb2_grpc.HypervisorServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected (TransportError on timeout)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise PkvmError("server not reachable", code=grpc.StatusCode.UNAVAILABLE) from None

    # -- VMs -----------------------------------------------------------------------------------

    def create_vm(
        self, nr_vcpus: int = 1, slice_pages: int = 256, name: str = "",
        lease_seconds: float | None = None,
    ) -> VM:
        """Create a VM. `lease_seconds` (None = the server's default): the server destroys
        the VM once that long passes without a call for it; `vm.renew()` keeps it alive."""
        response = _call(
            self.stub.CreateVM,
            create_vm_request(nr_vcpus, slice_pages, name, lease_seconds),
            timeout=self.timeout,
        )
        return VM(self, response.vm, response.token, response.lease_seconds)

    def attach(self, handle: int, token: str) -> VM:
        """A VM handle for a VM created elsewhere (e.g. by another process)."""
        return VM(self, pb2.VM(handle=handle), token)

    # -- host-level calls and read-only views ----------------------------------------------------

    def map_mmio(self, addr: int) -> pb2.Fault:
        request = pb2.MapMMIORequest(addr=addr)
        return cast(pb2.Fault, _call(self.stub.MapMMIO, request, timeout=self.timeout).fault)

    def host_fault(self, addr: int) -> pb2.Fault:
        request = pb2.HostFaultRequest(addr=addr)
        return cast(pb2.Fault, _call(self.stub.HostFault, request, timeout=self.timeout).fault)

    def stats(self) -> pb2.GetStatsResponse:
        request = pb2.GetStatsRequest()
        return cast(pb2.GetStatsResponse, _call(self.stub.GetStats, request, timeout=self.timeout))

    def page_info(self, pfn: int) -> pb2.GetPageInfoResponse:
        request = pb2.GetPageInfoRequest(pfn=pfn)
        response = _call(self.stub.GetPageInfo, request, timeout=self.timeout)
        return cast(pb2.GetPageInfoResponse, response)

    def reserve(self) -> pb2.ReserveResponse:
        request = pb2.ReserveRequest()
        return cast(pb2.ReserveResponse, _call(self.stub.Reserve, request, timeout=self.timeout))


class VmHandle:
    """What the sync and asyncio VM classes share: identity, token and call settings.

    `lease_seconds`: the lease the server granted (0 = none), None when unknown (attach).
    Every call made for the VM renews its lease; `renew()` does it explicitly."""

    def __init__(
        self, hypervisor: Any, info: pb2.VM, token: str, lease_seconds: float | None = None
    ) -> None:
        self.hypervisor = hypervisor
        self.info = info
        self.handle: int = info.handle
        self.token = token
        self.lease_seconds = lease_seconds
        self._stub = hypervisor.stub
        self._md = auth_metadata(token)
        self._timeout: float | None = hypervisor.timeout
        self.destroyed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(handle={self.handle:#x}, name={self.info.name!r})"


class VM(VmHandle):
    """One client VM: its handle, token and the per-VM operations. As a context manager it
    destroys the VM on exit (the server reclaims everything it held)."""

    hypervisor: Hypervisor

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.destroyed:
            self.destroy()

    def _call(self, fn: Callable[..., T], request: Any) -> T:
        try:
            return fn(request, metadata=self._md, timeout=self._timeout)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def destroy(self) -> int:
        """Tear the VM down; returns the number of pages given back to the host."""
        response = self._call(self._stub.DestroyVM, pb2.DestroyVMRequest(handle=self.handle))
        self.destroyed = True
        return int(response.pages_returned)

    def renew(self) -> float:
        """Renew the VM's lease; returns the seconds left on it (0.0: the VM has no lease)."""
        response = self._call(self._stub.RenewVM, pb2.RenewVMRequest(handle=self.handle))
        self.lease_seconds = float(response.lease_seconds)
        return int(response.expires_in_ms) / 1000

    def alloc_pages(self, order: int = 0, pool: str | int = "hyp") -> int:
        """Allocate a 2**order block from the hyp pool ('hyp') or the VM's own ('vm')."""
        request = pb2.AllocPagesRequest(
            handle=self.handle, order=order, pool=cast(pb2.PoolKind, pool_kind(pool))
        )
        return int(self._call(self._stub.AllocPages, request).pfn)

    def put_page(self, pfn: int) -> int:
        request = pb2.PutPageRequest(handle=self.handle, pfn=pfn)
        return int(self._call(self._stub.PutPage, request).refcount)

    def get_page(self, pfn: int) -> int:
        request = pb2.GetPageRequest(handle=self.handle, pfn=pfn)
        return int(self._call(self._stub.GetPage, request).refcount)

    def host_share(self, pfn: int, nr_pages: int = 1) -> pb2.HostShareResponse:
        return cast(pb2.HostShareResponse, self._call(
            self._stub.HostShare,
            pb2.HostShareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages),
        ))

    def host_unshare(self, pfn: int, nr_pages: int = 1) -> pb2.HostUnshareResponse:
        return cast(pb2.HostUnshareResponse, self._call(
            self._stub.HostUnshare,
            pb2.HostUnshareRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages),
        ))

    def pin_shared(self, pfn: int, nr_pages: int = 1) -> None:
        self._call(
            self._stub.PinShared,
            pb2.PinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages),
        )

    def unpin_shared(self, pfn: int, nr_pages: int = 1) -> None:
        self._call(
            self._stub.UnpinShared,
            pb2.UnpinSharedRequest(handle=self.handle, pfn=pfn, nr_pages=nr_pages),
        )

    def map_mmio(self, addr: int) -> pb2.Fault:
        return self.hypervisor.map_mmio(addr)

    def host_fault(self, addr: int) -> pb2.Fault:
        return self.hypervisor.host_fault(addr)

    def topup_memcache(self, nr_pages: int) -> int:
        request = pb2.TopupMemcacheRequest(handle=self.handle, nr_pages=nr_pages)
        return int(self._call(self._stub.TopupMemcache, request).memcache_pages)

    def guest_map(self, ipa: int, pfn: int) -> pb2.GuestMapResponse:
        request = pb2.GuestMapRequest(handle=self.handle, ipa=ipa, pfn=pfn)
        return cast(pb2.GuestMapResponse, self._call(self._stub.GuestMap, request))

    def stats(self) -> pb2.GetStatsResponse:
        return self.hypervisor.stats()

    # -- batches -------------------------------------------------------------------------------

    def execute(self, batch: Batch) -> BatchResult:
        """Run one batch on a short-lived Execute stream."""
        with self.stream() as stream:
            return stream.execute(batch)

    def stream(self) -> BatchStream:
        """A long-lived Execute stream: many batches, one after another, on one call."""
        return BatchStream(self)


_END = object()


class BatchStream:
    """An open Execute stream of one VM (use as a context manager)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: Iterator[pb2.ExecuteResponse] = vm._stub.Execute(
            iter(self._requests.get, _END), metadata=vm._md
        )
        self._next_id = 0
        self._lock = threading.Lock()
        self._failed = False
        self._closed = False

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def execute(self, batch: Batch) -> BatchResult:
        with self._lock:
            self._next_id += 1
            self._requests.put(batch.request(self.vm.handle, self._next_id))
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                self._failed = True
                raise from_rpc_error(error) from None
        return BatchResult.from_response(response)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        try:
            for _ in self._responses:
                pass
        except grpc.RpcError as error:
            if not self._failed:
                raise from_rpc_error(error) from None
