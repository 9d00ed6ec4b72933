"""One record per operation of the service: what the unary handlers and Execute share.

An `Operation` says, once, for one RPC:

- `rpc`: its name in `pkvm.v1.HypervisorService` (the response type comes from the proto);
- `auth`: the credentials it needs (`Auth`);
- `run(machine, *args)`: the core call with the service's bounds (`max_pages_per_op`), quota
  ledger and fault counts applied, taking the request fields named by `args`, in order;
- `reply(machine, request, result)`: the response message (by default generic: a result
  dataclass's attributes go into the response fields of the same name, see `to_message`);
- `counted`: its name in `pkvm_operations_total{op}` (None: not counted);
- `batch_op`: its `BatchOp`, when Execute runs it too. A batch operation passes the batch's
  handle (when `args` starts with "handle") then arg0, arg1 for the next `args`, and its
  value is `batch_value(result)` (the result itself when None).

The servicer turns each record into a unary handler (service/servicer.py: admission,
credentials, lock, counts) and Execute into a table BatchOp -> function (service/batch.py).
So a new operation is one record and its `run` here, plus the core method it calls.
`tests/service/test_descriptor.py` walks the proto and fails when an RPC has no record.
"""

from __future__ import annotations

import enum
import functools
import logging
import operator
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from pkvm.v1 import hypervisor_pb2 as pb2

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import InvalidArgument, WouldPanic
from pkvm_sim.core.hyp_stage1 import HypStage1, Key
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import FaultOutcome, FaultResult, PoolKind, ShareResult, VmInfo

from .errors import ServiceError
from .limits import (
    ClientLedger,
    HypPageLedger,
    Limits,
    check_name,
    check_pages,
    choose_payer,
    quota_exceeded,
)
from .table_users import users_of

if TYPE_CHECKING:
    from .auth import TokenRegistry
    from .counters import ServiceCounters
    from .leases import LeaseTable
    from .persist import SaveResult

log = logging.getLogger(__name__)
SERVICE = pb2.DESCRIPTOR.services_by_name["HypervisorService"]


class Auth(enum.Enum):
    """The credentials a method needs."""

    NONE = "none"  # read-only views
    VM = "vm"  # the token of the VM named by request.handle
    CLIENT = "client"  # the client token, when one is configured (CreateVM, host-wide calls)


@dataclass
class Machine:
    """What the operations work on: the core and the service state beside it. Every field
    but `save_state` is read and written under the simulator lock."""

    hv: Hypervisor
    config: SimConfig
    limits: Limits
    ledger: HypPageLedger
    counters: ServiceCounters
    leases: LeaseTable
    tokens: TokenRegistry
    reservation: pb2.ReserveResponse
    instance_id: str
    clients: ClientLedger
    # SaveState: takes the lock itself, writes on a worker thread (set by the servicer).
    save_state: Callable[[], Awaitable[SaveResult]] | None = None
    # GetStats: concurrent calls share one snapshot (service/coalesce.py; set by the servicer).
    shared_stats: Callable[[], Awaitable[Message]] | None = None

    def forget_vm(self, handle: int) -> None:
        """Service bookkeeping of a destroyed VM (its teardown unmapped its shares and pins:
        the tables EL2 freed are released first, whichever VM they were charged to; the
        VM's tables still in use are charged to a VM using them, `choose_payer`)."""
        self.tokens.revoke(handle)
        ledger = self.ledger
        ledger.settle_tables(self.hv.hyp_stage1)
        in_use = ledger.tables_charged_to(handle)
        payers = self.payers_of(in_use, self.clients.owner_of(handle)) if in_use else {}
        self.clients.forget(handle)
        ledger.drop(handle, payers)

    def payers_of(self, tables: dict[int, Key], payer_client: str | None
                  ) -> dict[int, int | None]:
        """table pfn -> the live VM to charge it to now (choose_payer; None: no VM uses
        it). O(pages EL2 maps under those tables)."""
        users = users_of(self.hv, tables.values())
        owner_of = self.clients.owner_of
        return {pfn: choose_payer(users[key], owner_of, payer_client)
                for pfn, key in tables.items()}


Run = Callable[..., Any]
Replier = Callable[[Machine, Any, Any], Message]


