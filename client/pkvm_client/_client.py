"""The synchronous SDK: a `Hypervisor` connection and the `VM` handles it creates.

    with Hypervisor("localhost:50051") as hv:
        with hv.create_vm(nr_vcpus=2, slice_pages=256) as vm:   # destroyed on exit
            pfn = vm.alloc_pages(order=2)
            vm.put_page(pfn, timeout=1.0)                       # this call's own deadline
        print(hv.stats().pool("hyp").free_pages)

Deadlines: every call takes `timeout=` (seconds; None = no deadline); left out, the client's
`timeout` applies. An Execute stream (`vm.stream(timeout=...)`) has no deadline unless given
one, since it is meant to live long; each `stream.execute(batch, timeout=...)` can have its own.

Retries: only the read-only calls (GetStats, GetPageInfo, Reserve, health) are retried, by
gRPC's own retry policy, when the server is UNAVAILABLE; a mutation is never retried because
the client cannot know whether it ran. The one exception: a call whose stream the server
refused unprocessed (HTTP/2 REFUSED_STREAM, its per-connection stream limit) is sent again,
whatever it is, within its deadline: a unary call, or the first batch of an Execute stream
on a new stream (see `_refused`).
"""

from __future__ import annotations

import json
import operator
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from ._batch import Batch, BatchResult
from ._errors import TransportError, from_rpc_error
from ._refused import RefusedRetry, deadline_in, earliest, seconds_left
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
    from_message,
    resolve_timeout,
)

T = TypeVar("T")
SERVICE = "pkvm.v1.HypervisorService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"

# -- the call table ---------------------------------------------------------------------------
#
# Per unary RPC: its request type, how its response becomes what the SDK returns, and the SDK
# methods that make it. The sync client (below) and the asyncio one (`_aio`) both make every
# unary call through its entry (`_invoke`), so a call is written once and the public methods
# are one line each, typed and documented. tests/service/test_descriptor.py walks the proto
# and fails when an RPC has no entry, or an entry names a method missing on either client.


@dataclass(frozen=True, eq=False)
class Call(Generic[T]):
    """One unary RPC as the SDK makes it."""

    rpc: str  # the method of pkvm.v1.HypervisorService
    request_type: type[Message]
    result: Callable[[Any], T]  # the response message -> what the SDK method returns
    # The SDK methods making it ("Hypervisor.stats", "VM.put_page"), each with its asyncio
    # twin; VM methods that only forward to the Hypervisor's (vm.stats) are not listed.
    methods: tuple[str, ...]
    read_only: bool = False  # gRPC retries it when the server is UNAVAILABLE

    def request(self, **fields: Any) -> Message:
        return self.request_type(**fields)


def _as(cls: type[T], field: str | None = None) -> Callable[[Any], T]:
    """The response (or its field `field`) as the result dataclass `cls`."""
    if field is None:
        return lambda response: from_message(cls, response)
    get = operator.attrgetter(field)
    return lambda response: from_message(cls, get(response))


def _int(field: str) -> Callable[[Any], int]:
    get = operator.attrgetter(field)
    return lambda response: int(get(response))


def _none(response: Any) -> None:
    return None


def _message(response: Any) -> Any:
    return response


CREATE_VM: Call[Any] = Call("CreateVM", pb2.CreateVMRequest, _message,
                            ("Hypervisor.create_vm",))
DESTROY_VM = Call("DestroyVM", pb2.DestroyVMRequest, _int("pages_returned"), ("VM.destroy",))
RENEW_VM: Call[Any] = Call("RenewVM", pb2.RenewVMRequest, _message, ("VM.renew",))
ALLOC_PAGES = Call("AllocPages", pb2.AllocPagesRequest, _int("pfn"), ("VM.alloc_pages",))
PUT_PAGE = Call("PutPage", pb2.PutPageRequest, _int("refcount"), ("VM.put_page",))
GET_PAGE = Call("GetPage", pb2.GetPageRequest, _int("refcount"), ("VM.get_page",))
HOST_SHARE = Call("HostShare", pb2.HostShareRequest, _as(ShareResult), ("VM.host_share",))
HOST_UNSHARE = Call("HostUnshare", pb2.HostUnshareRequest, _as(ShareResult),
                    ("VM.host_unshare",))
