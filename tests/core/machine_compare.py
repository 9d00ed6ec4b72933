"""Deep comparison of two simulated machines, object by object, and a seeded workload.

`assert_same_machine(original, restored)` walks both object graphs in step, over every
attribute (`__dict__` and `__slots__`), container and array, and fails at the first
difference with its path (`hv.host_stage2.counters.faults_mmio`). It also checks that the
two graphs are shaped alike: where the original shares one object between two places (a
pool's vmemmap chunk list is its segment's; every table reads the one page-contents dict),
the restored machine must share one object there too. An attribute that a later change adds
to a core class, but the state file forgets, therefore fails the comparison.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Any

from librt.vecs import vec
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.vmemmap import CHUNK_ENTRIES

_SCALARS = (int, float, str, bytes, bool, type(None), Enum)


def compact_free_lists(hv: Hypervisor) -> None:
    """Drop the lazily removed ("ghost") free-list entries: a representation detail the file
    does not keep (each list's live order is unchanged)."""
    for pool in hv.pools():
        for order in range(pool.max_order):
            pool._compact(order)


def assert_same_machine(original: Hypervisor, restored: Hypervisor) -> None:
    compact_free_lists(original)
    compact_free_lists(restored)
    _Walker().walk(original, restored, "hv")


class _Walker:
    def __init__(self) -> None:
        self.pairs: dict[int, int] = {}
        self.reverse: dict[int, int] = {}
        self.keep: list[Any] = []

    def walk(self, a: Any, b: Any, path: str) -> None:
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(a, _SCALARS):
            assert a == b, f"{path}: {a!r} != {b!r}"
            return
        if isinstance(a, tuple):
            assert len(a) == len(b), f"{path}: tuple lengths {len(a)} != {len(b)}"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self.walk(x, y, f"{path}[{i}]")
            return
        if _is_compiled_bound_method(a):  # a mypyc class's bound method: compare its object
            assert a.__name__ == b.__name__, f"{path}: {a!r} is not {b!r}"
            self.walk(a.__self__, b.__self__, f"{path}.__self__")
            return
        if isinstance(a, BuiltinFunctionType | FunctionType | type):
            assert a is b, f"{path}: {a!r} is not {b!r}"
            return
        if isinstance(a, vec):  # a vmemmap chunk: compared by value, absent = all zeros
            assert _chunk_entries(a) == _chunk_entries(b), f"{path}: entries differ"
            return
        if not self._pair(a, b, path):
            return
        if isinstance(a, MethodType):
            assert a.__func__ is b.__func__, f"{path}: bound to different functions"
            self.walk(a.__self__, b.__self__, f"{path}.__self__")
        elif isinstance(a, array):
            assert a.typecode == b.typecode and a == b, f"{path}: arrays differ"
        elif isinstance(a, list | deque):
            assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                self.walk(x, y, f"{path}[{i}]")
        elif isinstance(a, set | frozenset):
            assert a == b, f"{path}: sets differ by {sorted(a ^ b)[:8]}"
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), \
                f"{path}: keys differ by {sorted(a.keys() ^ b.keys(), key=repr)[:8]}"
            for key in a:
                self.walk(a[key], b[key], f"{path}[{key!r}]")
        else:
            attrs_a, attrs_b = _attributes(a), _attributes(b)
            assert attrs_a.keys() == attrs_b.keys(), \
                f"{path}: attributes differ: {sorted(attrs_a.keys() ^ attrs_b.keys())}"
            for name in attrs_a:  # declaration order: paths read like the code
                self.walk(attrs_a[name], attrs_b[name], f"{path}.{name}")

    def _pair(self, a: Any, b: Any, path: str) -> bool:
        """Record that a corresponds to b; False if the pair was already walked."""
        seen = self.pairs.get(id(a))
        if seen is not None:
            assert seen == id(b), f"{path}: the original shares this object, the copy does not"
            return False
        assert id(b) not in self.reverse, f"{path}: the copy shares an object the original does not"
        self.pairs[id(a)] = id(b)
        self.reverse[id(b)] = id(a)
        self.keep += [a, b]  # ids stay valid while we walk
        return True


def _chunk_entries(chunk: Any) -> bytes:
    """A vmemmap chunk's items; an absent chunk (vmemmap.py: nothing written yet, so it is
    shared by every such slot and not paired) reads as zeros like an allocated zero one."""
    return memoryview(chunk).tobytes() if len(chunk) else bytes(8 * CHUNK_ENTRIES)


def _is_compiled_bound_method(obj: Any) -> bool:
    """A method of a class compiled by mypyc, bound to an instance: a builtin method."""
    owner = getattr(obj, "__self__", None)
    return (isinstance(obj, BuiltinFunctionType) and owner is not None
            and hasattr(type(owner), "__mypyc_attrs__"))


