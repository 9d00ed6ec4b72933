"""The EL2 buddy allocator, `struct hyp_pool`, exactly as in Linux v5.14 (docs/allocator.md).

A pool owns the pfns [base_pfn, base_pfn + nr_pages). Its first `reserved_pages` are held
with refcount 1 and never handed out; the rest are cut into naturally aligned blocks of
2**order pages, order < max_order, kept on one FIFO free list per order.

Where things live, as in the kernel after the series:
- refcount and order of every page: its packed vmemmap entry (`struct hyp_page`, 4 bytes in
  v5.14), `order << S | refcount`. A free head of order o is exactly `o << S`, so "is the buddy
  free with order o" (v5.14's `buddy->order == order && !buddy->refcount`) is one compare.
- the free lists: one FIFO per order. The kernel threads a list node through the first 16
  bytes of each free block; here a block's place in its order's queue plays that node, and
  like the node it exists only while the block is free (nothing per page, nothing in the
  vmemmap). Removing a block from the middle of a list (when its buddy merges with it) is
  lazy: the queue keeps a *ghost* of it, counted in `_ghosts[order]`, which is skipped when it
  reaches the head. Ghosts always precede a later live copy of the same pfn, since appends go
  to the tail, so the live order of each list is exactly the kernel's (and a block that is
  the newest entry of its list is simply dropped, no ghost). Lists are compacted
  when ghosts outnumber live blocks, so every operation is amortised O(1).
  Each queue is a plain list and the index of its head (`_heads[order]`): taking the head
  moves the index; the consumed prefix is dropped when the queue empties or when it is
  longer than what is left. (Plain lists and ints are what mypyc compiles to direct C; a
  deque's methods stay Python calls: docs/compiled-core.md. For the same reason a count in
  a list is updated as `counts[o] = counts[o] + 1`: mypyc compiles `counts[o] += 1` into a
  generic in-place call.)

Page states (2.2), for every pfn q of the pool:

    FREE-HEAD   in free list o, order == o, refcount == 0, block aligned and in range
    FREE-TAIL   inside a free block:        order == NO_ORDER, refcount == 0
    ALLOC-HEAD  head of a held block:       order == o,        refcount >= 1
    ALLOC-TAIL  inside a held block:        order == NO_ORDER, refcount == 0
    RESERVED    q < base_pfn + reserved:    order == 0,        refcount == 1

Buddies are found by XOR on the absolute pfn, so alignment is physical, not pool-relative.
Splitting keeps the lower half and releases upper halves, largest first:

    alloc(order 0) from a free order-2 block at pfn 8:

      [ 8  9 10 11 ]  o2 head 8        take 8 off list 2
      [ 8  9][10 11]  10 -> tail of list 1
      [ 8][9][10 11]  9  -> tail of list 0, return 8 (refcount 1)

Freeing is the mirror image: the block goes back at the tail of its list after merging with
every free buddy of the same order (buddy = pfn ^ (1 << order)) while order + 1 < max_order.

Every refusal raises before the first write, so a failed call leaves the pool unchanged. The
one lock of the simulator is taken by the caller; the methods here assume it is held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final, final

from mypy_extensions import i64

from .errors import FailedPrecondition, InvalidArgument, OutOfMemory, WouldPanic
from .physmem import PhysicalMemory
from .records import ValueRecord
from .state_values import IntsIn, put_list
from .vmemmap import CHUNK_MASK, CHUNK_SHIFT, Vmemmap, stored_item

U32_MASK: Final = 0xFFFF_FFFF
# A queue's consumed prefix is dropped once it is this long and longer than the rest.
_TRIM_MIN: Final = 1024


def get_order(size_bytes: int, page_shift: int) -> int:
    """The kernel's get_order() on a 64-bit unsigned long (0 bytes gives 64 - PAGE_SHIFT)."""
    return ((size_bytes - 1) % (1 << 64) >> page_shift).bit_length()


