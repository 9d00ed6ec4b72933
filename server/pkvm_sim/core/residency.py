"""How much of an anonymous mapping is resident: mincore(2) on Linux.

The vmemmap's buffers are anonymous mappings that cost host memory only for the pages
written so far (vmemmap.py); `resident_bytes` says how many that is, so the figures the
simulator reports about its own memory stay true. A page only ever read maps the shared zero
page and counts as resident too, and where mincore cannot be called (no libc, another OS) the
answer is the mapping's full size: the figure may err high, never low.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from typing import Any

_HOST_PAGE_BYTES = mmap.PAGESIZE
# mincore sets bit 0 of a page's status byte when the page is resident; the others are undefined.
_RESIDENT_BIT = bytes(i & 1 for i in range(256))


def _load_mincore() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    mincore.restype = ctypes.c_int
    return mincore


_MINCORE: Any = _load_mincore()


def resident_bytes(mapping: mmap.mmap) -> int:
    """Bytes of `mapping` backed by host memory now (whole host pages)."""
    size = len(mapping)
    if _MINCORE is None or size == 0:
        return size
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    nr_host_pages = -(-size // _HOST_PAGE_BYTES)
    status = ctypes.create_string_buffer(nr_host_pages)
    if _MINCORE(ctypes.c_void_p(address), ctypes.c_size_t(size), status) != 0:
        return size
    return status.raw.translate(_RESIDENT_BIT).count(1) * _HOST_PAGE_BYTES
