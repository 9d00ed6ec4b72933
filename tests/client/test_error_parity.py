"""The same refusal raises the same exception whether it comes from a unary call or from an
operation of an Execute batch: class, code, reason and errno (issue 12).

One case per error class of the core, each against the real service on a real socket. The
expected SDK class of each comes from docs/service.md's table, not from the SDK's mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from pkvm_client import (
    VM,
    Batch,
    BusyError,
    FailedPreconditionError,
    Hypervisor,
    InvalidArgumentError,
    NotFoundError,
    OutOfMemoryError,
    OutOfRangeError,
    PermissionDeniedError,
    PkvmError,
    Pool,
    WouldPanicError,
)
from pkvm_sim.core import errors as core_errors
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.server import RunningService

from tests.service.fixtures import start_service

# A machine whose vmemmap covers only the carve-out (VM pools are refused: FailedPrecondition)
# and whose 2-byte struct hyp_page caps refcounts at 8191 (reachable: WouldPanic).
SMALL_LIMITS = SimConfig(hyp_page_layout="2", vmemmap_coverage="carveout")
REFCOUNT_MAX_2 = 8191  # LAYOUT_2: a 13-bit refcount field


@dataclass
class Refusal:
    """One refusal, provoked twice: by the unary call and by the same operation in a batch."""

    unary: Callable[[], object]
    batch: Batch


@pytest.fixture(scope="module")
def hv(service: RunningService) -> Iterator[Hypervisor]:
    with Hypervisor(service.target) as connection:
        yield connection


@pytest.fixture(scope="module")
def small_hv() -> Iterator[Hypervisor]:
    running = start_service(SMALL_LIMITS)
    try:
        with Hypervisor(running.target) as connection:
            yield connection
    finally:
        running.stop(0)


def one(build: Callable[[Batch], object]) -> Batch:
    batch = Batch()
    build(batch)
    return batch


def unary_error(refusal: Refusal) -> PkvmError:
    with pytest.raises(PkvmError) as caught:
        refusal.unary()
    return caught.value


def batch_error(vm: VM, refusal: Refusal) -> PkvmError:
    result = vm.execute(refusal.batch)
    assert list(result.errors) == [len(refusal.batch) - 1], "only the last op is refused"
    with pytest.raises(PkvmError) as caught:
        result.raise_first()
    return caught.value


def assert_parity(vm: VM, refusal: Refusal, expected: type[PkvmError]) -> PkvmError:
    """Provoke the refusal twice; both must be exactly `expected` and agree on everything."""
    unary, batch = unary_error(refusal), batch_error(vm, refusal)
    assert type(unary) is expected, unary
    assert type(batch) is expected, batch
    assert (batch.code, batch.reason, batch.errno, batch.would_panic) == (
        unary.code, unary.reason, unary.errno, unary.would_panic)
    return unary


# -- one case per core error class ----------------------------------------------------------------


def out_of_memory(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    """Order >= the hyp pool's max_order: -ENOMEM (docs/allocator.md)."""
    return Refusal(lambda: vm.alloc_pages(order=11),
                   one(lambda b: b.alloc_pages(order=11))), OutOfMemoryError


