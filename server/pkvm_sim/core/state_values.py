"""JSON values of a state file's "machine" section (docs/state-file.md), shared by the core
objects that write their own state (`state()`) and read it back (`restore()`).

Page contents and VM fields: scalars as themselves, a tuple as an array, {"l": [...]} a list,
{"s": [...]} a set (sorted), {"d": [[key, value], ...]} a dict. A table page (a dict
{index: pte tuple}) and a memcache link (a tuple of scalars) take fast paths that give the
very same JSON as the general rule (json writes a tuple as an array), so files stay
byte-identical while a save costs one list per table page, not one object per entry.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from typing import Any


def encode_value(value: Any) -> Any:
    """A page content or VM field as JSON values (the rule above)."""
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if isinstance(value, tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, list):
        return {"l": [encode_value(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"s": [encode_value(v) for v in sorted(value)]}
    if isinstance(value, dict):
        return {"d": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    raise TypeError(f"the state file cannot hold a {type(value).__name__}: {value!r:.80}")


def decode_value(value: Any) -> Any:
    """The inverse of encode_value: an array is a tuple again."""
    if isinstance(value, list):
        return tuple(decode_value(v) for v in value)
    if isinstance(value, dict):
        if "l" in value:
            return [decode_value(v) for v in value["l"]]
        if "s" in value:
            return {decode_value(v) for v in value["s"]}
        return {decode_value(k): decode_value(v) for k, v in value["d"]}
    return value


def _flat_scalars(values: tuple[Any, ...]) -> bool:
    return all(v is None or isinstance(v, bool | int | str | float) for v in values)


def encode_page(content: Any) -> Any:
    """A page's content: a table page's entries are (int index, pte tuple of ints) pairs
    kept as they are (the tuples become arrays in JSON); anything else by the general rule."""
    if isinstance(content, dict):
        entries = [[index, pte] for index, pte in content.items()]
        if all(type(index) is int and type(pte) is tuple and _flat_scalars(pte)
               for index, pte in entries):
            return {"d": entries}
    return encode_value(content)


def decode_page(value: Any) -> Any:
    """The inverse of encode_page: a table page's entries back as {index: pte tuple}."""
    if isinstance(value, dict) and "d" in value:
        entries = value["d"]
        if all(type(index) is int and type(pte) is list and _flat_scalars(tuple(pte))
               for index, pte in entries):
            return {index: tuple(pte) for index, pte in entries}
    return decode_value(value)


# -- packed integers (format version 2) ---------------------------------------------------------
#
# Version 2 keeps the large homogeneous data (table entries, free lists, VM page lists, owner
# records...) out of JSON: each core object appends unsigned integers to its own stream, and
# the file holds each stream as one "ints/<name>" section of little-endian u64 values. The
# reader takes them back in the order they were written. A list is written as its length,
# then its items.

# The streams of a version-2 file, in the order of their sections (docs/state-file.md).
STREAMS = ("physmem", "pools", "vms", "host_memory", "hyp_stage1", "records")


class IntsIn:
    """One stream of a version-2 file, read front to back. Taking past the end raises
    IndexError; `finish` raises ValueError when values are left over (a file whose
    streams do not match its JSON)."""

    def __init__(self, name: str, values: list[int]) -> None:
        self.name = name
        self._values = values
        self._pos = 0

    def take(self) -> int:
        value = self._values[self._pos]
        self._pos += 1
        return value

    def take_list(self) -> list[int]:
        """A list written by `put_list`: its length, then its items."""
        values = self._values
        n = values[self._pos]
        start = self._pos + 1
        end = start + n
        if end > len(values):
            raise IndexError(f"ints/{self.name}: a list of {n} runs past the end")
        self._pos = end
        return values[start:end]

    def take_pairs(self) -> list[tuple[int, int]]:
        """The (key, value) pairs of a dict written by `put_pairs`."""
        keys = self.take_list()
        values = self.take_list()
        if len(keys) != len(values):
            raise ValueError(f"ints/{self.name}: {len(keys)} keys, {len(values)} values")
        return list(zip(keys, values, strict=True))

    def take_page(self) -> tuple[int, dict[int, tuple[int, ...]] | None]:
        """(pfn, entries) of a page written by `put_table_page`; entries None for a page
        whose content is the next item of the machine's JSON "physmem" list."""
        values = self._values
        pos = self._pos
        pfn = values[pos]
        form = values[pos + 1]
        pos += 2
        if form == PAGE_JSON:
            self._pos = pos
            return pfn, None
        if form != PAGE_TABLE:
            raise ValueError(f"ints/{self.name}: page {pfn:#x} has an unknown form {form}")
        nr_entries = values[pos]
        pos += 1
        entries: dict[int, tuple[int, ...]] = {}
        # Items as objects (compiled: no unboxing and boxing again of each field), and the
        # two pte lengths the model has built directly: no list slice per entry.
        items: list[Any] = values
        pte: tuple[Any, ...]
        try:
            for _ in range(nr_entries):
                index = items[pos]
                length = values[pos + 1]
                if length == 4:  # (LEAF, out_pfn, prot, state)
                    pte = (items[pos + 2], items[pos + 3], items[pos + 4], items[pos + 5])
                elif length == 2:  # (TABLE, child_pfn), (ANNOTATED, owner_id)
                    pte = (items[pos + 2], items[pos + 3])
                else:
                    pte = tuple(values[pos + 2:pos + 2 + length])
                entries[index] = pte
                pos += 2 + length
        except IndexError:
            pos = len(values) + 1
        if pos > len(values):
            raise IndexError(f"ints/{self.name}: page {pfn:#x} runs past the end")
        self._pos = pos
        return pfn, entries

    def at_end(self) -> bool:
        return self._pos >= len(self._values)

    def finish(self) -> None:
        left = len(self._values) - self._pos
        if left:
            raise ValueError(f"ints/{self.name}: {left} values left over")