@dataclass(frozen=True, eq=False)
class Operation:
    """One RPC of HypervisorService (see the module docstring)."""

    rpc: str
    auth: Auth
    run: Run
    args: tuple[str, ...] = ()
    reply: Replier | Into | None = None  # None: to_message(response type, result)
    counted: str | None = None
    batch_op: int | None = None
    batch_value: Callable[[Any], int] | None = None
    awaited: bool = False  # `run` is a coroutine function that takes the lock itself
    # False: the call holds no --max-concurrent-rpcs slot (SaveState: its callers share
    # saves and wait at no cost, service/coalesce.py)
    admitted: bool = True
    with_client: bool = False  # `run` takes the calling client last (auth.client_of)

    @functools.cached_property
    def response_type(self) -> type[Message]:
        name: str = SERVICE.methods_by_name[self.rpc].output_type.name
        response_type: type[Message] = getattr(pb2, name)
        return response_type

    @functools.cached_property
    def read_args(self) -> Callable[[Any], tuple[Any, ...]]:
        """request -> the arguments of `run` after the machine."""
        if not self.args:
            return lambda request: ()
        if len(self.args) == 1:
            (name,) = self.args
            return lambda request: (getattr(request, name),)
        getter: Callable[[Any], tuple[Any, ...]] = operator.attrgetter(*self.args)
        return getter  # several names: attrgetter answers a tuple

    @functools.cached_property
    def replier(self) -> Replier:
        """(machine, request, result) -> the response message, resolved once."""
        response_type = self.response_type
        reply = self.reply
        if reply is None:
            return lambda machine, request, result: to_message(response_type, result)
        if isinstance(reply, Into):
            name = reply.field
            convert = _converter(response_type.DESCRIPTOR.fields_by_name[name])
            if convert is _identity:
                return lambda machine, request, result: response_type(**{name: result})
            return lambda machine, request, result: response_type(**{name: convert(result)})
        return reply


# -- results -> messages, generically by field name ------------------------------------------------


def to_message(message_type: type[Message], result: Any) -> Message:
    """`result` as a `message_type`: a message of that type as is; None as the empty
    message; otherwise each attribute of `result` named as a field of the message, converted
    by the field's type (enums by member name, nested dataclasses recursively; None leaves the
    field unset)."""
    if result is None:
        return message_type()
    if isinstance(result, message_type):
        return result
    key = (type(result), message_type)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(type(result), message_type)
    return message_type(**{name: convert(getattr(result, name)) for name, convert in plan
                           if getattr(result, name) is not None})


_Plan = tuple[tuple[str, Callable[[Any], Any]], ...]
_PLANS: dict[tuple[type, type[Message]], _Plan] = {}


def _plan(result_type: type, message_type: type[Message]) -> _Plan:
    """Per message field the result has: how to convert its value (worked out once)."""
    names = set(dir(result_type))  # properties and fields with defaults
    if is_dataclass(result_type):
        names.update(f.name for f in fields(result_type))
    return tuple((field.name, _converter(field)) for field in message_type.DESCRIPTOR.fields
                 if field.name in names)


def _identity(value: Any) -> Any:
    return value


def _converter(field: Any) -> Callable[[Any], Any]:
    """How to convert a value for the message field `field` (a FieldDescriptor)."""
    repeated = field.is_repeated
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        sub = getattr(pb2, field.message_type.name)
        one: Callable[[Any], Any] = functools.partial(to_message, sub)
    elif field.enum_type is not None:
        one = _enum_converter(field.enum_type.full_name)
    else:
        return list if repeated else _identity
    return (lambda values: [one(v) for v in values]) if repeated else one


@functools.cache
def _enum_converter(enum_name: str) -> Callable[[Any], int]:
    """A core enum member -> the proto enum value whose name ends with its member name
    (PageState.SHARED_OWNED -> PAGE_STATE_SHARED_OWNED); ints pass through."""
    descriptor = pb2.DESCRIPTOR.enum_types_by_name[enum_name.rsplit(".", 1)[-1]]
    by_suffix = {value.name: value.number for value in descriptor.values}

    def convert(member: Any) -> int:
        if isinstance(member, enum.Enum):
            for name, number in by_suffix.items():
                if name.endswith("_" + member.name):
                    return number
            raise ValueError(f"{member!r} has no value in {enum_name}")
        return int(member)

    cache: dict[Any, int] = {}

    def cached(member: Any) -> int:
        number = cache.get(member)
        if number is None:
            number = cache[member] = convert(member)
        return number

    return cached


@dataclass(frozen=True)
class Into:
    """Reply with the result as the response's field `field` (a scalar or a dataclass)."""

    field: str


