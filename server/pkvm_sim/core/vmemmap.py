"""The hyp vmemmap: one `struct hyp_page` per covered pfn (docs/reservation.md).

Entries are stored packed (`order << shift | refcount`, see layout.py), one typed buffer per
covered segment. A fresh vmemmap reads as zeros (refcount 0, order 0), as the kernel's zeroed
early allocation does.

Storage: each segment's buffer is an anonymous private mapping (`mmap`) viewed as a typed
`memoryview`. The OS hands out a zero page on the first touch of each page of it, so a
segment costs nothing at boot and host memory grows with the pages actually written: a
1 TiB machine (1 GiB of 4-byte entries) boots without zeroing 1 GiB. What the model reports
(`modelled_bytes`: what EL2 spends) is kept apart from what the simulator stores
(`stored_bytes`: every entry's item) and what of that is in host memory (`resident_bytes`).

Coverage: with 'carveout' (v5.13/v5.14) only the carve-out's pfns have entries; with 'all'
(v6.2) every memblock pfn has one. Touching any other pfn's entry is the EL2 fault the
kernel would take, reported as `WouldPanic`.
"""

from __future__ import annotations

import bisect
import mmap
import sys
from array import array
from collections.abc import Iterable, Sequence
from typing import final

from .errors import WouldPanic
from .layout import HypPageLayout
from .residency import resident_bytes


@final
class VmemmapSegment:
    """Entries for the contiguous pfns [base_pfn, base_pfn + nr_pages)."""

    # (A plain class: mypyc cannot build a dataclass with a memoryview field.)
    def __init__(self, base_pfn: int, nr_pages: int, items: memoryview,
                 backing: mmap.mmap) -> None:
        self.base_pfn = base_pfn
        self.nr_pages = nr_pages
        self.items = items  # order << layout.order_shift | refcount, format entry_typecode
        self.backing = backing  # the anonymous mapping behind `items`

    def __repr__(self) -> str:
        return f"VmemmapSegment(base_pfn={self.base_pfn:#x}, nr_pages={self.nr_pages})"

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.nr_pages

    def export_bytes(self) -> bytes:
        """The entries as little-endian items (the state file's vmemmap sections)."""
        return _little_endian(self.items)

    def import_bytes(self, blob: bytes) -> None:
        """Overwrite every entry from little-endian items (export_bytes' format)."""
        if len(blob) != self.items.nbytes:
            raise ValueError(f"vmemmap segment at pfn {self.base_pfn:#x} has {self.items.nbytes}"
                             f" bytes, not {len(blob)}")
        native = _little_endian(as_items(blob, self.items.format))  # LE <-> native
        self.items[:] = as_items(native, self.items.format)

    def range_bytes(self, start_pfn: int, end_pfn: int) -> bytes:
        """Native-order bytes of the entries of [start_pfn, end_pfn) (digests)."""
        return self.items[start_pfn - self.base_pfn:end_pfn - self.base_pfn].tobytes()


def _lazily_zeroed(typecode: str, nr_entries: int) -> tuple[memoryview, mmap.mmap]:
    """nr_entries zero items of `typecode`, backed by zero pages until written."""
    itemsize = array(typecode).itemsize
    backing = mmap.mmap(-1, nr_entries * itemsize)  # anonymous, private: reads as zeros
    return as_items(backing, typecode), backing


def as_items(buffer: bytes | bytearray | mmap.mmap | array[int], typecode: str) -> memoryview:
    """The bytes of `buffer` seen as items of an integer `typecode` ('H', 'I', 'Q')."""
    # typeshed types cast() per literal format; the layouts' typecodes are plain strs.
    return memoryview(buffer).cast("B").cast(typecode)  # type: ignore[call-overload,no-any-return]


def _little_endian(items: memoryview) -> bytes:
    """The items' bytes in little-endian order, whatever the host's."""
    if sys.byteorder == "little":
        return items.tobytes()
    swapped = array(items.format, items.tobytes())
    swapped.byteswap()
    return swapped.tobytes()


@final
class Vmemmap:
    """struct hyp_page for every covered pfn; the segments never overlap."""

    def __init__(self, layout: HypPageLayout, pfn_ranges: Iterable[tuple[int, int]]) -> None:
        self.layout = layout
        self.segments: list[VmemmapSegment] = []
        for base_pfn, nr_pages in sorted(_merge_ranges(pfn_ranges)):
            items, backing = _lazily_zeroed(layout.entry_typecode, nr_pages)
            self.segments.append(VmemmapSegment(base_pfn, nr_pages, items, backing))
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
        """What the simulator's buffers hold: every entry, written or not (the address space
        it reserved; a figure that depends on the machine only, so a restored machine reports
        what the saved one did). Host memory is at most this: see resident_bytes."""
        return sum(seg.items.nbytes for seg in self.segments)

    @property
    def resident_bytes(self) -> int:
        """The part of stored_bytes in host memory now (host pages touched so far: it depends
        on the history, not only on the state)."""
        return sum(resident_bytes(seg.backing) for seg in self.segments)

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
        return seg.items[pfn - seg.base_pfn]

    def refcount(self, pfn: int) -> int:
        return self.entry(pfn) & self.layout.refcount_mask

    def order(self, pfn: int) -> int:
        """The order field; layout.no_order for pages that are not a block head."""
        return self.entry(pfn) >> self.layout.order_shift

    def set_entry(self, pfn: int, *, refcount: int | None = None, order: int | None = None) -> None:
        seg = self.segment_for(pfn)
        assert seg is not None
        old = seg.items[pfn - seg.base_pfn]
        shift = self.layout.order_shift
        new_refcount = old & self.layout.refcount_mask if refcount is None else refcount
        new_order = old >> shift if order is None else order
        if not 0 <= new_refcount <= self.layout.refcount_max:
            raise ValueError(f"refcount {new_refcount} does not fit layout {self.layout.name}")
        seg.items[pfn - seg.base_pfn] = new_order << shift | new_refcount


def _merge_ranges(pfn_ranges: Iterable[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    """Merge overlapping or touching (base, nr_pages) ranges; overlaps are backed once."""
    merged: list[list[int]] = []
    for base, nr in sorted((b, n) for b, n in pfn_ranges if n > 0):
        if merged and base <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], base + nr)
        else:
            merged.append([base, base + nr])
    return [(start, end - start) for start, end in merged]