def pool_max_order(
    nr_pages: int,
    *,
    page_shift: int,
    max_order_cap: int,
    formula: str = "v5.14",
    u32_arithmetic: bool = False,
) -> int:
    """max_order of a pool of nr_pages (docs/allocator.md), as the number of free lists: orders
    0 .. max_order - 1 exist, `max_order_cap` (the kernel's exclusive MAX_ORDER: 11 with 4K
    pages) bounds it.

    v5.14: min(MAX_ORDER, get_order(nr_pages << PAGE_SHIFT)); a power-of-two pool can never
    hold a block of its own size. v5.17: get_order((nr_pages + 1) << PAGE_SHIFT).
    v6.4 (MAX_ORDER became inclusive; MAX_PAGE_ORDER from v6.8): the kernel stores
    min(MAX_PAGE_ORDER, get_order(nr_pages << PAGE_SHIFT)) and keeps lists 0 .. that value,
    one more list than the v5.14 formula (never used unless nr_pages is a power of two).
    `u32_arithmetic` reproduces the kernel's C types: nr_pages is an unsigned int, so the
    shift wraps for pools of 4 GiB or more (only the trace replay asks for this).
    """
    pages = nr_pages + 1 if formula == "v5.17" else nr_pages
    size_bytes = pages << page_shift
    if u32_arithmetic:
        size_bytes &= U32_MASK
    lists = get_order(size_bytes, page_shift)
    if formula == "v6.4":
        lists += 1
    return min(max_order_cap, lists)


@final
class PoolStatistics(ValueRecord):
    """A consistent snapshot of one pool; the service, metrics and CLI all render this.
    Built by keyword; read-only. A ValueRecord (records.py), not a frozen dataclass: every
    audit builds one per pool (hundreds with VMs)."""

    _FIELDS = ("name", "base_pfn", "nr_pages", "admitted_pages", "reserved_pages",
               "free_pages", "allocated_pages", "max_order", "free_blocks_per_order",
               "alloc_failures")
    __slots__ = _FIELDS

    def __init__(self, *, name: str, base_pfn: int, nr_pages: int, admitted_pages: int,
                 reserved_pages: int, free_pages: int, allocated_pages: int, max_order: int,
                 free_blocks_per_order: tuple[int, ...], alloc_failures: int) -> None:
        self.name: Final = name
        self.base_pfn: Final = base_pfn
        self.nr_pages: Final = nr_pages  # the pool's range
        # pages outside the range given to the pool later (memcache)
        self.admitted_pages: Final = admitted_pages
        self.reserved_pages: Final = reserved_pages
        self.free_pages: Final = free_pages
        self.allocated_pages: Final = allocated_pages
        self.max_order: Final = max_order
        self.free_blocks_per_order: Final = free_blocks_per_order
        self.alloc_failures: Final = alloc_failures

    @property
    def total_pages(self) -> int:
        return self.nr_pages + self.admitted_pages