PIN_SHARED = Call("PinShared", pb2.PinSharedRequest, _none, ("VM.pin_shared",))
UNPIN_SHARED = Call("UnpinShared", pb2.UnpinSharedRequest, _none, ("VM.unpin_shared",))
MAP_MMIO = Call("MapMMIO", pb2.MapMMIORequest, _as(Fault, "fault"),
                ("Hypervisor.map_mmio",))
HOST_FAULT = Call("HostFault", pb2.HostFaultRequest, _as(Fault, "fault"),
                  ("Hypervisor.host_fault",))
TOPUP_MEMCACHE = Call("TopupMemcache", pb2.TopupMemcacheRequest, _int("memcache_pages"),
                      ("VM.topup_memcache",))
GUEST_MAP = Call("GuestMap", pb2.GuestMapRequest, _as(GuestMapping), ("VM.guest_map",))
GET_STATS = Call("GetStats", pb2.GetStatsRequest, _as(Stats), ("Hypervisor.stats",),
                 read_only=True)
GET_PAGE_INFO = Call("GetPageInfo", pb2.GetPageInfoRequest, _as(PageInfo),
                     ("Hypervisor.page_info",), read_only=True)
RESERVE = Call("Reserve", pb2.ReserveRequest, _as(Reservation), ("Hypervisor.reserve",),
               read_only=True)
GET_MEMORY_MAP = Call("GetMemoryMap", pb2.GetMemoryMapRequest, _as(MemoryMap),
                      ("Hypervisor.memory_map",), read_only=True)
SAVE_STATE = Call("SaveState", pb2.SaveStateRequest, _as(SavedState),
                  ("Hypervisor.save_state",))

CALLS: tuple[Call[Any], ...] = (
    CREATE_VM, DESTROY_VM, RENEW_VM, ALLOC_PAGES, PUT_PAGE, GET_PAGE, HOST_SHARE, HOST_UNSHARE,
    PIN_SHARED, UNPIN_SHARED, MAP_MMIO, HOST_FAULT, TOPUP_MEMCACHE, GUEST_MAP, GET_STATS,
    GET_PAGE_INFO, RESERVE, GET_MEMORY_MAP, SAVE_STATE,
)
# The streaming RPC and the SDK methods that open it.
STREAMS: dict[str, tuple[str, ...]] = {"Execute": ("VM.stream", "VM.execute")}
READ_ONLY_METHODS: tuple[str, ...] = tuple(call.rpc for call in CALLS if call.read_only)

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
    """The gRPC metadata that authorizes a call for the VM whose token this is."""
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


def create_vm_fields(
    nr_vcpus: int, slice_pages: int, name: str, lease_seconds: float | None
) -> dict[str, Any]:
    """The CreateVM request's fields (shared by the sync and asyncio clients)."""
    return {"nr_vcpus": nr_vcpus, "slice_pages": slice_pages, "name": name,
            "lease_seconds": lease_seconds or 0.0}


def is_serving(response: bytes) -> bool:
    """A grpc.health.v1 HealthCheckResponse, read without the grpcio-health-checking package
    (the SDK does not depend on it): field 1, `status`, a varint; SERVING is 1."""
    return response == b"\x08\x01"


def _invoke(stub: Any, call: Call[T], timeout: float | None,
            metadata: Sequence[tuple[str, str]] | None, fields: dict[str, Any]) -> T:
    """Make one unary call of the call table; a failure is raised as its typed PkvmError.
    A call the server refused unprocessed (REFUSED_STREAM) is sent again (see _refused)."""
    request, retry = call.request(**fields), RefusedRetry(timeout)
    while True:
        try:
            response = getattr(stub, call.rpc)(request, metadata=metadata,
                                               timeout=retry.timeout())
        except grpc.RpcError as error:
            wait_s = retry.backoff(error)
            if wait_s is None:
                raise from_rpc_error(error) from None
            time.sleep(wait_s)
        else:
            return call.result(response)


