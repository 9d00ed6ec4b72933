"""EL2's boot stage-1 and the run-time costs of VMs (v6.1, v6.12), against real kernels.

Expected figures come from real boots of Debian's kernels under QEMU (`-M virt`, `-cpu max`,
protected mode, RAM 4 GiB at 0x4000_0000), with EL2's memory read with the QEMU monitor
(pool pages with refcount > 0 are exactly the stage-1 tables), or from the kernel source.
"""

from __future__ import annotations

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.el2_boot import KERNEL_IMAGES, boot_mappings
from pkvm_sim.core.errors import FailedPrecondition, OutOfMemory, WouldPanic
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.profiles import Profile

RAM_4G = (Memblock(0x4000_0000, 4 << 30),)


def machine(profile: str, cpus: int, ia_bits: int) -> Hypervisor:
    return Hypervisor.boot(SimConfig(profile=Profile(profile), memblocks=RAM_4G, nr_cpus=cpus,
                                     ia_bits=ia_bits))


@pytest.mark.parametrize("cpus", [1, 4])
def test_v6_12_boot_stage1_is_the_real_one(cpus: int) -> None:
    """Real 6.12 under QEMU, 4 GiB, 1 and 4 CPUs: the hyp pool (2571 pages) has 2534 free
    after boot; 37 table pages: 1 at level -1 (52-bit VA), 4 at level 0 (idmap, private
    range, vmemmap, linear map), 4 at level 1, 5 at level 2 (those three + GiB 0 and 3 of
    the linear map), 23 at level 3."""
    hv = machine("v6.12", cpus, 52)
    assert hv.hyp_pool.nr_pages == 2571
    assert hv.hyp_pool.free_pages == 2534
    assert hv.statistics().hyp_stage1_boot_table_pages == 37
    assert hv.hyp_stage1.tables_by_level() == {-1: 1, 0: 4, 1: 4, 2: 5, 3: 23}
    hv.audit()


def test_v6_1_boot_stage1_is_the_real_one() -> None:
    """Real 6.1 under QEMU, 4 GiB, 1 CPU: 2536 of 2569 pool pages free, 33 tables (48-bit
    VA: the PGD at level 0)."""
    hv = machine("v6.1", 1, 48)
    assert (hv.hyp_pool.nr_pages, hv.hyp_pool.free_pages) == (2569, 2536)
    assert hv.hyp_stage1.tables_by_level() == {0: 1, 1: 4, 2: 5, 3: 23}


def test_older_profiles_keep_an_unreserved_pool() -> None:
    """v5.14 keeps its behaviour (and its oracle traces): no boot tables are charged."""
    hv = Hypervisor.boot(SimConfig(profile=Profile("v5.14"), memblocks=RAM_4G))
    assert hv.hyp_stage1.early_pages == 0 and hv.hyp_pool.reserved_pages == 0


def test_the_knob_overrides_the_computed_early_pages() -> None:
    hv = Hypervisor.boot(SimConfig(profile=Profile("v6.12"), memblocks=RAM_4G, ia_bits=52,
                                   hyp_s1_early_used_pages=10))
    assert hv.hyp_pool.reserved_pages == 10