@final
class HypPool:
    """struct hyp_pool: a buddy allocator over a contiguous pfn range."""

    __slots__ = (
        "name", "base_pfn", "nr_pages", "reserved_pages", "max_order", "no_order",
        "refcount_max", "vmemmap", "physmem", "alloc_failures",
        "_end_pfn", "_range_end_pfn", "_first_unreserved", "_origin", "_segment", "_chunks",
        "_shift", "_tail", "_tail_entry",
        "_lists", "_heads", "_ghosts", "_nr_free", "_admitted", "_contents",
    )

    def __init__(
        self,
        vmemmap: Vmemmap,
        physmem: PhysicalMemory,
        base_pfn: int,
        nr_pages: int,
        reserved_pages: int = 0,
        *,
        page_shift: int = 12,
        max_order_cap: int = 11,
        max_order_formula: str = "v5.14",
        u32_arithmetic: bool = False,
        name: str = "pool",
    ) -> None:
        """hyp_pool_init(pool, base_pfn, nr_pages, reserved_pages) (docs/allocator.md)."""
        if nr_pages < 1 or not 0 <= reserved_pages <= nr_pages:
            raise InvalidArgument(
                f"pool {name}: need nr_pages >= 1 and 0 <= reserved_pages <= nr_pages",
                reason="BAD_POOL_GEOMETRY",
            )
        max_order = pool_max_order(
            nr_pages, page_shift=page_shift, max_order_cap=max_order_cap,
            formula=max_order_formula, u32_arithmetic=u32_arithmetic,
        )
        if max_order < 1:
            # The kernel would INIT no list and then insert into free_area[0]: corruption.
            raise InvalidArgument(
                f"pool {name}: {nr_pages} page(s) give max_order 0 with the {max_order_formula}"
                " formula; the kernel would corrupt its free lists (use the v5.17 formula)",
                reason="POOL_MAX_ORDER_ZERO",
            )
        if max_order - 1 > CHUNK_SHIFT:
            raise InvalidArgument(
                f"pool {name}: blocks of order {max_order - 1} are larger than a vmemmap chunk"
                f" (2**{CHUNK_SHIFT} pages; no kernel page size has them)",
                reason="BAD_POOL_GEOMETRY",
            )
        segment = vmemmap.segment_for(base_pfn, nr_pages)
        assert segment is not None
        layout = vmemmap.layout
        self.name = name
        self.base_pfn = base_pfn
        self.nr_pages = nr_pages
        self.reserved_pages = reserved_pages
        self.max_order = max_order
        self.no_order = layout.no_order
        self.refcount_max = layout.refcount_max
        self.vmemmap = vmemmap
        self.physmem = physmem
        self._end_pfn = base_pfn + nr_pages
        # range_end as the kernel computes it: equal to the end unless u32 wrap applies.
        range_bytes = nr_pages << page_shift
        if u32_arithmetic:
            range_bytes &= U32_MASK
        self._range_end_pfn = base_pfn + (range_bytes >> page_shift)
        self._first_unreserved = base_pfn + reserved_pages
        self._segment = segment
        # The segment's chunks (vmemmap.py), indexed directly on the hot path: the entry of
        # pfn is _chunks[(pfn - _origin) >> CHUNK_SHIFT][pfn & CHUNK_MASK], as an i64 item
        # (stored_item). A block and every buddy it meets lie in one chunk (max_order - 1 <=
        # CHUNK_SHIFT), looked up once per call. Every chunk of the pool's range is allocated
        # by the init below.
        self._origin = segment.origin_pfn
        self._chunks = segment.chunks
        self._shift = layout.order_shift
        self._tail_entry = layout.no_order << layout.order_shift  # order NO_ORDER, refcount 0
        self._tail = stored_item(self._tail_entry)  # the same, as an item
        self._lists: list[list[int]] = [[] for _ in range(max_order)]
        self._heads = [0] * max_order  # _lists[o][:_heads[o]] was taken already
        self._ghosts: list[dict[int, int]] = [{} for _ in range(max_order)]
        self._nr_free = [0] * max_order
        self._admitted: set[int] = set()
        self._contents = physmem._contents  # read-only peek: is any page written at all?
        self.alloc_failures = 0
        self._init_vmemmap_and_free_lists()

    # -- init ------------------------------------------------------------------------------

    def _init_vmemmap_and_free_lists(self) -> None:
        """The end state of the kernel's page-by-page init, computed block by block.

        The kernel sets every page refcounted (BUG unless its refcount was 0), then puts pages
        reserved..nr_pages-1 in increasing order. Each put merges with the lower buddies
        already freed, and a block is appended to its list when its last page is put and it
        can grow no further. So each list ends up holding the maximal naturally aligned
        blocks of the unreserved range (capped at max_order - 1), in increasing address
        order, which is what we build directly: O(number of blocks), not O(pages).
        """
        segment = self._segment
        if not segment.all_zero(self.base_pfn, self._end_pfn):
            raise WouldPanic(
                f"pool {self.name}: a page in [{self.base_pfn:#x}, {self._end_pfn:#x}) already"
                " has a refcount (overlapping pools?)",
                reason="POOL_PAGES_IN_USE",
            )
        first_free = self._first_unreserved
        segment.fill(self.base_pfn, first_free, 1)  # RESERVED: order 0, refcount 1
        segment.fill(first_free, self._end_pfn, self._tail_entry)  # every free page a tail...
        for pfn, order in self._canonical_blocks():
            segment.set(pfn, order << self._shift)  # ...except block heads
            self._lists[order].append(pfn)
            self._nr_free[order] = self._nr_free[order] + 1

    def _canonical_blocks(self) -> Iterator[tuple[int, int]]:
        """Maximal aligned blocks of the unreserved range, in address order."""
        pfn, end = self._first_unreserved, self._range_end_pfn
        top = self.max_order - 1
        while pfn < end:
            order = min(top, (pfn & -pfn).bit_length() - 1) if pfn else top
            while pfn + (1 << order) > end:
                order -= 1
            yield pfn, order
            pfn += 1 << order
        # Beyond a u32-wrapped range_end, buddies are never merged: every page is alone.
        for pfn in range(max(end, self._first_unreserved), self._end_pfn):
            yield pfn, 0

    # -- free lists (pool lock held) ------------------------------------------------------

    def _list_remove(self, pfn: int, order: int) -> None:
        """page_remove_from_list for a block anywhere in its list: it becomes a ghost, unless
        it is the newest entry (a buddy split off just before, the common case), which is
        simply dropped: a live block's entry is the last one holding its pfn."""
        queue = self._lists[order]
        if queue[-1] == pfn:
            queue.pop()
            self._nr_free[order] = self._nr_free[order] - 1
            if len(queue) == self._heads[order]:
                queue.clear()
                self._heads[order] = 0
            return
        ghosts = self._ghosts[order]
        ghosts[pfn] = ghosts.get(pfn, 0) + 1
        self._nr_free[order] = self._nr_free[order] - 1
        if self._queued(order) > 2 * self._nr_free[order] + 64:
            self._compact(order)

    def _compact(self, order: int) -> None:
        """Drop every ghost from list `order`, keeping the live blocks in order."""
        self._lists[order] = list(self._live_blocks(order))
        self._heads[order] = 0
        self._ghosts[order] = {}

    def _live_blocks(self, order: int) -> Iterator[int]:
        pending = dict(self._ghosts[order])
        queue = self._lists[order]
        for i in range(self._heads[order], len(queue)):
            pfn = queue[i]
            count = pending.get(pfn)
            if count:
                pending[pfn] = count - 1
            else:
                yield pfn

    def _queued(self, order: int) -> int:
        """Entries (live blocks and ghosts) still in queue `order`."""
        return len(self._lists[order]) - self._heads[order]

    def _take_head(self, order: int) -> int:
        """popleft() of queue `order`, ghost or not (the caller knows it is not empty)."""
        queue = self._lists[order]
        head = self._heads[order]
        pfn = queue[head]
        head += 1
        if head == len(queue):
            queue.clear()
            head = 0
        elif head >= _TRIM_MIN and 2 * head >= len(queue):
            del queue[:head]
            head = 0
        self._heads[order] = head
        return pfn

    def _pop_head(self, order: int) -> int:
        """Take the first live block off list `order` (the caller knows one exists)."""
        ghosts = self._ghosts[order]
        pfn = self._take_head(order)
        while ghosts and pfn in ghosts:
            count = ghosts.pop(pfn)
            if count > 1:
                ghosts[pfn] = count - 1
            pfn = self._take_head(order)
        self._nr_free[order] = self._nr_free[order] - 1
        return pfn

    def load_free_lists(self, lists: Sequence[Sequence[int]], admitted: Sequence[int]) -> None:
        """Replace the free lists (head first, no ghosts) and the admitted pages: a restore.

        The caller has checked them against the vmemmap it restored (state_file.py).
        """
        self._lists = [list(heads) for heads in lists]
        self._heads = [0] * len(lists)
        self._ghosts = [{} for _ in lists]
        self._nr_free = [len(heads) for heads in lists]
        self._admitted = set(admitted)

    def state(self, out: list[int]) -> dict[str, object]:
        """The pool for a state file: its geometry (checked on restore) and failure count as
        JSON values; each free list's live order head first (ghosts are not state), then the
        admitted pages (sorted), appended to `out` (state_values.put_list)."""
        for order in range(self.max_order):
            put_list(out, self.free_list(order))
        put_list(out, sorted(self._admitted))
        return {
            "base_pfn": self.base_pfn,
            "nr_pages": self.nr_pages,
            "reserved_pages": self.reserved_pages,
            "max_order": self.max_order,
            "alloc_failures": self.alloc_failures,
        }

    def take_state(self, state: Mapping[str, Any], ints: IntsIn) -> dict[str, Any]:
        """`state` (a version-2 pool: geometry) with the free lists and admitted pages that
        `state()` wrote to the stream: what `restore` reads, as version 1 held it."""
        return {**state, "free_lists": [ints.take_list() for _ in range(self.max_order)],
                "admitted": ints.take_list()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take a saved pool's free lists, admitted pages and failure count; ValueError, with
        nothing changed, if its geometry is not this pool's. The vmemmap is restored apart."""
        geometry = (self.base_pfn, self.nr_pages, self.reserved_pages, self.max_order)
        saved = (state["base_pfn"], state["nr_pages"], state["reserved_pages"],
                 state["max_order"])
        if geometry != saved:
            raise ValueError(f"pool {self.name} is {saved} in the file, {geometry} at boot")
        lists = state["free_lists"]
        if len(lists) != self.max_order:
            raise ValueError(f"pool {self.name}: {len(lists)} free lists for max_order"
                             f" {self.max_order}")
        self.load_free_lists(lists, state["admitted"])
        self.alloc_failures = int(state["alloc_failures"])

    # -- the allocator ----------------------------------------------------------------------

    def try_alloc_pages(self, order: int) -> int | None:
        """hyp_alloc_pages: the head pfn of a fresh block of 2**order pages, or None (NULL).

        The smallest non-empty list at or above `order` gives up its head; it is split down,
        keeping the lower half. The block's head gets refcount 1; its pages are all zero.
        """
        nr_free = self._nr_free
        max_order = self.max_order
        i = order
        while i < max_order and not nr_free[i]:
            i += 1
        if i >= max_order:
            self.alloc_failures += 1
            return None
        if self._ghosts[i] or self._admitted:
            pfn = self._pop_head(i)
            if pfn in self._admitted:
                return self._alloc_admitted(pfn)
        else:
            pfn = self._take_head(i)
            nr_free[i] = nr_free[i] - 1
        # Machine integers (i64) from here: the compiled core does the bit arithmetic in C.
        head: i64 = pfn
        level: i64 = i
        shift: i64 = self._shift
        chunk = self._chunks[(head - self._origin) >> CHUNK_SHIFT]  # the block's entries
        # Invariant: a live list entry is a free head (entry == i << shift); no check needed.
        if level > order:
            lists = self._lists
            while level > order:  # split: release the upper half at the tail of list i - 1
                level -= 1
                buddy = head ^ (1 << level)
                chunk[buddy & CHUNK_MASK] = level << shift
                lists[level].append(buddy)
                nr_free[level] = nr_free[level] + 1
        chunk[head & CHUNK_MASK] = order << shift | 1
        return pfn

    def alloc_pages(self, order: int) -> int:
        """Like try_alloc_pages, but an empty pool raises OutOfMemory (-ENOMEM)."""
        pfn = self.try_alloc_pages(order)
        if pfn is None:
            raise self.exhausted(order)
        return pfn

    def exhausted(self, order: int) -> OutOfMemory:
        """The -ENOMEM of a failed alloc of `order` (for callers of try_alloc_pages)."""
        return OutOfMemory(
            f"pool {self.name}: no free block of order {order}"
            + (f" (max_order is {self.max_order})" if order >= self.max_order else ""),
            reason="POOL_EXHAUSTED",
        )

    def put_page(self, pfn: int) -> int:
        """hyp_put_page: drop one reference; at 0 the block goes back to the free lists.

        Returns the refcount after the call. When the last reference goes, this is
        __hyp_attach_page: zero the block, merge with every free buddy of the same order
        (a buddy outside [base_pfn, range_end) is never looked at: it belongs to someone
        else), and append the result at the tail of its list. The freed head becomes a tail
        if it merged with a lower buddy.
        """
        if not self._first_unreserved <= pfn < self._end_pfn:
            return self._put_outside_range(pfn)
        # Machine integers (i64) from here: the compiled core does the bit arithmetic in C.
        head: i64 = pfn
        chunk = self._chunks[(head - self._origin) >> CHUNK_SHIFT]  # and every buddy's below
        entry: i64 = chunk[head & CHUNK_MASK]
        count: i64 = entry & self.refcount_max
        if count > 1:
            chunk[head & CHUNK_MASK] = entry - 1
            return count - 1
        if count == 0:
            raise WouldPanic(
                f"put of pfn {pfn:#x} with refcount 0 (a free page or the tail of a block):"
                " the refcount would wrap",
                reason="PUT_OF_FREE_PAGE",
            )
        shift: i64 = self._shift
        order: i64 = entry >> shift
        contents = self._contents
        if contents:  # memset(0) of the block: only written pages cost anything
            if order:
                self.physmem.zero_range(pfn, 1 << order)
            elif pfn in contents:
                del contents[pfn]
        lo: i64 = self.base_pfn
        hi: i64 = self._range_end_pfn
        top: i64 = self.max_order - 1
        tail: i64 = self._tail
        while order < top:
            buddy = head ^ (1 << order)
            if buddy < lo or buddy >= hi or chunk[buddy & CHUNK_MASK] != order << shift:
                break  # not in range, or not a free head of this order
            self._list_remove(buddy, order)
            chunk[buddy & CHUNK_MASK] = tail
            head &= ~(1 << order)
            order += 1
        if head != pfn:  # merged with a lower buddy: the freed head is a tail now
            chunk[pfn & CHUNK_MASK] = tail
        chunk[head & CHUNK_MASK] = order << shift
        self._lists[order].append(head)
        self._nr_free[order] = self._nr_free[order] + 1
        return 0

    def get_page(self, pfn: int) -> int:
        """hyp_get_page: take one more reference on an allocated head. Returns the count."""
        if not self._first_unreserved <= pfn < self._end_pfn:
            return self._get_outside_range(pfn)
        chunk = self._chunks[(pfn - self._origin) >> CHUNK_SHIFT]
        entry = chunk[pfn & CHUNK_MASK]
        count = entry & self.refcount_max
        if count == 0:
            raise WouldPanic(
                f"get of pfn {pfn:#x} with refcount 0 (free page or tail page)",
                reason="GET_OF_FREE_PAGE",
            )
        if count == self.refcount_max:
            raise WouldPanic(
                f"refcount of pfn {pfn:#x} is at its limit {self.refcount_max}",
                reason="REFCOUNT_OVERFLOW",
            )
        chunk[pfn & CHUNK_MASK] = entry + 1  # the refcount bits do not carry: count < max
        return count + 1

    def split_page(self, pfn: int) -> None:
        """hyp_split_page (v5.15): turn a held block into 2**order held order-0 pages."""
        self._require_held_head(pfn)
        segment = self._segment
        entry = segment.get(pfn)
        tails = range(pfn + 1, pfn + (1 << (entry >> self._shift)))
        if any(segment.get(t) != self._tail_entry for t in tails):
            raise WouldPanic(f"a tail of block {pfn:#x} has a refcount", reason="TAIL_REFCOUNTED")
        segment.set(pfn, entry & self.refcount_max)  # order 0, refcount kept
        for t in tails:
            segment.set(t, 1)

    # -- pages outside the range: memcache pages admitted into VM pools (v6.2) ---------------

    def admit_page(self, pfn: int) -> None:
        """Take ownership of a page outside the range as a held order-0 page (refcount 1).

        Such pages are never coalesced (docs/allocator.md, v6.2 "non-coalescable pages"): when
        their refcount drops to 0 they join free list 0 on their own.
        """
        if self.base_pfn <= pfn < self._end_pfn or pfn in self._admitted:
            raise InvalidArgument(f"pfn {pfn:#x} already belongs to pool {self.name}",
                                  reason="PAGE_ALREADY_IN_POOL")
        if self.vmemmap.refcount(pfn):
            raise WouldPanic(f"pfn {pfn:#x} already has a refcount", reason="PAGE_IN_USE")
        self.vmemmap.set_entry(pfn, refcount=1, order=0)
        self._admitted.add(pfn)

    def release_admitted(self, pfn: int) -> None:
        """Give a free admitted page back (teardown): it leaves the pool entirely."""
        if pfn not in self._admitted or self.vmemmap.refcount(pfn):
            raise FailedPrecondition(f"pfn {pfn:#x} is not a free admitted page of {self.name}",
                                     reason="NOT_FREE_ADMITTED_PAGE")
        self._list_remove(pfn, 0)
        self._admitted.discard(pfn)
        self.vmemmap.set_entry(pfn, refcount=0, order=0)

    def _alloc_admitted(self, pfn: int) -> int:
        self.vmemmap.set_entry(pfn, refcount=1, order=0)
        return pfn

    def _put_outside_range(self, pfn: int) -> int:
        if pfn not in self._admitted:
            raise self._not_ours(pfn)
        count = self.vmemmap.refcount(pfn)
        if count == 0:
            raise WouldPanic(f"put of free page {pfn:#x}", reason="PUT_OF_FREE_PAGE")
        self.vmemmap.set_entry(pfn, refcount=count - 1)
        if count == 1:
            self.physmem.zero_range(pfn, 1)
            self._lists[0].append(pfn)
            self._nr_free[0] = self._nr_free[0] + 1
        return count - 1

    def _get_outside_range(self, pfn: int) -> int:
        if pfn not in self._admitted:
            raise self._not_ours(pfn)
        count = self.vmemmap.refcount(pfn)
        if count == 0:
            raise WouldPanic(f"get of free page {pfn:#x}", reason="GET_OF_FREE_PAGE")
        if count >= self.refcount_max:
            raise WouldPanic(f"refcount of pfn {pfn:#x} at its limit", reason="REFCOUNT_OVERFLOW")
        self.vmemmap.set_entry(pfn, refcount=count + 1)
        return count + 1

    def _not_ours(self, pfn: int) -> Exception:
        if self.base_pfn <= pfn < self._first_unreserved:
            return FailedPrecondition(
                f"pfn {pfn:#x} is one of pool {self.name}'s reserved pages",
                reason="RESERVED_PAGE",
            )
        return WouldPanic(
            f"pfn {pfn:#x} is outside pool {self.name} [{self.base_pfn:#x}, {self._end_pfn:#x})",
            reason="PAGE_OUTSIDE_POOL",
        )

    def _require_held_head(self, pfn: int) -> None:
        if not self._first_unreserved <= pfn < self._end_pfn:
            raise self._not_ours(pfn)
        entry = self._segment.get(pfn)
        if not entry & self.refcount_max or entry >> self._shift == self.no_order:
            raise WouldPanic(f"pfn {pfn:#x} is not the head of a held block",
                             reason="NOT_A_HELD_HEAD")

    # -- introspection -----------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages in free blocks, derived from the per-order counts: O(max_order)."""
        return sum(count << order for order, count in enumerate(self._nr_free))

    def contains(self, pfn: int) -> bool:
        return self.base_pfn <= pfn < self._end_pfn or pfn in self._admitted

    @property
    def end_pfn(self) -> int:
        return self._end_pfn

    def refcount(self, pfn: int) -> int:
        return self.vmemmap.refcount(pfn)

    def page_order(self, pfn: int) -> int:
        """The vmemmap order field (no_order for tails and non-head free pages)."""
        return self.vmemmap.order(pfn)

    def is_free(self, pfn: int) -> bool:
        """True when pfn is the head of a block on a free list."""
        if not self.contains(pfn):
            return False
        entry = self.vmemmap.entry(pfn)
        return entry & self.refcount_max == 0 and entry >> self._shift < self.max_order \
            and (pfn in self._admitted or pfn >= self._first_unreserved)

    def free_list(self, order: int) -> list[int]:
        """Heads of free_area[order], head (next to be allocated) first."""
        return list(self._live_blocks(order))

    def free_lists(self) -> dict[int, list[int]]:
        return {order: self.free_list(order) for order in range(self.max_order)}

    def held_blocks(self) -> Iterator[tuple[int, int, int]]:
        """(head pfn, refcount, order) of every held block, reserved pages excluded. O(range)."""
        segment, shift, mask = self._segment, self._shift, self.refcount_max
        for pfn in range(self._first_unreserved, self._end_pfn):
            entry = segment.get(pfn)
            if entry & mask:
                yield pfn, entry & mask, entry >> shift
        for pfn in sorted(self._admitted):
            count = self.vmemmap.refcount(pfn)
            if count:
                yield pfn, count, self.vmemmap.order(pfn)

    def statistics(self) -> PoolStatistics:
        total = self.nr_pages + len(self._admitted)
        return PoolStatistics(
            name=self.name,
            base_pfn=self.base_pfn,
            nr_pages=self.nr_pages,
            admitted_pages=len(self._admitted),
            reserved_pages=self.reserved_pages,
            free_pages=(free := self.free_pages),
            allocated_pages=total - free - self.reserved_pages,
            max_order=self.max_order,
            free_blocks_per_order=tuple(self._nr_free),
            alloc_failures=self.alloc_failures,
        )

    def check_invariants(self) -> None:
        """Prove the pool's invariants (docs/allocator.md); raises AssertionError naming the
        first breach.

        O(pool size): for tests and audits, never on the hot path.
        """
        free_heads: dict[int, int] = {}
        for order in range(self.max_order):
            blocks = self.free_list(order)
            assert len(blocks) == self._nr_free[order], f"list {order} count drifted"
            assert len(blocks) + sum(self._ghosts[order].values()) == self._queued(order), \
                f"list {order}: a ghost has no entry"
            for pfn in blocks:
                assert pfn not in free_heads, f"{pfn:#x} is twice on the free lists"
                free_heads[pfn] = order
        for pfn in self._admitted:
            assert not self.base_pfn <= pfn < self._end_pfn
            if pfn in free_heads:
                assert free_heads[pfn] == 0 and self.vmemmap.entry(pfn) == 0, \
                    f"free admitted page {pfn:#x} is not a clean order-0 head"
            else:
                assert self.vmemmap.refcount(pfn) >= 1, f"admitted page {pfn:#x} leaked"
        self._check_range(free_heads)
        assert self.free_pages == sum(1 << o for o in free_heads.values()), "free_pages drifted"
        for pfn in self._written_pages():
            if self._in_free_block(pfn, free_heads):
                raise AssertionError(f"free page {pfn:#x} is not zero")

    def _written_pages(self) -> list[int]:
        """This pool's pages that hold something. physmem is shared by every pool (an audit
        checks hundreds): walk whichever is smaller, the pool's pages or the written ones."""
        lo, end, admitted = self.base_pfn, self._end_pfn, self._admitted
        contents = self.physmem._contents
        if end - lo + len(admitted) < len(contents):
            return [pfn for pfn in [*range(lo, end), *sorted(admitted)] if pfn in contents]
        return [pfn for pfn in contents if lo <= pfn < end or pfn in admitted]

    def _check_range(self, free_heads: dict[int, int]) -> None:
        segment, shift, mask = self._segment, self._shift, self.refcount_max
        for pfn in range(self.base_pfn, self._first_unreserved):
            assert segment.get(pfn) == 1, f"reserved page {pfn:#x} changed"
        pfn = self._first_unreserved
        while pfn < self._end_pfn:
            entry = segment.get(pfn)
            order = entry >> shift
            if pfn in free_heads:
                assert entry == free_heads[pfn] << shift, f"free head {pfn:#x} is wrong"
            else:
                assert entry & mask >= 1, f"{pfn:#x} has refcount 0 but is on no list: leaked"
                assert order < self.max_order, f"held head {pfn:#x} has order {order}"
            assert pfn % (1 << order) == 0, f"block {pfn:#x} of order {order} is misaligned"
            assert pfn + (1 << order) <= self._end_pfn, f"block {pfn:#x} overruns the pool"
            for tail in range(pfn + 1, pfn + (1 << order)):
                assert segment.get(tail) == self._tail_entry, \
                    f"tail {tail:#x} of block {pfn:#x} is not a clean tail"
            pfn += 1 << order

    def _in_free_block(self, pfn: int, free_heads: dict[int, int]) -> bool:
        if pfn in free_heads:
            return True
        if not self.base_pfn <= pfn < self._end_pfn:
            return False
        for order in range(1, self.max_order):
            head = pfn & ~((1 << order) - 1)
            if free_heads.get(head) == order:
                return True
        return False