# Request message name -> the response type of its RPC.
_RESPONSE_OF: dict[str, type[Message]] = {
    method.input_type.name: getattr(pb2, method.output_type.name) for method in SERVICE.methods
}


def _response_of(request: Message) -> type[Message]:
    return _RESPONSE_OF[request.DESCRIPTOR.name]


# -- arguments -----------------------------------------------------------------------------------

# PoolKind of the protocol (and of a batch's arg1): UNSPECIFIED means the hyp pool.
_POOL_KIND: dict[int, PoolKind] = {
    pb2.POOL_KIND_UNSPECIFIED: PoolKind.HYP, pb2.POOL_KIND_HYP: PoolKind.HYP,
    pb2.POOL_KIND_VM: PoolKind.VM,
}


def pool_kind(pool: int) -> PoolKind:
    kind = _POOL_KIND.get(pool)
    if kind is None:
        raise InvalidArgument(f"unknown pool {pool}", reason="INVALID_POOL")
    return kind


def page_count(machine: Machine, nr_pages: int) -> int:
    """A request's page count (0 = 1) within the service's per-operation bound."""
    nr = nr_pages or 1
    check_pages(nr, machine.limits.max_pages_per_op)
    return nr


# -- the operations: core call + bounds + ledger -----------------------------------------------


@dataclass(frozen=True)
class CreatedVm:
    vm: VmInfo
    token: str
    lease_seconds: float


def create_vm(machine: Machine, nr_vcpus: int, slice_pages: int, name: str,
              lease_seconds: float, client: str | None = None) -> CreatedVm:
    """CreateVM for `client` (None: no client is known, nothing is counted)."""
    lease = machine.leases.validate(lease_seconds)
    check_name(name)
    limits = machine.limits
    if limits.quota_slice_pages and slice_pages > limits.quota_slice_pages:
        raise quota_exceeded(f"slice_pages {slice_pages} exceeds the quota of "
                             f"{limits.quota_slice_pages} pages per VM")
    if limits.max_vms and len(machine.tokens) >= limits.max_vms:
        raise quota_exceeded(f"the server holds its maximum of {limits.max_vms} VMs")
    if client is not None:
        machine.clients.check_create(client, lease)
    stage1 = machine.hv.hyp_stage1
    tables_before = stage1.nr_tables
    info = machine.hv.create_vm(nr_vcpus=nr_vcpus, slice_pages=slice_pages,
                                name=name or None)
    # The tables its creation made EL2 take (the host's shares of struct kvm and the
    # vCPUs, the donations at its first run; v6.16+ their pins) are the VM's.
    machine.ledger.charge_new_tables(info.handle, stage1, tables_before)
    token = machine.tokens.issue(info.handle, lease)
    if client is not None:
        machine.clients.created(info.handle, client, lease)
    log.info("VM %#x created: %d vCPUs, %d slice pages, lease %g s", info.handle,
             info.nr_vcpus, info.slice_nr_pages, lease)
    return CreatedVm(info, token, lease)


def destroy_vm(machine: Machine, handle: int) -> int:
    pages = machine.hv.destroy_vm(handle)
    machine.forget_vm(handle)
    log.info("VM %#x destroyed: %d pages returned", handle, pages)
    return pages


@dataclass(frozen=True)
class Renewal:
    expires_in_ms: int
    lease_seconds: float


def renew_vm(machine: Machine, handle: int) -> Renewal:
    # The token check before the call renewed the lease.
    return Renewal(round(machine.leases.expires_in(handle) * 1000),
                   machine.leases.lease_seconds(handle))


def alloc_pages(machine: Machine, handle: int, order: int, pool: int) -> int:
    kind = pool_kind(pool)
    if kind is PoolKind.HYP:
        machine.ledger.check(handle, order)
    pfn = machine.hv.alloc_pages(handle, order, kind)
    if kind is PoolKind.HYP:
        machine.ledger.allocated_one(handle, pfn, order)
    return pfn


def alloc_pages_run(machine: Machine, handle: int, order: int, pool: int,
                    count: int) -> tuple[list[int], BaseException | None]:
    """`count` alloc_pages of one order from one pool, as a batch's run of them: the head
    pfns of the blocks allocated, and the refusal that stopped the run (None: none). Within
    the hyp pool quota the run is cut where the single calls would start being refused."""
    kind = pool_kind(pool)
    ledger = machine.ledger
    if kind is PoolKind.HYP and 0 <= order <= 62:
        allowed = max(0, ledger.room(handle)) >> order
        if allowed < count:
            count = allowed
            if not count:
                try:
                    ledger.check(handle, order)
                except ServiceError as refusal:
                    return [], refusal
    pfns, error = machine.hv.alloc_pages_run(handle, order, kind, count)
    if kind is PoolKind.HYP:
        ledger.allocated(handle, pfns, order)
    return pfns, error


