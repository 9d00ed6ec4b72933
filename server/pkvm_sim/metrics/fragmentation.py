"""Fragmentation figures of a buddy pool, from its free-block counts per order.

The unusable free space index is Linux's (mm/vmstat.c, `unusable_free_index`, after Gorman and
Whitcroft): for an order j, the share of free pages that sit in blocks smaller than 2^j pages
and so cannot serve an order-j allocation,

    Fu(j) = (free_pages - sum over i >= j of k_i * 2^i) / free_pages

with k_i the free blocks of order i. As in the kernel, a pool with no free page at all is
wholly unusable (1.0). 0 means every free page can serve an order-j request.
"""

from __future__ import annotations

from collections.abc import Sequence


def unusable_free_index(free_blocks_per_order: Sequence[int], order: int) -> float:
    free_pages = sum(count << i for i, count in enumerate(free_blocks_per_order))
    if free_pages == 0:
        return 1.0
    suitable = sum(count << i for i, count in enumerate(free_blocks_per_order) if i >= order)
    return (free_pages - suitable) / free_pages


def largest_free_order(free_blocks_per_order: Sequence[int]) -> int:
    """The highest order with a free block, -1 when the pool has none."""
    for order in range(len(free_blocks_per_order) - 1, -1, -1):
        if free_blocks_per_order[order]:
            return order
    return -1
