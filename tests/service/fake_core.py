"""TEMPORARY development aid: a tiny stand-in for the core Hypervisor (used only when
PKVM_FAKE_CORE=1) so the service can be exercised before the core lands."""

from __future__ import annotations

from typing import Any

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    OutOfMemory,
    PermissionDenied,
    WouldPanic,
)
from pkvm_sim.core.hyp_pool import PoolStatistics
from pkvm_sim.core.model import (
    FaultOutcome,
    FaultResult,
    GuestMapResult,
    HostStage2Statistics,
    HypervisorStatistics,
    PageInfo,
    PageState,
    PoolKind,
    ShareResult,
    VmemmapStatistics,
    VmInfo,
)

HYP_BASE, HYP_PAGES = 0x17EA06, 2048
SLICE_BASE = 0x90000


class FakeHypervisor:
    @classmethod
    def boot(cls, config: SimConfig) -> FakeHypervisor:
        return cls(config)

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._vms: dict[int, VmInfo] = {}
        self._next_slice = SLICE_BASE
        self._next_pfn = HYP_BASE
        self._blocks: dict[int, list[Any]] = {}  # pfn -> [handle, order, refcount]
        self._free: list[tuple[int, int]] = []
        self._shared: dict[int, int] = {}  # pfn -> pins
        self.failures = 0

    def create_vm(self, *, nr_vcpus: int, slice_pages: int, name: str | None = None) -> VmInfo:
        if nr_vcpus < 1 or slice_pages < 1:
            raise InvalidArgument("bad vm")
        handle = 0x1000 + next(i for i in range(64) if 0x1000 + i not in self._vms)
        info = VmInfo(handle, handle - 0x1000 + 1, name or f"vm{handle:#x}", nr_vcpus,
                      self._next_slice, slice_pages, 2)
        self._next_slice += slice_pages
        self._vms[handle] = info
        return info

    def destroy_vm(self, handle: int) -> int:
        info = self.vm(handle)
        held = [p for p, b in self._blocks.items() if b[0] == handle]
        for p in held:
            self._free.append((p, self._blocks.pop(p)[1]))
        del self._vms[handle]
        return info.slice_nr_pages + 2 + len(held)

    def vm(self, handle: int) -> VmInfo:
        if handle not in self._vms:
            raise NotFound(f"no vm {handle}")
        return self._vms[handle]

    def vms(self) -> list[VmInfo]:
        return list(self._vms.values())

    def alloc_pages(self, handle: int, order: int, pool: PoolKind = PoolKind.HYP) -> int:
        self.vm(handle)
        if not 0 <= order <= 10:
            raise InvalidArgument("bad order")
        for i, (pfn, o) in enumerate(self._free):
            if o == order:
                del self._free[i]
                break
        else:
            if self._next_pfn + (1 << order) > HYP_BASE + HYP_PAGES:
                self.failures += 1
                raise OutOfMemory("pool empty")
            pfn = self._next_pfn
            self._next_pfn += 1 << order
        self._blocks[pfn] = [handle, order, 1]
        return pfn

    def _block(self, handle: int, pfn: int) -> list[Any]:
        self.vm(handle)
        block = self._blocks.get(pfn)
        if block is None:
            raise WouldPanic("put of a free page")
        if block[0] != handle:
            raise PermissionDenied("not yours")
        return block

    def put_page(self, handle: int, pfn: int) -> int:
        block = self._block(handle, pfn)
        block[2] -= 1
        if block[2] == 0:
            del self._blocks[pfn]
            self._free.append((pfn, block[1]))
        return int(block[2])

    def get_page(self, handle: int, pfn: int) -> int:
        block = self._block(handle, pfn)
        block[2] += 1
        return int(block[2])

    def _slice(self, handle: int, pfn: int, nr: int) -> None:
        info = self.vm(handle)
        if not info.slice_base_pfn <= pfn and pfn + nr <= info.slice_base_pfn + info.slice_nr_pages:
            raise PermissionDenied("outside slice")

    def host_share(self, handle: int, pfn: int, nr_pages: int = 1) -> ShareResult:
        self._slice(handle, pfn, nr_pages)
        if any(p in self._shared for p in range(pfn, pfn + nr_pages)):
            raise PermissionDenied("already shared")
        for p in range(pfn, pfn + nr_pages):
            self._shared[p] = 0
        return ShareResult(pfn, nr_pages, PageState.SHARED_OWNED, PageState.SHARED_BORROWED)

    def host_unshare(self, handle: int, pfn: int, nr_pages: int = 1) -> ShareResult:
        self._slice(handle, pfn, nr_pages)
        pages = range(pfn, pfn + nr_pages)
        if any(p not in self._shared for p in pages):
            raise PermissionDenied("not shared")
        if any(self._shared[p] for p in pages):
            raise Busy("pinned")
        for p in pages:
            del self._shared[p]
        return ShareResult(pfn, nr_pages, PageState.OWNED, PageState.NOPAGE)

    def pin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        self._slice(handle, pfn, nr_pages)
        for p in range(pfn, pfn + nr_pages):
            if p not in self._shared:
                raise PermissionDenied("not shared")
        for p in range(pfn, pfn + nr_pages):
            self._shared[p] += 1

    def unpin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        for p in range(pfn, pfn + nr_pages):
            self._shared[p] -= 1

    def _is_memory(self, addr: int) -> bool:
        return any(b.base <= addr < b.end for b in self.config.memblocks)

    def host_fault(self, addr: int) -> FaultResult:
        if addr >= 1 << self.config.ia_bits:
            from pkvm_sim.core.errors import OutOfRange
            raise OutOfRange("beyond ipa")
        if self._is_memory(addr) and addr >= HYP_BASE << 12:
            return FaultResult(addr, True, FaultOutcome.FATAL, addr & ~0xFFF, (addr & ~0xFFF) + 4096,
                               3, False, 0, 0, "EPERM", "hyp memory")
        base = addr & ~((1 << 21) - 1)
        return FaultResult(addr, self._is_memory(addr), FaultOutcome.MAPPED, base, base + (1 << 21),
                           2, False, 0, 1)

    def map_mmio(self, addr: int) -> FaultResult:
        if self._is_memory(addr):
            raise InvalidArgument("memory")
        return self.host_fault(addr)

    def topup_memcache(self, handle: int, nr_pages: int) -> int:
        self.vm(handle)
        if nr_pages > 100000:
            raise OutOfMemory("host")
        return nr_pages

    def guest_map(self, handle: int, ipa: int, pfn: int) -> GuestMapResult:
        self._slice(handle, pfn, 1)
        if ipa % 4096:
            raise InvalidArgument("misaligned")
        return GuestMapResult(ipa, pfn, 3, 0)

    def statistics(self) -> HypervisorStatistics:
        used = sum(1 << b[1] for b in self._blocks.values())
        pool = PoolStatistics("hyp", HYP_BASE, HYP_PAGES, 0, 0, HYP_PAGES - used, used, 11,
                              tuple([0] * 11), self.failures)
        pool2 = PoolStatistics("host_s2", HYP_BASE + HYP_PAGES, 2585, 0, 0, 2580, 5, 11,
                               tuple([1] * 11), 0)
        return HypervisorStatistics(
            (pool, pool2), VmemmapStatistics("4", 4, "all", 1 << 20, 4 << 20, 4 << 20, 1 << 20),
            HostStage2Statistics(0, 0, 0, 0, 0, 0, 0, 5, 0), len(self._vms), len(self._shared),
            5164, HYP_BASE << 12, 22 << 20)

    def page_info(self, pfn: int) -> PageInfo:
        block = self._blocks.get(pfn)
        if block:
            return PageInfo(pfn, True, block[2], block[1], f"vm:{block[0]}", "hyp",
                            PageState.NOPAGE, PageState.OWNED)
        return PageInfo(pfn, True, 0, None, "host", None, PageState.OWNED, PageState.NOPAGE)
