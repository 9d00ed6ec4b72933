"""Page geometry and the `struct hyp_page` layouts (docs/service.md, Configuration).

A *layout* is what one vmemmap entry looks like at EL2. The simulator packs each entry as
one unsigned integer, `order << order_shift | refcount`, that fits the layout's item (the
state file stores these items), so "is this buddy free with order o" is a single compare
against `o << order_shift` (refcount 0), as cheap as it is in the kernel. In memory every
entry is one 64-bit item, whatever the layout (vmemmap.py: what compiled code indexes
natively):

    layout | modelled entry                      | packed item | refcount max | NO_ORDER
    -------+-------------------------------------+-------------+--------------+---------
    32     | u32 refcount, u32 order, ptr, list  | 'Q', 8 B    | 2**32 - 1    | 2**32-1
    8      | u16 refcount, u8 order, 4+4-bit     | 'I', 4 B    | 65535        | 255
           | host/hyp state, u32 guest shares    |             |              |
    4      | u16 refcount, u16 order             | 'I', 4 B    | 65535        | 65535
    2      | 13-bit refcount, 3-bit order        | 'H', 2 B    | 8191         | 7

Layout 8 is the struct of v6.16 to v7.3 (nvhe/memory.h; 8 bytes in the BTF of Debian's 6.18.15
and 7.3.4 images): the page states and the guest-share count live beside the refcount and
order in the kernel; the simulator keeps them in its own maps (hypervisor.py), so only the
refcount and the order are packed here, and the vmemmap's *size* (what the reservation counts)
is the 8 modelled bytes.

(The v5.13 pool pointer and list_head are not stored: the pool is known from context and the
free-list node lives with the free block, see hyp_pool.py.)
"""

from __future__ import annotations

from dataclasses import dataclass

from .profiles import Profile

__all__ = [
    "GIB",
    "KIB",
    "LAYOUTS",
    "LAYOUT_2",
    "LAYOUT_32",
    "LAYOUT_4",
    "LAYOUT_8",
    "MIB",
    "VMEMMAP_ITEM_BYTES",
    "PAGE_SIZES",
    "HypPageLayout",
    "PageGeometry",
    "Profile",  # re-exported: the registry (profiles.py) defines it
    "ceil_div",
    "effective_max_order",
]

KIB = 1 << 10
VMEMMAP_ITEM_BYTES = 8  # what the simulator spends per entry in an allocated chunk (an i64)
MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class HypPageLayout:
    """One `struct hyp_page` layout: its size and the limits of its fields."""

    name: str
    entry_bytes: int
    refcount_max: int
    no_order: int  # HYP_NO_ORDER: the order value of every page that is not a block head
    max_order_cap: int | None  # layout-imposed MAX_ORDER (3-bit order field), None = none
    entry_typecode: str  # array typecode of one packed entry (the state file's items)
    order_shift: int  # entry = order << order_shift | refcount

    @property
    def stored_bytes(self) -> int:
        """Bytes the simulator itself spends per vmemmap entry once its chunk is written."""
        return VMEMMAP_ITEM_BYTES

    @property
    def refcount_mask(self) -> int:
        return (1 << self.order_shift) - 1


LAYOUT_32 = HypPageLayout("32", 32, 2**32 - 1, 2**32 - 1, None, "Q", 32)
LAYOUT_8 = HypPageLayout("8", 8, 65535, 255, None, "I", 16)  # HYP_NO_ORDER (u8)~0
LAYOUT_4 = HypPageLayout("4", 4, 65535, 65535, None, "I", 16)
LAYOUT_2 = HypPageLayout("2", 2, 8191, 7, 7, "H", 13)

LAYOUTS: dict[str, HypPageLayout] = {
    lay.name: lay for lay in (LAYOUT_32, LAYOUT_8, LAYOUT_4, LAYOUT_2)
}


@dataclass(frozen=True)
class PageGeometry:
    """Everything that follows from PAGE_SIZE (the notation of docs/reservation.md)."""

    page_size: int

    def __post_init__(self) -> None:
        if self.page_size not in PAGE_SIZES.values():
            raise ValueError(f"page size must be 4K, 16K or 64K, not {self.page_size}")

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def ptrs_per_table(self) -> int:
        """E: 8-byte entries per table page (512 / 2048 / 8192)."""
        return self.page_size // 8

    @property
    def kernel_max_order(self) -> int:
        """The kernel's MAX_ORDER for this page size on arm64 (11 / 12 / 14)."""
        return {4 * KIB: 11, 16 * KIB: 12, 64 * KIB: 14}[self.page_size]

    @property
    def pmd_size(self) -> int:
        """Size mapped by one level-2 block (2 MiB / 32 MiB / 512 MiB)."""
        return self.page_size * self.ptrs_per_table

    @property
    def pages_per_gib(self) -> int:
        return GIB // self.page_size

    def level_shift(self, level: int) -> int:
        """Address shift of a level (4K: 39/30/21/12 for levels 0..3; level -1 gives 48)."""
        return (self.page_shift - 3) * (4 - level) + 3

    def granule(self, level: int) -> int:
        """Bytes mapped by one entry at `level`."""
        return 1 << self.level_shift(level)


PAGE_SIZES: dict[str, int] = {"4K": 4 * KIB, "16K": 16 * KIB, "64K": 64 * KIB}


def effective_max_order(geometry: PageGeometry, layout: HypPageLayout) -> int:
    """MAX_ORDER for the allocator: the kernel's, capped by a narrow order field."""
    if layout.max_order_cap is None:
        return geometry.kernel_max_order
    return min(geometry.kernel_max_order, layout.max_order_cap)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