def put_page(machine: Machine, handle: int, pfn: int) -> int:
    refcount = machine.hv.put_page(handle, pfn)
    machine.ledger.put_one(handle, pfn, refcount)
    return refcount


def put_pages_run(machine: Machine, handle: int,
                  pfns: list[int]) -> tuple[list[int], BaseException | None]:
    """put_page on each of `pfns` in turn: the refcounts after, and the refusal that
    stopped the run (None: none)."""
    refcounts, error = machine.hv.put_pages_run(handle, pfns)
    machine.ledger.put(handle, pfns, refcounts)
    return refcounts, error


def get_page(machine: Machine, handle: int, pfn: int) -> int:
    return machine.hv.get_page(handle, pfn)


def host_share(machine: Machine, handle: int, pfn: int, nr_pages: int,
               page_by_page: bool = False) -> Any:
    """HostShare; where the kernel maps shares at EL2 (before v6.16) the stage-1 tables the
    share makes EL2 allocate are charged to the VM's hyp pool quota, planned first: a share
    over the quota is refused and changes nothing (page by page: the pages whose tables fit
    are shared, the first one that does not fit is the refused page)."""
    nr = page_count(machine, nr_pages)
    hv, ledger = machine.hv, machine.ledger
    if not ledger.tracking or not _share_maps_at_el2(hv):
        return hv.host_share(handle, pfn, nr, page_by_page=page_by_page)
    stage1 = hv.hyp_stage1
    keys = planned_tables(stage1, pfn, nr)
    if page_by_page and len(keys) > ledger.room(handle):
        return _share_within_quota(machine, handle, pfn, nr)
    ledger.check_tables(handle, keys, f"sharing {nr} page(s)")
    result = hv.host_share(handle, pfn, nr, page_by_page=page_by_page)
    ledger.charge_tables(handle, stage1, keys)
    return result


def planned_tables(stage1: HypStage1, pfn: int, nr_pages: int) -> list[Key]:
    """The tables mapping [pfn, pfn + nr_pages) would take (HypStage1.missing_tables), from
    one page per leaf-table span: the linear map moves a run of pages to a run of VAs, so
    every table span the range meets holds the range's first or last page or one of the
    pages `span` apart from the first, and all pages of a span share its tables."""
    step = stage1.span_pages[stage1.table_levels[-1]]
    return stage1.missing_tables([*range(pfn, pfn + nr_pages, step), pfn + nr_pages - 1])


def _share_maps_at_el2(hv: Hypervisor) -> bool:
    """Whether a host share maps the page in EL2's stage-1 (hyp_complete_share, before
    v6.16); from v6.16 the first pin of a shared page maps it (hyp_pin_shared_mem)."""
    build = hv.build
    return build is None or build.share_maps_at_el2


def _pages_within(stage1: HypStage1, pfns: range, room: int) -> tuple[int, list[Key]]:
    """How many pages from the start of `pfns` can be mapped with at most `room` new
    tables, and those tables."""
    planned: dict[Key, None] = {}
    for done, q in enumerate(pfns):
        more = [key for key in stage1.missing_tables((q,)) if key not in planned]
        if len(planned) + len(more) > room:
            return done, list(planned)
        planned.update(dict.fromkeys(more))
    return len(pfns), list(planned)


def _share_within_quota(machine: Machine, handle: int, pfn: int, nr: int) -> ShareResult:
    """A page-by-page share the quota cuts short: the pages whose tables fit are shared as
    the host's loop would share them; the first page over the quota is reported refused."""
    hv, ledger = machine.hv, machine.ledger
    fit, keys = _pages_within(hv.hyp_stage1, range(pfn, pfn + nr), max(0, ledger.room(handle)))
    if not fit:
        ledger.check_tables(handle, hv.hyp_stage1.missing_tables((pfn,)), "sharing the page")
    result = hv.host_share(handle, pfn, fit, page_by_page=True)
    ledger.charge_tables(handle, hv.hyp_stage1, keys)
    if result.failed_pfn is None:  # every page that fits was shared: the next one is refused
        return replace(result, nr_pages=nr, failed_pfn=pfn + fit,
                       failed_reason="QUOTA_EXCEEDED", failed_errno="ENOMEM")
    return replace(result, nr_pages=nr)