def _attributes(obj: Any) -> dict[str, Any]:
    attrs = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        # A class compiled by mypyc has neither __dict__ nor (always) __slots__: it lists its
        # attributes in __mypyc_attrs__ (docs/compiled-core.md).
        names = (*getattr(cls, "__slots__", ()), *getattr(cls, "__mypyc_attrs__", ()))
        for name in names:
            if not name.startswith("__") and hasattr(obj, name):
                attrs[name] = getattr(obj, name)
    # An object of ours with no attribute found would compare equal to anything.
    assert attrs or not type(obj).__module__.startswith("pkvm_sim"), \
        f"no attributes found on a {type(obj).__qualname__}"
    return attrs


# -- a seeded workload ---------------------------------------------------------------------


@dataclass
class Workload:
    """A client driving a machine with a seeded mix of every operation. The client's own
    memory (live handles, held blocks) survives a swap of the machine under it, as a client
    survives a server restart. `step` returns what the call answered (a result or the
    refusal's type and reason), so two runs can be compared answer by answer."""

    seed: int
    rng: random.Random = field(init=False)
    handles: list[int] = field(default_factory=list)
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (handle, head pfn)
    slices: dict[int, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def run(self, hv: Hypervisor, steps: int) -> list[Any]:
        return [self.step(hv) for _ in range(steps)]

    def step(self, hv: Hypervisor) -> Any:
        rng = self.rng
        op = rng.choice(_OPS if self.handles else ("create",))
        try:
            return (op, getattr(self, f"_{op}")(hv, rng))
        except PkvmError as error:
            return (op, type(error).__name__, error.reason)

    def _vm(self, rng: random.Random) -> tuple[int, int, int]:
        handle = rng.choice(self.handles)
        base, pages = self.slices[handle]
        return handle, base, pages

    def _create(self, hv: Hypervisor, rng: random.Random) -> Any:
        info = hv.create_vm(nr_vcpus=rng.randint(1, 3), slice_pages=rng.choice((16, 64, 600)))
        self.handles.append(info.handle)
        self.slices[info.handle] = (info.slice_base_pfn, info.slice_nr_pages)
        return info

    def _destroy(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle = rng.choice(self.handles)
        self.handles.remove(handle)
        self.blocks = [(h, p) for h, p in self.blocks if h != handle]
        return hv.destroy_vm(handle)

    def _alloc(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle = rng.choice(self.handles)
        pfn = hv.alloc_pages(handle, rng.choice((0, 0, 0, 1, 2, 3)), rng.choice(("hyp", "vm")))
        self.blocks.append((handle, pfn))
        return pfn

    def _put(self, hv: Hypervisor, rng: random.Random) -> Any:
        if not self.blocks:
            return None
        handle, pfn = self.blocks[rng.randrange(len(self.blocks))]
        count = hv.put_page(handle, pfn)
        if count == 0:
            self.blocks.remove((handle, pfn))
        return count

    def _get(self, hv: Hypervisor, rng: random.Random) -> Any:
        if not self.blocks:
            return None
        handle, pfn = self.blocks[rng.randrange(len(self.blocks))]
        return hv.get_page(handle, pfn)

    def _share(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle, base, pages = self._vm(rng)
        return hv.host_share(handle, base + rng.randrange(min(pages, 12)), rng.choice((1, 1, 2)))

    def _unshare(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle, base, pages = self._vm(rng)
        return hv.host_unshare(handle, base + rng.randrange(min(pages, 12)))

    def _pin(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle, base, pages = self._vm(rng)
        return hv.pin_shared(handle, base + rng.randrange(min(pages, 8)))

    def _unpin(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle, base, pages = self._vm(rng)
        return hv.unpin_shared(handle, base + rng.randrange(min(pages, 8)))

    def _topup(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle = rng.choice(self.handles)
        return hv.topup_memcache(handle, rng.randint(0, 4))

    def _guest_map(self, hv: Hypervisor, rng: random.Random) -> Any:
        handle, base, pages = self._vm(rng)
        ipa = rng.randrange(1 << 20) << 12
        return hv.guest_map(handle, ipa, base + rng.randrange(pages))

    def _host_fault(self, hv: Hypervisor, rng: random.Random) -> Any:
        block = rng.choice(hv.config.memblocks)
        return hv.host_fault(block.base + rng.randrange(block.size))

    def _mmio(self, hv: Hypervisor, rng: random.Random) -> Any:
        return hv.map_mmio(rng.randrange(0x4000_0000, 0x8000_0000) & ~0xFFF)

    def _recycle(self, hv: Hypervisor, rng: random.Random) -> Any:
        return hv.unmap_dev_all()


_OPS = (
    "create", "destroy", "alloc", "alloc", "alloc", "put", "put", "get", "share", "share",
    "unshare", "pin", "unpin", "topup", "topup", "guest_map", "guest_map", "guest_map",
    "host_fault", "host_fault", "mmio", "mmio", "mmio", "recycle",
)
