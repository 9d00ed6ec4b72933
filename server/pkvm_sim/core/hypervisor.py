"""The booted simulated hypervisor: the one object the service, tools and tests drive.

`Hypervisor.boot(config)` does what the kernel does at KVM init (SEMANTICS 1.4 to 1.5, 3.1,
3.7): compute and place the carve-out, carve the vmemmap and the pools out of it, build the
vmemmap for the configured coverage, create the host stage-2 with its PGD allocated from its
pool, and annotate everything the hypervisor owns so the host can never map it.

This class is not thread-safe: callers serialise every call (the service holds one lock
around each request or batch, SEMANTICS A.7). Every public method either completes or
raises a `PkvmError` subclass and leaves the state exactly as it was.

Clients are VMs (A.4): per-VM operations take the acting VM's `handle`; a VM may only put,
get, share, unshare or map what it owns or what lies in its slice of host RAM.
"""

from __future__ import annotations

from typing import Any

from .config import SimConfig
from .model import (
    FaultResult,
    GuestMapResult,
    HypervisorStatistics,
    PageInfo,
    PoolKind,
    ShareResult,
    VmInfo,
)


class Hypervisor:
    """The simulated pKVM EL2 memory manager of one machine."""

    @classmethod
    def boot(cls, config: SimConfig) -> Hypervisor:
        """Boot a machine from `config`; raises ValueError for an impossible configuration."""
        raise NotImplementedError

    # -- VMs (SEMANTICS 5, A.4) -------------------------------------------------------------

    def create_vm(self, *, nr_vcpus: int, slice_pages: int, name: str | None = None) -> VmInfo:
        """Create a VM: a slice of host RAM for its VMM, donated metadata and guest PGD pages,
        and a VM pool initialised over the PGD pages. -EINVAL for nr_vcpus < 1 or a bad
        size; -ENOMEM when host RAM cannot supply the slice or the donations."""
        raise NotImplementedError

    def destroy_vm(self, handle: int) -> int:
        """Tear a VM down and return everything to the host; returns the number of pages
        given back (slice + donated + memcache + pages it held in the hyp pool)."""
        raise NotImplementedError

    def vm(self, handle: int) -> VmInfo:
        """-ENOENT (NotFound) for an unknown handle."""
        raise NotImplementedError

    def vms(self) -> list[VmInfo]:
        raise NotImplementedError

    # -- pool pages on behalf of a VM (A.5) ------------------------------------------------

    def alloc_pages(self, handle: int, order: int, pool: PoolKind = PoolKind.HYP) -> int:
        """hyp_alloc_pages on the hyp pool (default) or the VM's own pool; the block's owner
        becomes the VM. Returns the head pfn. -EINVAL for order < 0 or > MAX_ORDER; -ENOMEM
        when the pool has no block (including order >= the pool's max_order)."""
        raise NotImplementedError

    def put_page(self, handle: int, pfn: int) -> int:
        """hyp_put_page on a head the VM owns; returns the refcount after."""
        raise NotImplementedError

    def get_page(self, handle: int, pfn: int) -> int:
        """hyp_get_page on a head the VM owns; returns the refcount after."""
        raise NotImplementedError

    # -- host <-> hyp sharing (SEMANTICS 4.2, 4.4) ---------------------------------------

    def host_share(self, handle: int, pfn: int, nr_pages: int = 1) -> ShareResult:
        """__pkvm_host_share_hyp for each page of [pfn, pfn + nr_pages) in the VM's slice;
        all pages are checked before any changes."""
        raise NotImplementedError

    def host_unshare(self, handle: int, pfn: int, nr_pages: int = 1) -> ShareResult:
        """__pkvm_host_unshare_hyp; -EBUSY if EL2 has any of the pages pinned."""
        raise NotImplementedError

    def pin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        """hyp_pin_shared_mem: EL2 takes a reference on shared pages (blocks unshare)."""
        raise NotImplementedError

    def unpin_shared(self, handle: int, pfn: int, nr_pages: int = 1) -> None:
        raise NotImplementedError

    # -- host stage-2 faults (SEMANTICS 3.3 to 3.8) -------------------------------------------

    def host_fault(self, addr: int) -> FaultResult:
        """A host stage-2 fault on `addr` (memory or MMIO, decided by the memblocks)."""
        raise NotImplementedError

    def map_mmio(self, addr: int) -> FaultResult:
        """An MMIO fault on `addr`; -EINVAL if `addr` is memory."""
        raise NotImplementedError

    # -- guest stage-2 (SEMANTICS 5) ------------------------------------------------------

    def topup_memcache(self, handle: int, nr_pages: int) -> int:
        """Donate nr_pages host pages to the VM's memcache; returns the memcache size."""
        raise NotImplementedError

    def guest_map(self, handle: int, ipa: int, pfn: int) -> GuestMapResult:
        """Map a page of the VM's slice at `ipa` in its guest stage-2."""
        raise NotImplementedError

    # -- read-only views ------------------------------------------------------------------

    def statistics(self) -> HypervisorStatistics:
        raise NotImplementedError

    def page_info(self, pfn: int) -> PageInfo:
        raise NotImplementedError

    def audit(self) -> None:
        """Prove the whole-machine invariants (ownership, pool sums, table refcounts,
        no host mapping of hyp memory, shared-state consistency); AssertionError if not."""
        raise NotImplementedError

    def canonical_dump(self) -> dict[str, Any]:
        """A deterministic, JSON-serialisable picture of the whole state, for comparing."""
        raise NotImplementedError