def host_unshare(machine: Machine, handle: int, pfn: int, nr_pages: int) -> Any:
    stage1 = machine.hv.hyp_stage1
    before = stage1.nr_tables
    result = machine.hv.host_unshare(handle, pfn, page_count(machine, nr_pages))
    machine.ledger.settle_tables(stage1, before)
    return result


def pin_shared(machine: Machine, handle: int, pfn: int, nr_pages: int) -> None:
    """PinShared; from v6.16 the first pin of a page maps it at EL2 (hyp_pin_shared_mem):
    those tables are charged to the VM's hyp pool quota, planned first."""
    nr = page_count(machine, nr_pages)
    hv, ledger = machine.hv, machine.ledger
    if not ledger.tracking or _share_maps_at_el2(hv):
        hv.pin_shared(handle, pfn, nr)
        return
    vmemmap = hv.vmemmap  # pages it does not cover: the core refuses the pin
    first_pins = [q for q in range(pfn, pfn + nr)
                  if vmemmap.covers(q) and not vmemmap.refcount(q)]
    keys = hv.hyp_stage1.missing_tables(first_pins)
    ledger.check_tables(handle, keys, f"pinning {nr} page(s)")
    hv.pin_shared(handle, pfn, nr)
    ledger.charge_tables(handle, hv.hyp_stage1, keys)


def unpin_shared(machine: Machine, handle: int, pfn: int, nr_pages: int) -> None:
    stage1 = machine.hv.hyp_stage1
    before = stage1.nr_tables
    machine.hv.unpin_shared(handle, pfn, page_count(machine, nr_pages))
    machine.ledger.settle_tables(stage1, before)


def map_mmio(machine: Machine, addr: int) -> FaultResult:
    result = machine.hv.map_mmio(addr)
    machine.counters.count_fault(result)
    return result


def host_fault(machine: Machine, addr: int) -> FaultResult:
    result = machine.hv.host_fault(addr)
    machine.counters.count_fault(result)
    return result


def fault_value(result: FaultResult) -> int:
    """A fault's batch value: the mapped range's start. A FATAL outcome (reported by the
    unary RPCs) is a refusal in a batch, so that one code per operation says whether it
    took effect."""
    if result.outcome is FaultOutcome.FATAL:
        raise WouldPanic(f"{result.errno_name}: {result.reason}", reason="WOULD_PANIC")
    return result.range_start


def topup_memcache(machine: Machine, handle: int, nr_pages: int) -> int:
    check_pages(nr_pages, machine.limits.max_pages_per_op)
    quota = machine.limits.quota_memcache_pages
    # A top-up fills the memcache up to nr_pages (__topup_hyp_memcache): what it would hold
    # afterwards is the larger of the two.
    if quota and nr_pages > quota:
        held = len(machine.hv.guest_vm(handle).memcache)  # NOT_FOUND for an unknown handle
        if max(held, nr_pages) > quota:
            raise quota_exceeded(f"VM {handle:#x} holds {held} host memcache pages; filling it"
                                 f" up to {nr_pages} would exceed its quota of {quota}")
    return machine.hv.topup_memcache(handle, nr_pages)


def guest_map(machine: Machine, handle: int, ipa: int, pfn: int) -> Any:
    """GuestMap; the tables EL2 takes to map the memcache pages it refills from the host's
    (pkvm_refill_memcache -> hyp_complete_donation) are charged to the VM."""
    stage1 = machine.hv.hyp_stage1
    tables_before = stage1.nr_tables
    result = machine.hv.guest_map(handle, ipa, pfn)
    machine.ledger.charge_new_tables(handle, stage1, tables_before)
    return result


async def get_stats(machine: Machine) -> Message:
    """A snapshot shared by the GetStats calls waiting for it (O(pools + VMs) each)."""
    if machine.shared_stats is None:
        raise ServiceError(grpc.StatusCode.INTERNAL, "INTERNAL", "no statistics source")
    return await machine.shared_stats()


def stats_response(machine: Machine, stats: Any) -> Message:
    response = to_message(pb2.GetStatsResponse, stats)
    response.instance_id = machine.instance_id  # type: ignore[attr-defined]
    return response


def _shared_reply(machine: Machine, request: Any, response: Message) -> Message:
    return response


def get_page_info(machine: Machine, pfn: int) -> Any:
    return machine.hv.page_info(pfn)


def reserve(machine: Machine) -> pb2.ReserveResponse:
    return machine.reservation