def test_carve_out_is_mapped_page_by_page_and_the_vmemmap_with_blocks_where_aligned() -> None:
    """pkvm_create_mappings_locked maps one page at a time; hyp_back_vmemmap maps the whole
    range, so a 2 MiB block where VA and PA are both aligned (kvm_block_mapping_supported).
    A 64 GiB machine's vmemmap is 64 MiB: the 2 MiB chunks of VA whose PA is aligned alike
    need no level-3 table."""
    image = KERNEL_IMAGES[("v6.12", 4096)]
    mib = 1 << 20
    _lay, maps = boot_mappings(page_size=4096, nr_cpus=1, image=image, lpa2=True,
                               image_base=0x4020_0000,
                               percpu_base=0x1_00a0_0000, memblocks=[(0x4000_0000, 64 << 30)],
                               carveout=(0x10_0000_0000, 326 * mib),
                               vmemmap_back=0x10_0000_0000 + 0x10_0000, entry_bytes=4)
    vmemmap = [m for m in maps if m.what == "vmemmap"]
    assert [(m.nr_pages, m.blocks) for m in vmemmap] == [(64 * mib // 4096, True)]
    carve = [m for m in maps if m.what == "carve-out"]
    assert carve[0].nr_pages == 326 * 256 and not carve[0].blocks


def test_the_255_vm_limit_is_reached_at_the_first_run() -> None:
    """Real 6.12: 255 VMs run; the 256th is created (KVM_CREATE_VM, KVM_CREATE_VCPU work)
    and fails at its first KVM_RUN with ENOMEM; closing one VM lets exactly one more run."""
    hv = machine("v6.12", 1, 52)
    handles = [hv.create_vm(nr_vcpus=1, slice_pages=1) for _ in range(255)]
    late = hv.create_vm(nr_vcpus=1, slice_pages=1, run=False)  # exists at EL1
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(OutOfMemory) as err:
        hv.run_vm(late.handle)
    assert err.value.reason == "VM_TABLE_FULL"
    assert hv.canonical_dump(host_tables=True) == before
    hv.destroy_vm(handles[7].handle)
    assert hv.run_vm(late.handle).vmid == 8  # the freed slot
    hv.audit()


def test_v6_1_has_no_vm_limit_at_el2() -> None:
    """Real 6.1: 600 VMs ran (no VM table at EL2); here 300 do."""
    hv = machine("v6.1", 1, 48)
    for _ in range(300):
        hv.run_vm(hv.create_vm(nr_vcpus=1, slice_pages=1, run=False).handle)
    assert hv.statistics().nr_vms == 300
    hv.audit()


def test_an_empty_hyp_pool_at_a_vm_run_is_fatal_and_changes_nothing() -> None:
    """__pkvm_init_vm donates through do_donate, which maps under WARN_ON; every WARN at
    EL2 is fatal (nvhe_hyp_panic_handler, 6.1 and 6.12 alike). So a hyp pool that cannot
    supply the stage-1 tables is the panic outcome, not a retryable -ENOMEM."""
    hv = machine("v6.12", 1, 52)
    holder = hv.create_vm(nr_vcpus=1, slice_pages=1)
    # 300 vCPUs: 602 pages of hyp VM/vCPU structs, more than a pageblock, so they land
    # where EL2 has no level-3 table yet.
    vm = hv.create_vm(nr_vcpus=300, slice_pages=1, run=False)
    while hv.hyp_pool.free_pages:
        hv.alloc_pages(holder.handle, 0)
    before = hv.canonical_dump(host_tables=True)
    with pytest.raises(WouldPanic) as err:
        hv.run_vm(vm.handle)
    assert err.value.reason == "HYP_POOL_EXHAUSTED" and err.value.would_panic
    assert hv.canonical_dump(host_tables=True) == before
    hv.audit()


@pytest.mark.parametrize(("call", "args"), [
    ("guest_map", (0x1000, -1, -5)),  # unknown VM, unaligned IPA, bad pfn
    ("topup_memcache", (0x1000, 10**9)),  # unknown VM, too many pages
    ("host_share", (0x1000, -1, 0)),
])
def test_not_in_profile_comes_before_any_argument_check(call: str, args: tuple[int, ...]) -> None:
    """An operation the modelled kernel lacks is refused NOT_IN_PROFILE whatever its
    arguments (v5.14 with carve-out coverage has neither sharing nor guest maps)."""
    hv = Hypervisor.boot(SimConfig(profile=Profile("v5.14"), vmemmap_coverage="carveout",
                                   memblocks=RAM_4G))
    with pytest.raises(FailedPrecondition) as err:
        getattr(hv, call)(*args)
    assert err.value.reason == "NOT_IN_PROFILE"