PAGE_TABLE = 0  # a table page: its entries follow in the stream
PAGE_JSON = 1  # any other content: the next item of the machine's JSON "physmem" list


def put_table_page(out: list[Any], pfn: int, content: object) -> bool:
    """Append a table page (a dict {index: pte tuple}) as pfn, PAGE_TABLE, the number of
    entries, then each entry as index, pte length, pte fields; False, with nothing
    appended, for any other content (the caller writes pfn, PAGE_JSON). The fields are
    checked to be unsigned integers when the stream is packed (TypeError)."""
    # `out` holds Any: compiled, an item goes in as the object it is (no unboxing and
    # boxing again of every pfn).
    if not isinstance(content, dict):
        return False
    start = len(out)
    out.append(pfn)
    out.append(PAGE_TABLE)
    out.append(len(content))
    for index, pte in content.items():
        if type(pte) is not tuple:
            del out[start:]
            return False
        out.append(index)
        out.append(len(pte))
        out.extend(pte)
    return True


def put_list(out: list[int], items: list[int]) -> None:
    """Append `items` to a stream as `IntsIn.take_list` reads them."""
    out.append(len(items))
    out.extend(items)


def put_pairs(out: list[int], pairs: dict[int, int]) -> None:
    """Append a dict of int -> int, in its order, as `IntsIn.take_pairs` reads it: the list
    of its keys, then the list of its values."""
    put_list(out, list(pairs))
    put_list(out, list(pairs.values()))


# The item types of a packed stream, by the byte width its largest value needs.
_WIDTH_TYPECODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def pack_ints(values: list[int]) -> bytes:
    """A stream as one byte, the item width w (1, 2, 4 or 8: the narrowest that holds its
    largest value), then its values as little-endian unsigned w-byte integers; OverflowError
    for a negative or huge value, TypeError for something that is not an integer."""
    top = max(values, default=0)
    width = next((w for w in (1, 2, 4) if top < 1 << 8 * w), 8)
    packed = array(_WIDTH_TYPECODES[width], values)
    if sys.byteorder == "big":
        packed.byteswap()
    return bytes([width]) + packed.tobytes()


def unpack_ints(data: bytes) -> list[int]:
    """The inverse of pack_ints; ValueError for an unknown width or a partial item."""
    if not data or data[0] not in _WIDTH_TYPECODES:
        raise ValueError("a packed stream must start with its item width: 1, 2, 4 or 8")
    packed = array(_WIDTH_TYPECODES[data[0]])
    if (len(data) - 1) % packed.itemsize:
        raise ValueError(f"{len(data) - 1} bytes of {packed.itemsize}-byte values")
    packed.frombytes(data[1:])
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


class SparseBytes:
    """Raw bytes held as their non-zero chunks (a version-2 vmemmap section, docs/state-file.md):
    `raw_bytes` long, chunk i is raw bytes [i * chunk_bytes, (i + 1) * chunk_bytes) (the last
    one may be shorter), the stored chunks are `indices` (increasing) and their bytes follow
    one another in `data` from `first`; every other byte is zero. Read by range (`span`), so
    a restore never builds the raw segment: writing 4 MiB (64 MiB for 64 GiB of RAM) of
    mostly zeros into fresh memory costs a page fault per 4 KiB page, the same in both core
    flavours. The caller checked that the chunks fit (state_file)."""

    def __init__(self, raw_bytes: int, chunk_bytes: int, indices: list[int], data: bytes,
                 first: int) -> None:
        self.raw_bytes = raw_bytes
        self.chunk_bytes = chunk_bytes
        self.indices = indices
        self._data = data
        self._first = first

    def __len__(self) -> int:
        return self.raw_bytes

    def span(self, start: int, stop: int) -> bytes | None:
        """Raw bytes [start, stop); None when no stored chunk meets them (all zero)."""
        chunk, indices = self.chunk_bytes, self.indices
        lo = bisect.bisect_left(indices, start // chunk)
        hi = bisect.bisect_left(indices, -(-stop // chunk))
        if lo == hi:
            return None
        parts: list[bytes] = []
        done = start
        for k in range(lo, hi):
            chunk_start = indices[k] * chunk
            at = self._first + k * chunk  # every stored chunk but the segment's last is whole
            begin, end = max(chunk_start, start), min(chunk_start + chunk, self.raw_bytes, stop)
            parts.append(bytes(begin - done))
            parts.append(self._data[at + begin - chunk_start:at + end - chunk_start])
            done = end
        parts.append(bytes(stop - done))
        return b"".join(parts)

    def dense(self) -> bytes:
        """All the raw bytes."""
        return self.span(0, self.raw_bytes) or bytes(self.raw_bytes)