def get_memory_map(machine: Machine, pools: Sequence[str]) -> Message:
    from .memory_map import memory_map_message  # observe: a read-only view for pictures

    return memory_map_message(machine.hv, machine.config, machine.reservation, list(pools))


async def save_state(machine: Machine) -> SaveResult:
    if machine.save_state is None:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "NO_STATE_FILE",
                           "the server was started without --state-file")
    return await machine.save_state()


def _with_instance_id(machine: Machine, request: Any, result: Any) -> Message:
    response = to_message(_response_of(request), result)
    response.instance_id = machine.instance_id  # type: ignore[attr-defined]
    return response


def _alloc_reply(machine: Machine, request: Any, pfn: int) -> Message:
    return pb2.AllocPagesResponse(pfn=pfn, order=request.order)


_SHARE = ("pfn", "nr_pages")

OPERATIONS: tuple[Operation, ...] = (
    Operation("CreateVM", Auth.CLIENT, create_vm,
              ("nr_vcpus", "slice_pages", "name", "lease_seconds"), counted="create_vm",
              with_client=True),
    Operation("DestroyVM", Auth.VM, destroy_vm, ("handle",), Into("pages_returned"),
              counted="destroy_vm"),
    Operation("RenewVM", Auth.VM, renew_vm, ("handle",)),
    Operation("AllocPages", Auth.VM, alloc_pages, ("handle", "order", "pool"), _alloc_reply,
              counted="alloc_pages", batch_op=pb2.BATCH_OP_ALLOC_PAGES),
    Operation("PutPage", Auth.VM, put_page, ("handle", "pfn"), Into("refcount"),
              counted="put_page", batch_op=pb2.BATCH_OP_PUT_PAGE),
    Operation("GetPage", Auth.VM, get_page, ("handle", "pfn"), Into("refcount"),
              counted="get_page", batch_op=pb2.BATCH_OP_GET_PAGE),
    Operation("HostShare", Auth.VM, host_share, ("handle", *_SHARE, "page_by_page"),
              counted="host_share", batch_op=pb2.BATCH_OP_HOST_SHARE,
              batch_value=operator.attrgetter("pfn")),
    Operation("HostUnshare", Auth.VM, host_unshare, ("handle", *_SHARE),
              counted="host_unshare", batch_op=pb2.BATCH_OP_HOST_UNSHARE,
              batch_value=operator.attrgetter("pfn")),
    Operation("PinShared", Auth.VM, pin_shared, ("handle", *_SHARE), counted="pin_shared"),
    Operation("UnpinShared", Auth.VM, unpin_shared, ("handle", *_SHARE),
              counted="unpin_shared"),
    Operation("MapMMIO", Auth.CLIENT, map_mmio, ("addr",), Into("fault"), counted="map_mmio",
              batch_op=pb2.BATCH_OP_MAP_MMIO, batch_value=fault_value),
    Operation("HostFault", Auth.CLIENT, host_fault, ("addr",), Into("fault"),
              counted="host_fault", batch_op=pb2.BATCH_OP_HOST_FAULT, batch_value=fault_value),
    Operation("TopupMemcache", Auth.VM, topup_memcache, ("handle", "nr_pages"),
              Into("memcache_pages"), counted="topup_memcache",
              batch_op=pb2.BATCH_OP_TOPUP_MEMCACHE),
    Operation("GuestMap", Auth.VM, guest_map, ("handle", "ipa", "pfn"), counted="guest_map",
              batch_op=pb2.BATCH_OP_GUEST_MAP, batch_value=operator.attrgetter("level")),
    Operation("GetStats", Auth.NONE, get_stats, reply=_shared_reply, awaited=True),
    Operation("GetPageInfo", Auth.NONE, get_page_info, ("pfn",)),
    Operation("Reserve", Auth.NONE, reserve),
    Operation("GetMemoryMap", Auth.NONE, get_memory_map, ("pools",)),
    Operation("SaveState", Auth.CLIENT, save_state, reply=_with_instance_id, awaited=True,
              admitted=False),
)
BY_RPC: dict[str, Operation] = {operation.rpc: operation for operation in OPERATIONS}
BY_BATCH_OP: dict[int, Operation] = {
    operation.batch_op: operation for operation in OPERATIONS if operation.batch_op is not None
}
# pkvm_operations_total{op}: every counted operation, in the order above.
OPERATION_NAMES: tuple[str, ...] = tuple(
    operation.counted for operation in OPERATIONS if operation.counted is not None
)
