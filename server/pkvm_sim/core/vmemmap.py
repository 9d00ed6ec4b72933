"""The hyp vmemmap: one `struct hyp_page` per covered pfn (docs/reservation.md).

Entries are stored packed (`order << shift | refcount`, see layout.py) in one typed array per
covered segment, so the simulator spends `layout.stored_bytes` per page and nothing per page
beyond that. A fresh vmemmap reads as zeros (refcount 0, order 0), as the kernel's zeroed
early allocation does.

Coverage: with 'carveout' (v5.13/v5.14) only the carve-out's pfns have entries; with 'all'
(v6.2) every memblock pfn has one. Touching any other pfn's entry is the EL2 fault the
kernel would take, reported as `WouldPanic`.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import final

from .errors import WouldPanic
from .layout import HypPageLayout


@final
@dataclass
class VmemmapSegment:
    """Entries for the contiguous pfns [base_pfn, base_pfn + nr_pages)."""

    base_pfn: int
    nr_pages: int
    entries: array[int]  # order << layout.order_shift | refcount

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.nr_pages


def _zeroed_array(typecode: str, n: int) -> array[int]:
    # Repetition runs in C and allocates exactly once; 1 TiB of 4K pages takes well under 1 s.
    return array(typecode, [0]) * n


@final
class Vmemmap:
    """struct hyp_page for every covered pfn; the segments never overlap."""

    def __init__(self, layout: HypPageLayout, pfn_ranges: Iterable[tuple[int, int]]) -> None:
        self.layout = layout
        self.segments: list[VmemmapSegment] = []
        for base_pfn, nr_pages in sorted(_merge_ranges(pfn_ranges)):
            self.segments.append(
                VmemmapSegment(base_pfn, nr_pages, _zeroed_array(layout.entry_typecode, nr_pages))
            )
        self._bases = [seg.base_pfn for seg in self.segments]

    @property
    def covered_pages(self) -> int:
        return sum(seg.nr_pages for seg in self.segments)

    @property
    def modelled_bytes(self) -> int:
        """What these entries occupy at EL2 with this layout."""
        return self.covered_pages * self.layout.entry_bytes

    @property
    def stored_bytes(self) -> int:
        """What the simulator's arrays occupy."""
        return sum(seg.entries.itemsize * len(seg.entries) for seg in self.segments)

    def _index(self, pfn: int) -> int:
        """The index of the last segment starting at or below pfn (-1: none)."""
        if len(self._bases) == 1:  # one memblock: the common case, no search
            return 0 if pfn >= self._bases[0] else -1
        return bisect.bisect_right(self._bases, pfn) - 1

    def covers(self, pfn: int) -> bool:
        i = self._index(pfn)
        return i >= 0 and pfn < self.segments[i].end_pfn

    def segment_for(
        self, pfn: int, nr_pages: int = 1, *, must: bool = True
    ) -> VmemmapSegment | None:
        """The segment holding all of [pfn, pfn + nr_pages), or (must=False) None."""
        i = self._index(pfn)
        if i >= 0:
            seg = self.segments[i]
            if pfn + nr_pages <= seg.end_pfn:
                return seg
        if must:
            raise WouldPanic(
                f"pfn {pfn:#x} (+{nr_pages} pages) has no vmemmap entry: EL2 would fault",
                reason="VMEMMAP_NOT_COVERED",
            )
        return None

    def entry(self, pfn: int) -> int:
        """The packed struct hyp_page of pfn (WouldPanic if not covered)."""
        seg = self.segment_for(pfn)
        assert seg is not None
        return seg.entries[pfn - seg.base_pfn]

    def refcount(self, pfn: int) -> int:
        return self.entry(pfn) & self.layout.refcount_mask

    def order(self, pfn: int) -> int:
        """The order field; layout.no_order for pages that are not a block head."""
        return self.entry(pfn) >> self.layout.order_shift

    def set_entry(self, pfn: int, *, refcount: int | None = None, order: int | None = None) -> None:
        seg = self.segment_for(pfn)
        assert seg is not None
        old = seg.entries[pfn - seg.base_pfn]
        shift = self.layout.order_shift
        new_refcount = old & self.layout.refcount_mask if refcount is None else refcount
        new_order = old >> shift if order is None else order
        if not 0 <= new_refcount <= self.layout.refcount_max:
            raise ValueError(f"refcount {new_refcount} does not fit layout {self.layout.name}")
        seg.entries[pfn - seg.base_pfn] = new_order << shift | new_refcount


def _merge_ranges(pfn_ranges: Iterable[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    """Merge overlapping or touching (base, nr_pages) ranges; overlaps are backed once."""
    merged: list[list[int]] = []
    for base, nr in sorted((b, n) for b, n in pfn_ranges if n > 0):
        if merged and base <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], base + nr)
        else:
            merged.append([base, base + nr])
    return [(start, end - start) for start, end in merged]
