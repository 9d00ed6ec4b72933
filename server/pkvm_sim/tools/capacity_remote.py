"""`pkvm-sim capacity --target HOST:PORT`: the same question asked of a running service, through
the SDK. The server's machine, profile and caps apply: its quotas (`max_vms`,
`quota_slice_pages`) refuse with QUOTA_EXCEEDED, reported as the `service-cap` limit. Every VM
this run created is destroyed at the end, refused or not, so the server is left as found.

Kept apart from capacity.py so that the offline command never loads gRPC.
"""

from __future__ import annotations

from pkvm_client import VM, FailedPreconditionError, Hypervisor, OutOfMemoryError, PkvmError

from pkvm_sim.core.layout import ceil_div
from pkvm_sim.core.profiles import profile_spec

from .capacity import GUEST_IPA_BASE, CapacityResult, GuestShape, Limit, binding_limit

CONNECT_TIMEOUT_S = 10.0


class _Steps:
    """What this server serves: a step refused NOT_IN_PROFILE once is skipped after that
    (the offline command asks the profile; the SDK only sees the refusal)."""

    def __init__(self) -> None:
        self.share = True
        self.touch = True


def remote_capacity(target: str, shape: GuestShape, *,
                    max_vms: int | None = None) -> CapacityResult:
    with Hypervisor(target) as hv:
        try:
            hv.wait_ready(timeout=CONNECT_TIMEOUT_S)
            reservation = hv.reserve()
        except PkvmError as error:
            raise ValueError(f"{target}: {error.message}") from error
        page_size = reservation.page_size
        stats = hv.stats()
        result = CapacityResult(
            profile=reservation.profile, page_size=page_size,
            memory_bytes=0,  # the SDK reports no memory map: 0 = unknown
            shape=shape.label, vcpus=shape.vcpus, guest_memory_bytes=shape.memory_bytes,
            vm_table_entries=profile_spec(reservation.profile).vm_table_entries,
        )
        result.hyp_pool_free_after_vm.append(stats.pool("hyp").free_pages)
        vms: list[VM] = []
        steps = _Steps()
        try:
            while max_vms is None or result.vms < max_vms:
                try:
                    vms.append(_add_remote_vm(hv, shape, page_size, steps, result.vms))
                except PkvmError as error:
                    limit = binding_limit(error, kernel_vm_table=bool(result.vm_table_entries))
                    result.binding_limit, result.reason = limit.value, error.reason
                    result.message = error.message
                    break
                result.vms += 1
                result.hyp_pool_free_after_vm.append(hv.stats().pool("hyp").free_pages)
                if result.vms == 1:
                    result.first_vm_donated_pages = vms[0].info.donated_pages
                    boot, first = result.hyp_pool_free_after_vm
                    result.first_vm_hyp_pool_pages = boot - first
            else:
                result.binding_limit = Limit.MAX_VMS.value
                result.message = f"--max-vms {max_vms} reached without a refusal"
            stats = hv.stats()
            hyp = stats.pool("hyp")
            host_pools = [p for p in stats.pools if p.name.startswith("host_s2")]
            result.hyp_pool_pages, result.hyp_pool_free_pages = hyp.nr_pages, hyp.free_pages
            result.host_s2_pool_pages = sum(p.nr_pages for p in host_pools)
            result.host_s2_pool_free_pages = sum(p.free_pages for p in host_pools)
        finally:
            for vm in vms:
                vm.destroy()
    return result


def _add_remote_vm(hv: Hypervisor, shape: GuestShape, page_size: int, steps: _Steps,
                   index: int) -> VM:
    """add_vm's steps through the SDK; a VM refused half-way is destroyed."""
    vm = hv.create_vm(nr_vcpus=shape.vcpus, slice_pages=ceil_div(shape.memory_bytes, page_size),
                      name=f"capacity-{index}")
    try:
        if steps.share and shape.host_shared_pages:
            try:
                vm.host_share(vm.info.slice_base_pfn,
                              min(shape.host_shared_pages, vm.info.slice_nr_pages))
            except FailedPreconditionError as error:
                if error.reason != "NOT_IN_PROFILE":
                    raise
                steps.share = False
        touched = ceil_div(shape.touched_bytes, page_size)
        for i in range(touched if steps.touch else 0):
            try:
                _guest_map(vm, GUEST_IPA_BASE + i * page_size, vm.info.slice_base_pfn + i)
            except FailedPreconditionError as error:
                if error.reason != "NOT_IN_PROFILE":
                    raise
                steps.touch = False
                break
    except PkvmError:
        vm.destroy()
        raise
    return vm


MAX_TABLE_LEVELS = 4  # a guest map needs at most one table page per level below the PGD


def _guest_map(vm: VM, ipa: int, pfn: int) -> None:
    """One guest map, the host's memcache topped up a page at a time while EL2 says it is
    short (MEMCACHE_EMPTY): the SDK does not report the guest stage-2's levels, from which
    the offline command computes kvm_mmu_cache_min_pages."""
    for _attempt in range(MAX_TABLE_LEVELS):
        try:
            vm.guest_map(ipa, pfn)
            return
        except OutOfMemoryError as error:
            if error.reason != "MEMCACHE_EMPTY":
                raise
            vm.topup_memcache(1)
    vm.guest_map(ipa, pfn)
