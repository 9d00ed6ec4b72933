"""Workloads: what each client VM asks for next, shared by `pkvm-sim load` and Locust.

A workload is a table of operation weights plus a few parameters. For each VM it keeps a
`VmState` (the blocks it holds, the pages it shared or pinned, what it topped up) and hands
out `Call`s: an SDK method name, its arguments, and what to do with the state once the
answer is known. The runners (asyncio here, Locust's sync users) only execute calls, so
both drive exactly the same mix.

Invariant: `VmState.held` is the VM's ledger of hyp-pool blocks (head pfn -> order). A
block leaves the ledger when its put is *sent* (two puts of one block never go out
together, even in one Execute batch) and joins it when an alloc succeeds; the leak check
compares the ledger with what DestroyVM gives back.
"""

from __future__ import annotations

import random
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .sdk import Refusal

OPERATIONS = ("alloc", "put", "getput", "share", "pin", "guest", "mmio")
RECYCLE = "@recycle"  # the runner's own method: destroy the VM, create a fresh one


@dataclass(frozen=True)
class Call:
    """One SDK call: `method(*args)` reported as `op`."""

    op: str
    method: str
    args: tuple[int, ...] = ()
    done: Callable[[Any], None] | None = None
    refused: Callable[[Refusal], None] | None = None
    batchable: bool = True  # Execute has a BatchOp for it
    # Pages DestroyVM gives back beyond the ledger if this call ran but its answer was lost
    # (a Locust user stopped mid-call): an alloc's or put's block, a top-up's pages.
    stake: int = 0


@dataclass
class VmState:
    """One client VM as the workload sees it."""

    slice_base_pfn: int
    slice_pages: int
    page_size: int
    held: dict[int, int] = field(default_factory=dict)  # hyp block head pfn -> order
    shared: set[int] = field(default_factory=set)
    pinned: set[int] = field(default_factory=set)
    topped_up: int = 0  # memcache pages allocated for this VM
    host_memcache: int = 0  # pages in its host memcache (top-ups add, guest-map refills take)
    calls: int = 0  # calls since the VM was created
    pending: deque[Call] = field(default_factory=deque)  # follow-ups, sent before anything new

    @property
    def held_pages(self) -> int:
        return sum(1 << order for order in self.held.values())


@dataclass(frozen=True)
class Workload:
    """Weights per operation (see OPERATIONS) and the knobs of the operations."""

    name: str
    weights: dict[str, float]
    orders: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 1, 1, 2, 3)
    lifecycle_calls: int = 0  # recycle the VM after this many calls (0: never)
    topup_pages: int = 8
    guest_stride: int = 1 << 21  # IPA distance between slice pages: new tables often
    max_held_pages: int = 512  # above this a VM puts before it allocates again
    mmio_base: int = 0x0900_0000
    mmio_span: int = 0x7000_0000

    def next_call(self, state: VmState, rnd: random.Random) -> Call:
        if state.pending:
            return state.pending.popleft()
        state.calls += 1
        if self.lifecycle_calls and state.calls > self.lifecycle_calls:
            return Call("recycle", RECYCLE, batchable=False)
        if state.held_pages > self.max_held_pages:
            return _put(state, rnd) or _alloc(self, state, rnd)
        ops, weights = zip(*self.weights.items(), strict=True)
        op = rnd.choices(ops, weights)[0]
        return _MAKERS[op](self, state, rnd)


def _alloc(w: Workload, state: VmState, rnd: random.Random) -> Call:
    order = rnd.choice(w.orders)

    def done(result: Any) -> None:
        state.held[int(result)] = order  # the pfn (unary and batch alike)
    return Call("alloc", "alloc_pages", (order,), done, stake=1 << order)


def _put(state: VmState, rnd: random.Random) -> Call | None:
    if not state.held:
        return None
    pfn = rnd.choice(list(state.held))
    order = state.held.pop(pfn)
    return Call("put", "put_page", (pfn,), stake=1 << order)


def _put_or_alloc(w: Workload, state: VmState, rnd: random.Random) -> Call:
    return _put(state, rnd) or _alloc(w, state, rnd)