class Hypervisor:
    """A connection to a pkvm-sim server. Thread-safe; share one per process.

    `channel`: an existing channel to use instead of one to `target` (e.g. an in-process
    server's, or one with your own credentials); the Hypervisor then does not close it.
    `timeout`: the default deadline of every call, in seconds (None = none)."""

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
        """Close the channel (unless it was passed in). VMs are not destroyed."""
        if self._owns_channel:
            self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; TransportError if not within `timeout` s."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TransportError(
                f"server not reachable within {timeout} s", code=grpc.StatusCode.UNAVAILABLE
            ) from None

    def _deadline(self, timeout: Timeout) -> float | None:
        return resolve_timeout(timeout, self.timeout)

    def _invoke(self, call: Call[T], timeout: Timeout, **fields: Any) -> T:
        return _invoke(self.stub, call, self._deadline(timeout), None, fields)

    def serving(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> bool:
        """The server's grpc.health.v1 answer for the whole server: True when SERVING,
        False when NOT_SERVING or unreachable (what `pkvm-sim healthcheck` asks)."""
        check: Any = self.channel.unary_unary(HEALTH_CHECK, request_serializer=None,
                                              response_deserializer=None)
        try:
            return is_serving(check(b"", timeout=self._deadline(timeout)))
        except grpc.RpcError:
            return False

    # -- VMs -----------------------------------------------------------------------------------

    def create_vm(
        self, nr_vcpus: int = 1, slice_pages: int = 256, name: str = "",
        lease_seconds: float | None = None, *, timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> VM:
        """Create a VM with a slice of `slice_pages` pages of host RAM; use it as a context
        manager to destroy it on exit. `lease_seconds` (None = the server's default): the
        server destroys the VM once that long passes without a call for it; `vm.renew()`
        keeps it alive."""
        response = self._invoke(CREATE_VM, timeout, **create_vm_fields(
            nr_vcpus, slice_pages, name, lease_seconds))
        return VM(self, response.vm, response.token, response.lease_seconds)

    def attach(self, handle: int, token: str) -> VM:
        """A VM handle for a VM created elsewhere (e.g. by another process); no call is made."""
        return VM(self, VmInfo(handle=handle), token)

    # -- host-level calls and read-only views ----------------------------------------------------

    def map_mmio(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on MMIO address `addr` (InvalidArgumentError if it is RAM)."""
        return self._invoke(MAP_MMIO, timeout, addr=addr)

    def host_fault(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """A host stage-2 fault on any address; a FATAL outcome is reported, not raised."""
        return self._invoke(HOST_FAULT, timeout, addr=addr)

    def stats(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Stats:
        """A consistent snapshot of the pools, vmemmap, host stage-2 and carve-out."""
        return self._invoke(GET_STATS, timeout)

    def page_info(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> PageInfo:
        """The vmemmap entry, owner and page states of `pfn`."""
        return self._invoke(GET_PAGE_INFO, timeout, pfn=pfn)

    def reserve(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Reservation:
        """The carve-out report (kvm_hyp_reserve) of the server's configuration."""
        return self._invoke(RESERVE, timeout)

    def memory_map(
        self, pools: Sequence[str] = (), *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> MemoryMap:
        """Where RAM, the carve-out and the free blocks of `pools` are (names as `stats()`
        reports them; empty: the hyp pool and the host stage-2 pool(s)); what
        `pkvm-sim draw` pictures."""
        return self._invoke(GET_MEMORY_MAP, timeout, pools=list(pools))

    # -- the state file (docs/state-file.md) ---------------------------------------------------

    def save_state(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> SavedState:
        """Have the server write its whole machine to its --state-file now (a host-wide
        call: the client token when the server has one; FailedPreconditionError when it runs
        without --state-file)."""
        return self._invoke(SAVE_STATE, timeout)

    def instance_id(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> str:
        """The server process's id, new at every start: a change means it restarted (its
        machine was restored from a state file, or booted afresh)."""
        return self.stats(timeout=timeout).instance_id


class VmHandle:
    """What the sync and asyncio VM classes share: identity, token and call settings.

    `info`: the VM as created (`VmInfo`; only `handle` is known for `attach`).
    `lease_seconds`: the lease the server granted (0 = none), None when unknown (attach).
    Every call made for the VM renews its lease; `renew()` does it explicitly."""

    def __init__(
        self, hypervisor: Any, info: VmInfo | pb2.VM, token: str,
        lease_seconds: float | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.info = info if isinstance(info, VmInfo) else from_message(VmInfo, info)
        self.handle: int = self.info.handle
        self.token = token
        self.lease_seconds = lease_seconds
        self._stub = hypervisor.stub
        self._md = auth_metadata(token)
        self._timeout: float | None = hypervisor.timeout
        self.destroyed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(handle={self.handle:#x}, name={self.info.name!r})"

    def _deadline(self, timeout: Timeout) -> float | None:
        return resolve_timeout(timeout, self._timeout)

    def _renewed(self, response: Any) -> float:
        """Note a RenewVM response; the seconds left on the lease."""
        self.lease_seconds = float(response.lease_seconds)
        return int(response.expires_in_ms) / 1000


class VM(VmHandle):
    """One client VM: its handle, token and the per-VM operations. As a context manager it
    destroys the VM on exit (the server reclaims everything it held).

    Every method takes `timeout=` (seconds, None = no deadline; left out: the client's)."""

    hypervisor: Hypervisor

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def _invoke(self, call: Call[T], timeout: Timeout, **fields: Any) -> T:
        return _invoke(self._stub, call, self._deadline(timeout), self._md,
                       {"handle": self.handle, **fields})

    def destroy(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Tear the VM down; returns the number of pages given back to the host. Idempotent:
        once this handle has destroyed the VM, later calls send nothing and return 0."""
        if self.destroyed:
            return 0
        pages = self._invoke(DESTROY_VM, timeout)
        self.destroyed = True
        return pages

    def renew(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> float:
        """Renew the VM's lease; returns the seconds left on it (0.0: the VM has no lease)."""
        return self._renewed(self._invoke(RENEW_VM, timeout))

    def alloc_pages(
        self, order: int = 0, pool: Pool | PoolName = Pool.HYP, *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> int:
        """hyp_alloc_pages: a 2**order block from the hyp pool or the VM's own (`Pool.VM`),
        owned by this VM; returns its head pfn."""
        return self._invoke(ALLOC_PAGES, timeout, order=order, pool=Pool.of(pool))

    def put_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_put_page on a block head this VM owns; returns the refcount after (0: the
        block went back to its pool)."""
        return self._invoke(PUT_PAGE, timeout, pfn=pfn)

    def get_page(self, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """hyp_get_page on a block head this VM owns; returns the refcount after."""
        return self._invoke(GET_PAGE, timeout, pfn=pfn)

    def host_share(
        self, pfn: int, nr_pages: int = 1, *, page_by_page: bool = False,
        timeout: Timeout = USE_CLIENT_DEFAULT,
    ) -> ShareResult:
        """__pkvm_host_share_hyp on pages of the VM's slice; returns their new states.
        All or nothing, or with page_by_page=True one page at a time as the host's loop does,
        stopping at the first refusal (`pages_done`, `failed_pfn`, `failed_reason`)."""
        return self._invoke(HOST_SHARE, timeout, pfn=pfn, nr_pages=nr_pages,
                            page_by_page=page_by_page)

    def host_unshare(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> ShareResult:
        """__pkvm_host_unshare_hyp (BusyError while EL2 has a page pinned)."""
        return self._invoke(HOST_UNSHARE, timeout, pfn=pfn, nr_pages=nr_pages)

    def pin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_pin_shared_mem: EL2 takes a reference on shared pages (blocks unshare)."""
        self._invoke(PIN_SHARED, timeout, pfn=pfn, nr_pages=nr_pages)

    def unpin_shared(
        self, pfn: int, nr_pages: int = 1, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> None:
        """hyp_unpin_shared_mem: drop EL2's reference taken by `pin_shared`."""
        self._invoke(UNPIN_SHARED, timeout, pfn=pfn, nr_pages=nr_pages)

    def map_mmio(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """`Hypervisor.map_mmio` (a host-level call: it needs no VM)."""
        return self.hypervisor.map_mmio(addr, timeout=self._deadline(timeout))

    def host_fault(self, addr: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Fault:
        """`Hypervisor.host_fault` (a host-level call: it needs no VM)."""
        return self.hypervisor.host_fault(addr, timeout=self._deadline(timeout))

    def topup_memcache(self, nr_pages: int, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> int:
        """Donate host pages to the VM's memcache; returns the memcache size after."""
        return self._invoke(TOPUP_MEMCACHE, timeout, nr_pages=nr_pages)

    def guest_map(
        self, ipa: int, pfn: int, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> GuestMapping:
        """Map slice page `pfn` at `ipa` of the guest stage-2 (tables from the memcache)."""
        return self._invoke(GUEST_MAP, timeout, ipa=ipa, pfn=pfn)

    def stats(self, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> Stats:
        """`Hypervisor.stats`."""
        return self.hypervisor.stats(timeout=self._deadline(timeout))

    # -- batches -------------------------------------------------------------------------------

    def execute(self, batch: Batch, *, timeout: Timeout = USE_CLIENT_DEFAULT) -> BatchResult:
        """Run one batch on a short-lived Execute stream whose deadline is `timeout`."""
        with self.stream(timeout=self._deadline(timeout)) as stream:
            return stream.execute(batch)

    def stream(self, *, timeout: float | None = None) -> BatchStream:
        """A long-lived Execute stream: many batches, one after another, on one call.
        `timeout`: a deadline for the whole stream, in seconds (None: none)."""
        return BatchStream(self, timeout=timeout)


_END = object()


class BatchStream:
    """An open Execute stream of one VM (use as a context manager). Send its batches one
    after another (`execute` holds a lock for that).

    A deadline that passes, for the stream or for one batch, ends the stream with a
    TransportError (DEADLINE_EXCEEDED). Operations of that batch the server already ran stay
    done; the client cannot tell how many ran. A stream the server refused when it opened
    (REFUSED_STREAM, before any batch of it was answered) ran nothing: its first batch is sent
    again on a new stream, within the deadlines (see _refused)."""

    def __init__(self, vm: VM, *, timeout: float | None = None) -> None:
        self.vm = vm
        self._deadline = deadline_in(timeout)  # the whole stream's, across new streams
        self._next_id = 0
        self._lock = threading.Lock()
        self._failed = False
        self._closed = False
        self._expired = False
        self._waiting: int | None = None  # the batch whose result execute() waits for
        self._open()

    def _open(self) -> None:
        """Open the Execute call (again, after a refusal: with what is left of the deadline).
        gRPC's thread sends what `_requests` yields, until _END."""
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: Any = self.vm._stub.Execute(
            iter(self._requests.get, _END), metadata=self.vm._md,
            timeout=seconds_left(self._deadline),
        )
        self._answered = 0  # batches answered on this call: once one was, none is resent

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def execute(self, batch: Batch, *, timeout: float | None = None) -> BatchResult:
        """Send one batch and wait for its result; `timeout`: this batch's deadline, in
        seconds (None: only the stream's). A failure of the stream itself is raised."""
        with self._lock:
            self._next_id += 1
            request = batch.request(self.vm.handle, self._next_id)
            batch_id = self._waiting = self._next_id
            timer = None if timeout is None else threading.Timer(
                timeout, self._expire, (batch_id,)
            )
            if timer is not None:
                timer.start()
            try:
                response = self._exchange(request, deadline_in(timeout))
                self._waiting = None
            except grpc.RpcError as error:
                self._failed = True
                if self._expired:
                    raise TransportError(
                        f"no result for batch {self._next_id} within {timeout} s",
                        code=grpc.StatusCode.DEADLINE_EXCEEDED,
                    ) from None
                raise from_rpc_error(error) from None
            finally:
                if timer is not None:
                    timer.cancel()
        return BatchResult.from_response(response)

    def _exchange(self, request: Any, batch_deadline: float | None) -> Any:
        """Send one batch and read its answer; a first batch refused with its stream is sent
        again on a new one, before `batch_deadline` (time.monotonic(); None: none) and the
        stream's. Raises the call's RpcError otherwise."""
        retry: RefusedRetry | None = None  # made at the first failure (none: no cost)
        while True:
            self._requests.put(request)
            try:
                response = next(self._responses)
            except grpc.RpcError as error:
                self._requests.put(_END)  # ends gRPC's thread sending for the failed call
                retry = retry or RefusedRetry(earliest(seconds_left(batch_deadline),
                                                       seconds_left(self._deadline)))
                wait_s = None if self._answered or self._expired else retry.backoff(error)
                if wait_s is None:
                    raise
                time.sleep(wait_s)
                self._open()
                if self._expired:  # the batch deadline passed meanwhile (see _expire)
                    self._responses.cancel()
                    raise
            else:
                self._answered += 1
                return response

    def _expire(self, batch_id: int) -> None:
        """A batch deadline passed: end the stream, unless that batch's result came in."""
        if self._waiting == batch_id:
            self._expired = True
            self._responses.cancel()

    def close(self) -> None:
        """Half-close the stream and wait for the server to end it (idempotent)."""
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