def invalid_argument(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    return Refusal(lambda: vm.alloc_pages(order=-1),
                   one(lambda b: b.alloc_pages(order=-1))), InvalidArgumentError


def permission_denied(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    """A block the VM gave back: no longer its own (NOT_OWNER)."""
    foreign = vm.alloc_pages()
    vm.put_page(foreign)
    return Refusal(lambda: vm.put_page(foreign),
                   one(lambda b: b.put_page(foreign))), PermissionDeniedError


def busy(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    base = vm.info.slice_base_pfn
    vm.host_share(base)
    vm.pin_shared(base)  # EL2 holds it: unsharing is -EBUSY
    return Refusal(lambda: vm.host_unshare(base),
                   one(lambda b: b.host_unshare(base))), BusyError


def ipa_mapped(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    """A mapped guest IPA mapped again: -EPERM (__pkvm_host_share_guest wants NOPAGE)."""
    base = vm.info.slice_base_pfn
    vm.topup_memcache(8)
    vm.guest_map(0x4000_0000, base + 1)
    return Refusal(lambda: vm.guest_map(0x4000_0000, base + 2),
                   one(lambda b: b.guest_map(0x4000_0000, base + 2))), PermissionDeniedError


def out_of_range(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    """A pfn far beyond RAM (the defect of issue 12: it was PermissionDenied)."""
    return Refusal(lambda: vm.put_page(1 << 50),
                   one(lambda b: b.put_page(1 << 50))), OutOfRangeError


def out_of_range_ipa(hv: Hypervisor, vm: VM) -> tuple[Refusal, type[PkvmError]]:
    """An IPA beyond the guest's 40-bit space: -ERANGE, as kvm_pgtable_walk refuses it."""
    base = vm.info.slice_base_pfn
    vm.topup_memcache(8)
    return Refusal(lambda: vm.guest_map(1 << 40, base),
                   one(lambda b: b.guest_map(1 << 40, base))), OutOfRangeError


DEFAULT_MACHINE_CASES = {
    core_errors.OutOfMemory: out_of_memory,
    core_errors.InvalidArgument: invalid_argument,
    core_errors.PermissionDenied: permission_denied,
    core_errors.Busy: busy,
    core_errors.OutOfRange: out_of_range,
}


def footprint(hv: Hypervisor) -> tuple[object, ...]:
    """What a refusal must not change (failure counters aside)."""
    stats = hv.stats()
    pools = tuple((p.name, p.free_pages, p.allocated_pages) for p in stats.pools)
    return pools, stats.nr_vms, stats.shared_pages, stats.host_stage2.table_pages


@pytest.mark.parametrize("case", [*DEFAULT_MACHINE_CASES.values(), out_of_range_ipa, ipa_mapped],
                         ids=lambda case: case.__name__)
def test_unary_and_batch_raise_the_same_error(
    hv: Hypervisor, case: Callable[[Hypervisor, VM], tuple[Refusal, type[PkvmError]]]
) -> None:
    with hv.create_vm(slice_pages=16) as vm:
        refusal, expected = case(hv, vm)
        before = footprint(hv)
        error = assert_parity(vm, refusal, expected)
        assert footprint(hv) == before  # both refusals changed nothing
    if expected is BusyError:
        assert error.errno == "EBUSY"  # what the batch lacked before BatchError.errno


def test_not_found(hv: Hypervisor) -> None:
    """A VM that no longer exists: the batch is refused as a whole, with the same class."""
    vm = hv.create_vm(slice_pages=4)
    hv.attach(vm.handle, vm.token).destroy()
    with pytest.raises(NotFoundError) as unary:
        vm.alloc_pages()
    with pytest.raises(NotFoundError) as batch:
        vm.execute(one(lambda b: b.alloc_pages()))
    assert (batch.value.code, batch.value.reason) == (unary.value.code, unary.value.reason)


def test_failed_precondition(small_hv: Hypervisor) -> None:
    """v5.14 with the vmemmap over the carve-out only is that kernel: no VMs at EL2, so no
    VM pool (docs/model.md, section 9)."""
    with small_hv.create_vm(slice_pages=4) as vm:
        refusal = Refusal(lambda: vm.alloc_pages(pool=Pool.VM),
                          one(lambda b: b.alloc_pages(pool=Pool.VM)))
        error = assert_parity(vm, refusal, FailedPreconditionError)
        assert error.reason == "NOT_IN_PROFILE"


def test_would_panic(small_hv: Hypervisor) -> None:
    """A refcount at its limit: the kernel would BUG on the next hyp_get_page."""
    with small_hv.create_vm(slice_pages=4) as vm:
        pfn = vm.alloc_pages()  # refcount 1
        gets = REFCOUNT_MAX_2 - 1
        for start in range(0, gets, 4096):
            batch = Batch()
            for _ in range(min(4096, gets - start)):
                batch.get_page(pfn)
            assert vm.execute(batch).ok
        refusal = Refusal(lambda: vm.get_page(pfn), one(lambda b: b.get_page(pfn)))
        error = assert_parity(vm, refusal, WouldPanicError)
        assert error.would_panic and error.reason == "REFCOUNT_OVERFLOW"
        assert small_hv.page_info(pfn).refcount == REFCOUNT_MAX_2


def test_every_core_error_class_has_a_parity_case() -> None:
    covered = {*DEFAULT_MACHINE_CASES, core_errors.NotFound, core_errors.FailedPrecondition,
               core_errors.WouldPanic,
               core_errors.AlreadyExists}  # no operation raises it since guest maps follow v6.14
    assert covered == set(core_errors.PkvmError.__subclasses__())