def _getput(w: Workload, state: VmState, rnd: random.Random) -> Call:
    if not state.held:
        return _alloc(w, state, rnd)
    pfn = rnd.choice(list(state.held))
    # refcount 1 -> 2 -> 1: the block stays held; the put follows the get's answer.
    put = Call("put", "put_page", (pfn,))
    return Call("get", "get_page", (pfn,), lambda _r: state.pending.append(put))


def _slice_pfn(state: VmState, rnd: random.Random) -> int:
    return state.slice_base_pfn + rnd.randrange(state.slice_pages)


def _share(w: Workload, state: VmState, rnd: random.Random) -> Call:
    pfn = _slice_pfn(state, rnd)
    if pfn in state.pinned:
        state.pinned.discard(pfn)
        return Call("unpin", "unpin_shared", (pfn,), refused=lambda _r: state.pinned.add(pfn),
                    batchable=False)
    if pfn in state.shared:
        state.shared.discard(pfn)
        return Call("unshare", "host_unshare", (pfn,), refused=lambda _r: state.shared.add(pfn))
    return Call("share", "host_share", (pfn,), lambda _r: state.shared.add(pfn))


def _pin(w: Workload, state: VmState, rnd: random.Random) -> Call:
    candidates = state.shared - state.pinned
    if not candidates:
        return _share(w, state, rnd)
    pfn = rnd.choice(sorted(candidates))
    return Call("pin", "pin_shared", (pfn,), lambda _r: state.pinned.add(pfn), batchable=False)


def _guest(w: Workload, state: VmState, rnd: random.Random) -> Call:
    index = rnd.randrange(state.slice_pages)
    ipa, pfn = index * w.guest_stride, state.slice_base_pfn + index

    def topped_up(size: Any) -> None:
        # topup_hyp_memcache fills the host memcache up to N pages: it allocated the
        # difference from what the host memcache held (refills move pages out of it).
        state.topped_up += max(0, int(size) - state.host_memcache)
        state.host_memcache = int(size)

    def mapped(result: Any) -> None:
        state.host_memcache -= int(getattr(result, "refilled_pages", 0))

    topup = Call("topup", "topup_memcache", (w.topup_pages,), topped_up,
                 stake=w.topup_pages, batchable=False)

    def refused(refusal: Refusal) -> None:
        # the memcache ran dry (v6.14: a fatal WARN, refused here; v6.16+: -ENOMEM below
        # kvm_mmu_cache_min_pages): top it up
        if refusal.reason in ("MEMCACHE_EMPTY", "MEMCACHE_TOO_SHORT"):
            state.pending.append(topup)
    # Unary: the ledger needs each top-up's memcache size and each map's refilled pages.
    return Call("guest_map", "guest_map", (ipa, pfn), mapped, refused=refused,
                batchable=False)


