"""The host kernel's slab objects that it shares with hyp (v6.1, v6.12).

`kvm_share_hyp(from, to)` shares every page [from, to) touches (arch/arm64/kvm/mmu.c), so
what a VM shares depends on where its structs sit in their slabs:

- struct kvm is kzalloc'ed: kmalloc-4k (3952 B in 6.12, 4040 B in 6.1), one page-aligned
  4 KiB object, so one page.
- struct kvm_vcpu comes from the `kvm_vcpu` kmem_cache (kvm_init: cache aligned to the
  struct's alignment), objects packed back to back in order-3 slabs (SLUB caps the order at
  PAGE_ALLOC_COSTLY_ORDER, 3, and asks for more objects than fit). A vCPU covers 2 or 3
  pages (7056 B, 6.12) or 3 or 4 (9680 B, 6.1) depending on its slot; neighbours share a
  boundary page, which share_pfn_hyp counts, so it is shared once.

Slots are taken lowest first in the lowest slab with room; Debian's kernels randomise the
free list (CONFIG_SLAB_FREELIST_RANDOM), so a real vCPU can take another slot and share one
page more or less. Slab pages are host memory tagged `slab:<cache>`; a slab left empty goes
back to the host at once (SLUB may keep it: that changes no EL2 figure).
"""

from __future__ import annotations

from dataclasses import dataclass

SLAB_ORDER = 3  # PAGE_ALLOC_COSTLY_ORDER: SLUB's largest slab order for these caches
CACHELINE_BYTES = 64  # arm64 L1_CACHE_BYTES: struct kvm_vcpu's slab alignment
# Pageblock grouping of the host kernel's small allocations (HostMemory.alloc_grouped):
# slab pages and task structs come from the same unmovable pageblocks.
# The vCPU memcache top-ups (v6.14+: hostmc:, then memcache: once EL2 has them) are order-0
# GFP_KERNEL_ACCOUNT pages too.
SLAB_GROUP = ("slab:", "task:", "hostmc:", "memcache:")


@dataclass(frozen=True)
class SlabCache:
    name: str
    struct_bytes: int  # sizeof the struct: kvm_share_hyp(obj, obj + 1) covers this much
    slot_bytes: int  # the object's slot (the struct rounded to the cache's alignment)
    slab_pages: int = 1 << SLAB_ORDER

    def objects_per_slab(self, page_size: int) -> int:
        return self.slab_pages * page_size // self.slot_bytes


KMALLOC_4K = SlabCache("kmalloc-4k", 4096, 4096)  # struct kvm: < 4 KiB in 6.1 and 6.12


def kvm_struct_cache(kvm_bytes: int) -> SlabCache:
    """The kmalloc cache of struct kvm (kvm_arch_alloc_vm: kzalloc in protected mode):
    kmalloc-4k up to 4 KiB (6.1 to 6.18: one page), kmalloc-8k above (7.3's 4136 B: 8 KiB
    objects, naturally aligned, so kvm_share_hyp(kvm, kvm + 1) covers two pages)."""
    if kvm_bytes <= 4096:
        return KMALLOC_4K
    return SlabCache("kmalloc-8k", kvm_bytes, 8192)


def vcpu_cache(vcpu_bytes: int) -> SlabCache:
    """The kvm_vcpu cache of a build whose struct kvm_vcpu has `vcpu_bytes`."""
    slot = -(-vcpu_bytes // CACHELINE_BYTES) * CACHELINE_BYTES
    return SlabCache("kvm_vcpu", vcpu_bytes, slot)


def object_pfns(cache: SlabCache, obj: tuple[str, int, int], page_size: int) -> list[int]:
    """The pages an object [slot start, slot start + size) touches."""
    _name, base, index = obj
    start = index * cache.slot_bytes
    end = start + cache.struct_bytes
    return list(range(base + start // page_size, base + -(-end // page_size)))


__all__ = ["CACHELINE_BYTES", "KMALLOC_4K", "SLAB_GROUP", "SlabCache", "kvm_struct_cache",
           "object_pfns", "vcpu_cache"]
