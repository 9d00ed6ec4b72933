"""The SDK's one call table: per unary RPC, its request type, how its response becomes what
the SDK returns, and the SDK methods that make it.

The sync (`_client`) and asyncio (`_aio`) clients both make every unary call through this
table (`Call.request` then `Call.result`), so a call is written once; their public methods
are one line each, typed and documented. `tests/service/test_descriptor.py` walks the proto
and fails when an RPC has no entry here, or an entry names an SDK method that is missing on
either client.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from pkvm.v1 import hypervisor_pb2 as pb2

from ._types import (
    Fault,
    GuestMapping,
    MemoryMap,
    PageInfo,
    Reservation,
    SavedState,
    ShareResult,
    Stats,
    from_message,
)

T = TypeVar("T")


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