def _mmio(w: Workload, state: VmState, rnd: random.Random) -> Call:
    pages = max(1, w.mmio_span // state.page_size)
    return Call("mmio", "map_mmio", (w.mmio_base + rnd.randrange(pages) * state.page_size,))


_MAKERS: dict[str, Callable[[Workload, VmState, random.Random], Call]] = {
    "alloc": _alloc, "put": _put_or_alloc, "getput": _getput, "share": _share, "pin": _pin,
    "guest": _guest, "mmio": _mmio,
}

BUILTIN: dict[str, Workload] = {
    "churn": Workload("churn", {"alloc": 50, "put": 40, "getput": 10}),
    "share": Workload("share", {"share": 75, "pin": 25}),
    "mmio": Workload("mmio", {"mmio": 100}),
    "guest": Workload("guest", {"guest": 100}),
    "vm-lifecycle": Workload("vm-lifecycle", {"alloc": 45, "share": 15, "guest": 40},
                             lifecycle_calls=32),
    "mixed": Workload("mixed", {"alloc": 30, "put": 25, "getput": 5, "share": 12, "pin": 3,
                                "guest": 12, "mmio": 13}, lifecycle_calls=500),
}

# Refusals a loaded server legitimately answers: they are results, not failures.
# RESOURCE_EXHAUSTED covers a pool or host RAM running dry and the service's quotas.
EXPECTED_EVERYWHERE = frozenset({
    "RESOURCE_EXHAUSTED",
    # an empty hyp pool where EL2 maps a shared or donated page: fatal in the kernel (a WARN
    # at EL2), a refusal that changes nothing here
    "FAILED_PRECONDITION/HYP_POOL_EXHAUSTED",
})
EXPECTED_FOR_OP = {
    "unshare": frozenset({"FAILED_PRECONDITION/BUSY"}),  # a page pinned by EL2
    "mmio": frozenset({"INVALID_ARGUMENT/NOT_MMIO"}),  # the MMIO span covers some RAM
    # v6.14 __pkvm_host_share_guest: a mapped IPA is not mapped again (-EPERM); a page shared
    # with hyp, or a memcache too short for the tables, WARNs at EL2 (fatal: refused here)
    "guest_map": frozenset({"PERMISSION_DENIED/IPA_MAPPED",
                            "FAILED_PRECONDITION/HOST_PAGE_SHARED_WITH_HYP",
                            "FAILED_PRECONDITION/MEMCACHE_EMPTY",
                            # v6.16+ (v6.18, v7.3): a page shared with hyp is a plain -EPERM
                            "PERMISSION_DENIED/HOST_PAGE_SHARED_WITH_HYP"}),
    "share": frozenset({"PERMISSION_DENIED/HOST_PAGE_NOT_OWNED"}),
}


def is_expected(op: str, refusal: Refusal) -> bool:
    return (refusal.code in EXPECTED_EVERYWHERE or refusal.key in EXPECTED_EVERYWHERE
            or refusal.key in EXPECTED_FOR_OP.get(op, ()))


class WorkloadError(ValueError):
    """A workload name or file that cannot be used (bad usage: exit 2)."""


_TOML_KEYS = {"weights", "orders", "lifecycle_calls", "topup_pages", "guest_stride",
              "max_held_pages"}


def load_workload(spec: str, mmio_base: int, mmio_span: int) -> Workload:
    """A built-in workload by name, or a custom one from a TOML file:

        weights = { alloc = 5, put = 4, mmio = 1 }   # any of OPERATIONS
        orders = [0, 0, 1, 3]                        # alloc orders, drawn uniformly
        lifecycle_calls = 0                          # optional knobs, as in Workload
    """
    if spec in BUILTIN:
        return replace(BUILTIN[spec], mmio_base=mmio_base, mmio_span=mmio_span)
    path = Path(spec)
    if not path.is_file():
        raise WorkloadError(f"unknown workload {spec!r}: one of {', '.join(BUILTIN)}"
                            " or a TOML file")
    try:
        table = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise WorkloadError(f"{path}: {error}") from None
    return workload_from_table(path.stem, table, mmio_base, mmio_span)


def workload_from_table(name: str, table: dict[str, Any], mmio_base: int,
                        mmio_span: int) -> Workload:
    unknown = set(table) - _TOML_KEYS
    if unknown:
        raise WorkloadError(f"{name}: unknown keys {sorted(unknown)}; allowed: "
                            f"{sorted(_TOML_KEYS)}")
    weights = table.get("weights")
    if not isinstance(weights, dict) or not weights:
        raise WorkloadError(f"{name}: needs a [weights] table, e.g. weights = {{alloc = 1}}")
    bad = set(weights) - set(OPERATIONS)
    if bad or not all(isinstance(v, int | float) and v >= 0 for v in weights.values()) \
            or not sum(weights.values()):
        raise WorkloadError(f"{name}: weights are non-negative numbers, not all zero, for"
                            f" {', '.join(OPERATIONS)} (got {weights})")
    knobs: dict[str, Any] = {}
    orders = table.get("orders", Workload.orders)
    if not orders or not all(isinstance(o, int) and 0 <= o <= 10 for o in orders):
        raise WorkloadError(f"{name}: orders is a list of integers 0..10, not {orders!r}")
    for key in ("lifecycle_calls", "topup_pages", "guest_stride", "max_held_pages"):
        if key in table:
            if not isinstance(table[key], int) or table[key] < 0:
                raise WorkloadError(f"{name}: {key} is a non-negative integer")
            knobs[key] = table[key]
    return Workload(name, {k: float(v) for k, v in weights.items()}, tuple(orders),
                    mmio_base=mmio_base, mmio_span=mmio_span, **knobs)
