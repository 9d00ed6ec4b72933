"""The hyp vmemmap: one `struct hyp_page` per covered pfn (docs/reservation.md).

Entries are packed (`order << shift | refcount`, see layout.py). A fresh vmemmap reads as
zeros (refcount 0, order 0), as the kernel's zeroed early allocation does.

Storage: each covered segment is a list of fixed-size *chunks* of CHUNK_ENTRIES entries, each
a `vec[i64]` (librt.vecs: an array of 64-bit integers that mypyc-compiled code indexes
natively, and that the interpreter indexes like an `array`). A chunk exists once one of its
entries is written (it is then allocated, zero-filled); until then it is the empty vec and
its entries read as zero. So a segment costs one list slot per chunk at boot, a 1 TiB machine
(2**28 entries) boots without zeroing anything, and host memory grows with the chunks
written. Chunks are aligned on absolute pfns (pfn's entry is item `pfn & CHUNK_MASK` of its
chunk), so a naturally aligned block and its buddies share one chunk: the buddy allocator
(hyp_pool.py) looks a block's chunk up once per call and indexes it directly; every chunk of
a pool's range exists from the pool's init on (it writes every entry of its range).

An item holds the entry's 64 bits as a signed integer: entries below 2**63 as they are, and
the wider entries of layout 32 (a tail's NO_ORDER << 32 is 0xffffffff00000000) as the signed
integer with the same bits (`stored_item`, `entry_value` convert). The bytes the state file
carries are the layout's own items ('Q', 'I' or 'H', little-endian): `export_bytes` and
`import_bytes` convert, and an entry that does not fit its layout's item is refused
(ValueError), never wrapped.

What the model reports (`modelled_bytes`: what EL2 spends) is kept apart from what the
simulator would store with every chunk allocated (`stored_bytes`) and what it holds now
(`resident_bytes`: the allocated chunks and the chunk lists).

Coverage: with 'carveout' (v5.13/v5.14) only the carve-out's pfns have entries; with 'all'
(v6.2) every memblock pfn has one. Touching any other pfn's entry is the EL2 fault the
kernel would take, reported as `WouldPanic`.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Final, final

from librt.vecs import vec
from mypy_extensions import i64

from .errors import WouldPanic
from .layout import VMEMMAP_ITEM_BYTES, HypPageLayout

# A chunk holds 2**14 entries (128 KiB allocated), so a naturally aligned block of up to
# 2**14 pages lies in one chunk: any block of the allocator (order 13 at most, 64K pages) and
# every buddy it meets while splitting or merging.
CHUNK_SHIFT: Final = 14
CHUNK_ENTRIES: Final = 1 << CHUNK_SHIFT
CHUNK_MASK: Final = CHUNK_ENTRIES - 1
ITEM_BYTES: Final = VMEMMAP_ITEM_BYTES  # one i64 per entry, whatever the layout
SLOT_BYTES: Final = 8  # one pointer per chunk in a segment's list
_U64_LIMIT: Final = 1 << 64
_I64_LIMIT: Final = 1 << 63
_LITTLE_ENDIAN_HOST: Final = sys.byteorder == "little"
# VmemmapSegment.fill writes a run of up to this many entries of one chunk item by item: a
# chunk rebuilt in C costs two 128 KiB copies, a few hundred items set from the interpreter.
FILL_IN_PLACE_ENTRIES: Final = 256


def stored_item(entry: int) -> int:
    """The i64 item holding a packed entry (0 <= entry < 2**64): the same 64 bits."""
    return entry - _U64_LIMIT if entry >= _I64_LIMIT else entry


def entry_value(item: int) -> int:
    """The packed entry an i64 item holds (stored_item's inverse)."""
    return item + _U64_LIMIT if item < 0 else item


def _absent_chunk() -> vec[i64]:
    """A chunk never written: no items, every entry reads as zero."""
    return vec[i64]()


def _chunk_of(items: array[int]) -> vec[i64]:
    """An allocated chunk with CHUNK_ENTRIES 'q' `items`, copied through the buffer protocol
    (a vec built from a list would convert item by item: about 100 times slower)."""
    return vec[i64](items)


def _chunk_items(chunk: vec[i64]) -> array[int]:
    """A chunk's items as a 'q' array (zeros for an absent chunk), copied in one go."""
    if not len(chunk):
        return _zero_items()
    return array("q", memoryview(chunk).cast("B").tobytes())


def _zero_items() -> array[int]:
    return array("q", bytes(CHUNK_ENTRIES * ITEM_BYTES))


# A chunk's worth of zero items, never written: the source of every chunk allocated from
# zeros (a vec copies it).
_ZERO_ITEMS: Final = _zero_items()
_ZERO_BYTES: Final = memoryview(bytes(CHUNK_ENTRIES * ITEM_BYTES))


def _zero_bytes(data: bytes, start: int, stop: int) -> bool:
    """Whether data[start:stop] (at most a chunk of items) is all zero bytes: compared with
    zeros in place (memcmp), some 20 times faster than counting the zero bytes."""
    return data.startswith(_ZERO_BYTES[:stop - start], start)


def _widened_items(little_endian: bytes | memoryview, typecode: str, start: int
                   ) -> array[int]:
    """A chunk's 'q' items from little-endian layout items of `typecode`, the first one at
    item `start`, zeros elsewhere. An entry's item has the same bits (stored_item: 'Q'
    entries become the signed item with those bits), so on a little-endian host each entry
    is the low layout item of its i64: one strided copy of whole layout items in C, with no
    Python integer per entry (a restore copies the whole vmemmap this way)."""
    if not _LITTLE_ENDIAN_HOST:
        entries = array("q" if typecode == "Q" else typecode, bytes(little_endian))
        entries.byteswap()
        items = _zero_items()
        items[start:start + len(entries)] = array("q", entries)
        return items
    raw = bytearray(CHUNK_ENTRIES * ITEM_BYTES)
    step = ITEM_BYTES // array(typecode).itemsize  # layout items per i64
    layout_items = _cast(memoryview(little_endian).cast("B"), typecode)
    slots = _cast(memoryview(raw), typecode)
    slots[start * step:(start + len(layout_items)) * step:step] = layout_items
    return array("q", raw)  # (a vec built from a memoryview would take it item by item)


@final
class VmemmapSegment:
    """Entries for the contiguous pfns [base_pfn, base_pfn + nr_pages)."""

    def __init__(self, base_pfn: int, nr_pages: int, typecode: str) -> None:
        self.base_pfn = base_pfn
        self.nr_pages = nr_pages
        self.typecode = typecode  # the layout's item ('Q', 'I', 'H'): the state file's bytes
        self.item_bytes = array(typecode).itemsize
        self._entry_limit = 1 << (8 * self.item_bytes)  # entries are below this
        # Chunks are aligned on absolute pfns: chunks[c] holds the entries of the pfns
        # [origin_pfn + c * CHUNK_ENTRIES, origin_pfn + (c + 1) * CHUNK_ENTRIES), pfn at item
        # pfn & CHUNK_MASK (items of pfns outside the segment are never read). The list object
        # is never replaced, so the pools that index it see every chunk allocated later.
        self.origin_pfn = base_pfn & ~CHUNK_MASK
        nr_chunks = -(-(base_pfn + nr_pages - self.origin_pfn) // CHUNK_ENTRIES)
        self.chunks: list[vec[i64]] = [_absent_chunk()] * nr_chunks

    def __repr__(self) -> str:
        return f"VmemmapSegment(base_pfn={self.base_pfn:#x}, nr_pages={self.nr_pages})"

    @property
    def end_pfn(self) -> int:
        return self.base_pfn + self.nr_pages

    def chunk_index(self, pfn: int) -> int:
        """The index in `chunks` of the chunk holding pfn's entry."""
        return (pfn - self.origin_pfn) >> CHUNK_SHIFT

    # -- entries of pfns of the segment -------------------------------------------------------

    def get(self, pfn: int) -> int:
        """The packed entry of pfn."""
        chunk = self.chunks[(pfn - self.origin_pfn) >> CHUNK_SHIFT]
        if not len(chunk):
            return 0
        return entry_value(chunk[pfn & CHUNK_MASK])

    def set(self, pfn: int, entry: int) -> None:
        """Write pfn's packed entry; ValueError (nothing written) if the layout's item cannot
        hold it."""
        self._check_entry(entry)
        self._allocated(self.chunk_index(pfn))[pfn & CHUNK_MASK] = stored_item(entry)

    def fill(self, start_pfn: int, stop_pfn: int, entry: int) -> None:
        """The entries of [start_pfn, stop_pfn) = entry, a chunk at a time.

        A short run is written item by item into the chunk (allocated if absent); a longer
        one builds the chunk anew in C (its items copied out, the run set, copied back),
        which costs two chunk copies whatever the run's length: a VM's pool (its PGD
        pages, one to sixteen) would pay them for a few entries."""
        self._check_entry(entry)
        item = stored_item(entry)
        pfn = start_pfn
        while pfn < stop_pfn:
            c = self.chunk_index(pfn)
            lo = pfn & CHUNK_MASK
            hi = min(CHUNK_ENTRIES, lo + stop_pfn - pfn)
            if hi - lo <= FILL_IN_PLACE_ENTRIES:
                chunk = self._allocated(c)
                for i in range(lo, hi):
                    chunk[i] = item
            elif hi - lo == CHUNK_ENTRIES:  # the whole chunk: nothing to keep
                self.chunks[c] = _chunk_of(array("q", [item]) * CHUNK_ENTRIES)
            else:
                items = _chunk_items(self.chunks[c])
                items[lo:hi] = array("q", [item]) * (hi - lo)
                self.chunks[c] = _chunk_of(items)
            pfn += hi - lo

    def all_zero(self, start_pfn: int, stop_pfn: int) -> bool:
        """True when the entry of every pfn of [start_pfn, stop_pfn) is zero."""
        pfn = start_pfn
        while pfn < stop_pfn:
            lo = pfn & CHUNK_MASK
            hi = min(CHUNK_ENTRIES, lo + stop_pfn - pfn)
            chunk = self.chunks[self.chunk_index(pfn)]
            if not len(chunk):  # an absent chunk is all zeros
                pass
            elif hi - lo <= FILL_IN_PLACE_ENTRIES:  # a short run: item by item, as fill
                for i in range(lo, hi):
                    if chunk[i]:
                        return False
            else:
                raw = memoryview(chunk).cast("B")[lo * ITEM_BYTES:hi * ITEM_BYTES]
                if raw.tobytes().count(0) != len(raw):
                    return False
            pfn += hi - lo
        return True

    def _check_entry(self, entry: int) -> None:
        if not 0 <= entry < self._entry_limit:
            raise ValueError(f"vmemmap entry {entry:#x} does not fit a '{self.typecode}' item")

    def _allocated(self, c: int) -> vec[i64]:
        """Chunk c, allocated (zero-filled) if it was absent."""
        chunk = self.chunks[c]
        if not len(chunk):
            chunk = _chunk_of(_ZERO_ITEMS)
            self.chunks[c] = chunk
        return chunk

    # -- bulk: state files, digests, memory figures ------------------------------------------

    @property
    def allocated_chunks(self) -> int:
        return sum(1 for chunk in self.chunks if len(chunk))

    def export_bytes(self) -> bytes:
        """The entries as little-endian layout items (the state file's vmemmap sections)."""
        native = self._native_bytes(self.base_pfn, self.end_pfn)
        if _LITTLE_ENDIAN_HOST:
            return native
        swapped = array(self.typecode, native)
        swapped.byteswap()
        return swapped.tobytes()

    def import_bytes(self, blob: bytes) -> None:
        """Overwrite every entry from little-endian layout items (export_bytes' format).

        Chunks stay allocated (a pool indexes its chunks without looking); a chunk that was
        absent stays absent if its entries are all zero."""
        view = memoryview(blob)
        self.import_spans(len(blob), lambda start, stop: (
            None if _zero_bytes(blob, start, stop) else view[start:stop]))

    def import_spans(self, raw_bytes: int,
                     span: Callable[[int, int], bytes | memoryview | None]) -> None:
        """import_bytes of `raw_bytes` bytes given by range: span(start, stop) is raw bytes
        [start, stop) (at most a chunk's items), or None when they are all zero."""
        width = self.item_bytes
        if raw_bytes != self.nr_pages * width:
            raise ValueError(f"vmemmap segment at pfn {self.base_pfn:#x} has"
                             f" {self.nr_pages * width} bytes, not {raw_bytes}")
        for c in range(len(self.chunks)):
            first_pfn = self.origin_pfn + c * CHUNK_ENTRIES
            lo = max(first_pfn, self.base_pfn) - self.base_pfn  # in entries
            hi = min(first_pfn + CHUNK_ENTRIES, self.end_pfn) - self.base_pfn
            items = span(lo * width, hi * width)
            if items is None:  # all zero
                if len(self.chunks[c]):
                    self.chunks[c] = _chunk_of(_ZERO_ITEMS)
                continue
            start = self.base_pfn + lo - first_pfn  # the first chunk's pfns below base_pfn
            self.chunks[c] = _chunk_of(_widened_items(items, self.typecode, start))

    def range_bytes(self, start_pfn: int, end_pfn: int) -> bytes:
        """Native-order bytes of the layout items of the entries of [start_pfn, end_pfn)
        (digests)."""
        return self._native_bytes(start_pfn, end_pfn)

    def _native_bytes(self, start_pfn: int, stop_pfn: int) -> bytes:
        """The entries of [start_pfn, stop_pfn) as native-order layout items."""
        pieces: list[bytes] = []
        pfn = start_pfn
        while pfn < stop_pfn:
            lo = pfn & CHUNK_MASK
            hi = min(CHUNK_ENTRIES, lo + stop_pfn - pfn)
            pieces.append(self._layout_items(self.chunks[self.chunk_index(pfn)], lo, hi))
            pfn += hi - lo
        return b"".join(pieces)

    def _layout_items(self, chunk: vec[i64], lo: int, hi: int) -> bytes:
        """Items [lo, hi) of one chunk as native-order layout items: the low item_bytes of
        each i64 (entries fit them), taken by a strided view, no Python loop."""
        if not len(chunk):
            return bytes((hi - lo) * self.item_bytes)
        step = ITEM_BYTES // self.item_bytes  # layout items per i64
        low = 0 if _LITTLE_ENDIAN_HOST else step - 1  # where the low item of an i64 sits
        view = _cast(memoryview(chunk).cast("B"), self.typecode)
        return view[lo * step + low:hi * step:step].tobytes()


def _cast(raw: memoryview, typecode: str) -> memoryview:
    """Bytes seen as items of an integer `typecode` ('H', 'I', 'Q')."""
    # typeshed types cast() per literal format; the layouts' typecodes are plain strs.
    return raw.cast(typecode)  # type: ignore[call-overload,no-any-return]


@final
class Vmemmap:
    """struct hyp_page for every covered pfn; the segments never overlap."""

    def __init__(self, layout: HypPageLayout, pfn_ranges: Iterable[tuple[int, int]]) -> None:
        self.layout = layout
        self.segments: list[VmemmapSegment] = [
            VmemmapSegment(base_pfn, nr_pages, layout.entry_typecode)
            for base_pfn, nr_pages in sorted(_merge_ranges(pfn_ranges))
        ]
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
        """What the simulator's chunks would hold with every one allocated: a figure that
        depends on the machine only, so a restored machine reports what the saved one did.
        Host memory is at most this (and the chunk lists): see resident_bytes."""
        return sum(len(seg.chunks) for seg in self.segments) * CHUNK_ENTRIES * ITEM_BYTES

    @property
    def resident_bytes(self) -> int:
        """What the vmemmap holds in host memory now: its allocated chunks (written once
        each, so resident) and the chunk lists. It depends on the history (a chunk stays
        allocated once written), not only on the state."""
        slots = sum(len(seg.chunks) for seg in self.segments)
        chunks = sum(seg.allocated_chunks for seg in self.segments)
        return chunks * CHUNK_ENTRIES * ITEM_BYTES + slots * SLOT_BYTES

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
        return seg.get(pfn)

    def refcount(self, pfn: int) -> int:
        return self.entry(pfn) & self.layout.refcount_mask

    def order(self, pfn: int) -> int:
        """The order field; layout.no_order for pages that are not a block head."""
        return self.entry(pfn) >> self.layout.order_shift

    def set_entry(self, pfn: int, *, refcount: int | None = None, order: int | None = None) -> None:
        seg = self.segment_for(pfn)
        assert seg is not None
        old = seg.get(pfn)
        shift = self.layout.order_shift
        new_refcount = old & self.layout.refcount_mask if refcount is None else refcount
        new_order = old >> shift if order is None else order
        if not 0 <= new_refcount <= self.layout.refcount_max:
            raise ValueError(f"refcount {new_refcount} does not fit layout {self.layout.name}")
        if not 0 <= new_order <= self.layout.no_order:
            raise ValueError(f"order {new_order} does not fit layout {self.layout.name}")
        seg.set(pfn, new_order << shift | new_refcount)


def _merge_ranges(pfn_ranges: Iterable[tuple[int, int]]) -> Sequence[tuple[int, int]]:
    """Merge overlapping or touching (base, nr_pages) ranges; overlaps are backed once."""
    merged: list[list[int]] = []
    for base, nr in sorted((b, n) for b, n in pfn_ranges if n > 0):
        if merged and base <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], base + nr)
        else:
            merged.append([base, base + nr])
    return [(start, end - start) for start, end in merged]
