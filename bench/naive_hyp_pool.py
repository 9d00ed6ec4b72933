"""Baseline for bench_core.py: a straightforward port of v5.14 page_alloc.c.

One Python object per page (refcount, order, list node), kernel-style circular lists with
sentinel heads. This is "what a straightforward Python port achieves"; the real allocator
(pkvm_sim.core.hyp_pool) must be at least as fast while storing 4 bytes per page.
Bench-only code: never imported by the service.
"""

from __future__ import annotations

NO_ORDER = 0xFFFF


class Node:
    __slots__ = ("prev", "next", "pfn")

    def __init__(self, pfn: int) -> None:
        self.prev = self.next = self
        self.pfn = pfn


class Page:
    __slots__ = ("refcount", "order", "node")

    def __init__(self, pfn: int) -> None:
        self.refcount = 0
        self.order = 0
        self.node = Node(pfn)


class NaivePool:
    def __init__(self, base: int, nr_pages: int, max_order: int) -> None:
        self.base, self.end, self.max_order = base, base + nr_pages, max_order
        self.pages = [Page(base + i) for i in range(nr_pages)]
        self.free_area = [Node(-1) for _ in range(max_order)]
        for page in self.pages:
            page.refcount = 1
        for i in range(nr_pages):
            self.put(base + i)

    @staticmethod
    def _add_tail(node: Node, head: Node) -> None:
        last = head.prev
        last.next = node
        node.prev = last
        node.next = head
        head.prev = node

    @staticmethod
    def _del(node: Node) -> None:
        node.prev.next = node.next
        node.next.prev = node.prev
        node.prev = node.next = node

    def _attach(self, pfn: int) -> None:
        page = self.pages[pfn - self.base]
        order = page.order
        page.order = NO_ORDER
        while order + 1 < self.max_order:
            buddy_pfn = pfn ^ (1 << order)
            if not self.base <= buddy_pfn < self.end:
                break
            buddy = self.pages[buddy_pfn - self.base]
            if buddy.order != order or buddy.refcount:
                break
            self._del(buddy.node)
            buddy.order = NO_ORDER
            pfn = min(pfn, buddy_pfn)
            order += 1
        page = self.pages[pfn - self.base]
        page.order = order
        self._add_tail(page.node, self.free_area[order])

    def alloc(self, order: int) -> int | None:
        i = order
        while i < self.max_order and self.free_area[i].next is self.free_area[i]:
            i += 1
        if i >= self.max_order:
            return None
        node = self.free_area[i].next
        pfn = node.pfn
        page = self.pages[pfn - self.base]
        self._del(node)
        while page.order > order:
            page.order -= 1
            buddy = self.pages[(pfn ^ (1 << page.order)) - self.base]
            buddy.order = page.order
            self._add_tail(buddy.node, self.free_area[buddy.order])
        page.refcount = 1
        return pfn

    def put(self, pfn: int) -> int:
        page = self.pages[pfn - self.base]
        page.refcount -= 1
        if page.refcount == 0:
            self._attach(pfn)
        return page.refcount
