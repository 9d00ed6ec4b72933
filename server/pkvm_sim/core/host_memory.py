"""The host's own page allocator, as far as the hypervisor can see it.

The host hands pages to VMs' VMMs (slices) and donates pages to EL2 (VM metadata, guest PGDs,
memcache pages). We only need to know which host RAM is free and who holds what, compactly:
free RAM is a sorted list of pfn ranges, and every allocation is one record (base, pages,
owner tag). Nothing is stored per page, so 1 TiB costs a handful of ranges.

Allocation is first fit from the lowest address, optionally aligned; freeing merges the range
back with its free neighbours, so after every allocation is freed the free list is exactly
what it was (a property the round-trip tests rely on).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any, Final, final

from .errors import OutOfMemory
from .records import ValueRecord
from .state_values import IntsIn, put_list

# Host allocations that stay host-owned (every other owner tag is donated to hyp): VM slices,
# the host memcaches, and the host kernel's structs it shares with hyp (struct kvm and
# kvm_vcpu, the VMM task's FP/SIMD state).
HOST_OWNED_TAGS = ("slice:", "hostmc:", "slab:", "task:", "boot:")


@final
class HostAllocation(ValueRecord):
    """One host allocation: [base_pfn, base_pfn + nr_pages) held by `owner`; read-only.
    A ValueRecord (records.py), not a frozen dataclass: a restore builds one per allocation
    (over a thousand for 256 VMs)."""

    _FIELDS = ("base_pfn", "nr_pages", "owner")
    __slots__ = _FIELDS

    def __init__(self, base_pfn: int, nr_pages: int, owner: str) -> None:
        self.base_pfn: Final = base_pfn
        self.nr_pages: Final = nr_pages
        # e.g. 'slice:4096', 'meta:4096', 'pgd:4096', 'memcache:4096' (donated),
        # 'hostmc:4096' (in the host's memcache: allocated for the VM, still host-owned)
        self.owner: Final = owner

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.nr_pages



class HostMemory:
    """Free host RAM (pfn ranges) and the host allocations made on behalf of VMs."""

    def __init__(self, ram_ranges: list[tuple[int, int]]) -> None:
        """ram_ranges: (base_pfn, nr_pages) of host RAM available for allocation."""
        self._free: list[list[int]] = []  # sorted, disjoint, non-touching [start, end)
        for base, nr in sorted(ram_ranges):
            if nr <= 0:
                continue
            if self._free and self._free[-1][1] == base:  # adjacent memblocks (NUMA nodes)
                self._free[-1][1] = base + nr
            else:
                self._free.append([base, base + nr])
        self.allocations: dict[int, HostAllocation] = {}
        # base pfns of the allocations per owner-tag prefix ('slab:', 'meta:'...): an index
        # over `allocations` for alloc_grouped
        self._by_tag: dict[str, set[int]] = {}
        self.free_pages = sum(end - start for start, end in self._free)

    def free_ranges(self) -> list[tuple[int, int]]:
        return [(start, end - start) for start, end in self._free]

    def _find(self, nr_pages: int, align_pages: int) -> tuple[int, int] | None:
        for i, (start, end) in enumerate(self._free):
            base = -(-start // align_pages) * align_pages
            if base + nr_pages <= end:
                return i, base
        return None

    def alloc(self, nr_pages: int, owner: str, *, align_pages: int = 1) -> int:
        """First fit; raises OutOfMemory when no free range can hold the request."""
        if nr_pages < 1:
            raise ValueError("nr_pages must be >= 1")
        found = self._find(nr_pages, align_pages)
        if found is None:
            raise OutOfMemory(
                f"host RAM has no free run of {nr_pages} page(s)"
                + (f" aligned to {align_pages}" if align_pages > 1 else ""),
                reason="HOST_MEMORY_EXHAUSTED",
            )
        i, base = found
        start, end = self._free[i]
        pieces = [[s, e] for s, e in ((start, base), (base + nr_pages, end)) if e > s]
        self._free[i:i + 1] = pieces
        self._record(HostAllocation(base, nr_pages, owner))
        self.free_pages -= nr_pages
        return base

    def alloc_grouped(self, nr_pages: int, owner: str, *, group: tuple[str, ...],
                      block_pages: int, zone_start_pfn: int, align_pages: int = 1) -> int:
        """The host kernel's own allocations, grouped as the buddy allocator's pageblocks
        group them: first fit inside a pageblock (block_pages, aligned) that already holds an
        allocation whose owner starts with one of `group`, else at the start of the lowest
        wholly free pageblock at or above zone_start_pfn (ZONE_NORMAL first), else first fit
        anywhere. Deterministic from the allocations alone (nothing else is stored)."""
        if nr_pages < 1:
            raise ValueError("nr_pages must be >= 1")
        blocks = sorted({pfn // block_pages
                         for tag in group for base in self._by_tag.get(tag, ())
                         for pfn in (base, self.allocations[base].end_pfn - 1)})
        for block in blocks:
            base = self._fit_in(block * block_pages, (block + 1) * block_pages, nr_pages,
                                align_pages)
            if base is not None:
                return self._take(base, nr_pages, owner)
        fresh = self._free_block(block_pages, zone_start_pfn)
        if fresh is None:
            fresh = self._free_block(block_pages, 0)
        if fresh is not None and nr_pages <= block_pages:
            return self._take(fresh, nr_pages, owner)
        return self.alloc(nr_pages, owner, align_pages=align_pages)

    def _fit_in(self, lo: int, hi: int, nr_pages: int, align_pages: int) -> int | None:
        for start, end in self._free:
            start, end = max(start, lo), min(end, hi)
            base = -(-start // align_pages) * align_pages
            if base + nr_pages <= end:
                return base
        return None

    def _free_block(self, block_pages: int, from_pfn: int) -> int | None:
        """The lowest wholly free aligned block at or above from_pfn."""
        for start, end in self._free:
            base = -(-max(start, from_pfn) // block_pages) * block_pages
            if base + block_pages <= end:
                return base
        return None

    def _take(self, base: int, nr_pages: int, owner: str) -> int:
        i = bisect.bisect_right(self._free, [base, 1 << 64]) - 1
        start, end = self._free[i]
        assert start <= base and base + nr_pages <= end, "taking pages that are not free"
        pieces = [[s, e] for s, e in ((start, base), (base + nr_pages, end)) if e > s]
        self._free[i:i + 1] = pieces
        self._record(HostAllocation(base, nr_pages, owner))
        self.free_pages -= nr_pages
        return base

    def _record(self, alloc: HostAllocation) -> None:
        self.allocations[alloc.base_pfn] = alloc
        self._by_tag.setdefault(_tag(alloc.owner), set()).add(alloc.base_pfn)

    def _forget(self, alloc: HostAllocation) -> None:
        bases = self._by_tag[_tag(alloc.owner)]
        bases.discard(alloc.base_pfn)
        if not bases:
            del self._by_tag[_tag(alloc.owner)]

    def reindex(self) -> None:
        """Rebuild the tag index from `allocations` (after they are replaced wholesale)."""
        by_tag: dict[str, set[int]] = {}
        for base, alloc in self.allocations.items():
            tag = _tag(alloc.owner)
            bases = by_tag.get(tag)
            if bases is None:
                bases = by_tag[tag] = set()
            bases.add(base)
        self._by_tag = by_tag

    def free(self, base_pfn: int) -> HostAllocation:
        alloc = self.allocations.pop(base_pfn)
        self._forget(alloc)
        start, end = alloc.base_pfn, alloc.end_pfn
        i = bisect.bisect_left(self._free, [start, end])
        if i > 0 and self._free[i - 1][1] == start:
            i -= 1
            start = self._free[i][0]
            del self._free[i]
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free[i][1]
            del self._free[i]
        self._free.insert(i, [start, end])
        self.free_pages += alloc.nr_pages
        return alloc

    def retag(self, base_pfn: int, owner: str) -> None:
        """Give an allocation a new owner tag (a host memcache page EL2 took over)."""
        alloc = self.allocations[base_pfn]
        self._forget(alloc)
        self._record(HostAllocation(alloc.base_pfn, alloc.nr_pages, owner))

    def allocation_at(self, pfn: int) -> HostAllocation | None:
        """The allocation holding pfn, if any (O(log n) over the sorted bases)."""
        bases = sorted(self.allocations)
        i = bisect.bisect_right(bases, pfn) - 1
        if i >= 0:
            alloc = self.allocations[bases[i]]
            if pfn < alloc.end_pfn:
                return alloc
        return None

    def is_free(self, pfn: int) -> bool:
        i = bisect.bisect_right(self._free, [pfn, 1 << 64]) - 1
        return i >= 0 and self._free[i][0] <= pfn < self._free[i][1]

    def check_invariants(self) -> None:
        prev_end = -1
        for start, end in self._free:
            assert start < end and start > prev_end, "free ranges overlap or touch"
            prev_end = end
        spans = sorted((a.base_pfn, a.end_pfn) for a in self.allocations.values())
        spans += [(s, e) for s, e in self._free]
        spans.sort()
        for (_s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
            assert e1 <= s2, "an allocation overlaps another or free RAM"
        assert self.free_pages == sum(e - s for s, e in self._free)

    # -- state (core/state_file.py) ------------------------------------------------------------

    def state(self, out: list[int]) -> dict[str, list[str]]:
        """Everything mutable: the free ranges [start, end) in address order (their starts,
        then their ends) and the allocations in creation order (a dict keeps it: their
        bases, then their sizes) appended to `out`; the allocations' owners, in the same
        order, as JSON values."""
        put_list(out, [start for start, _end in self._free])
        put_list(out, [end for _start, end in self._free])
        put_list(out, list(self.allocations))  # keyed by base pfn
        put_list(out, [a.nr_pages for a in self.allocations.values()])
        return {"owners": [a.owner for a in self.allocations.values()]}

    def restore_packed(self, state: Mapping[str, Any], ints: IntsIn) -> None:
        """`restore` from a version-2 state (`state()`'s JSON and stream); ValueError for
        columns of different lengths."""
        starts, ends = ints.take_list(), ints.take_list()
        bases, sizes = ints.take_list(), ints.take_list()
        owners: list[str] = [str(owner) for owner in state["owners"]]
        self._free = [[start, end] for start, end in zip(starts, ends, strict=True)]
        self.allocations = {base: HostAllocation(base, nr_pages, owner) for base, nr_pages, owner
                            in zip(bases, sizes, owners, strict=True)}
        self._derive()

    def restore(self, state: Mapping[str, Sequence[Sequence[int | str]]]) -> None:
        """Replace the free ranges and allocations with a version-1 state's; the tag index
        and free_pages are derived. The caller audits the result."""
        self._free = [[int(start), int(end)] for start, end in state["free"]]
        self.allocations = {}
        for base, nr_pages, owner in state["allocations"]:
            self.allocations[int(base)] = HostAllocation(int(base), int(nr_pages), str(owner))
        self._derive()

    def _derive(self) -> None:
        self.reindex()
        self.free_pages = sum(end - start for start, end in self._free)


def _tag(owner: str) -> str:
    """'slab:' for 'slab:kvm_vcpu': the prefix alloc_grouped groups by."""
    return owner.partition(":")[0] + ":"
