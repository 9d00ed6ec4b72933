"""Simulated physical memory, stored sparsely.

Only pages that hold something cost host memory: a page-table page holds its entries, a
memcache page holds the address of the next one. Everything else reads as zeros. The free
lists' nodes, which the kernel keeps in the first 16 bytes of each free block since the
series (patch 3/7), are held by the owning `HypPool` in its own sparse node maps; they are
"in the free page" in the same sense: they exist only while the block is free.

Invariant: a page is in `_contents` only while something has written to it; `zero_range`
is the memset the allocator does when a block goes back to a free list (docs/allocator.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, final


@final
class PhysicalMemory:
    """Sparse page contents, keyed by pfn."""

    def __init__(self) -> None:
        self._contents: dict[int, Any] = {}

    def write(self, pfn: int, content: Any) -> None:
        """Record that `pfn` holds `content` (it is no longer a zero page)."""
        self._contents[pfn] = content

    def read(self, pfn: int) -> Any | None:
        """The content of `pfn`, or None for a zero page."""
        return self._contents.get(pfn)

    def is_zero(self, pfn: int) -> bool:
        return pfn not in self._contents

    def zero_range(self, pfn: int, nr_pages: int) -> None:
        """memset(0) of [pfn, pfn + nr_pages): cheap when few pages were ever written."""
        contents = self._contents
        if not contents:
            return
        if nr_pages <= len(contents):
            for q in range(pfn, pfn + nr_pages):
                contents.pop(q, None)
        else:
            end = pfn + nr_pages
            for q in [q for q in contents if pfn <= q < end]:
                del contents[q]

    def written_pfns(self) -> Iterator[int]:
        return iter(self._contents)

    def __len__(self) -> int:
        """Number of non-zero pages."""
        return len(self._contents)
