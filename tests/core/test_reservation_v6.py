"""kvm_hyp_reserve of v6.1 and v6.12 (profiles.py), by hand from the kernel's formulas.

v6.1 (arch/arm64/kvm/pkvm.c, asm/kvm_pkvm.h): the v5.14 sum, S1 + S2 + the vmemmap fixed
point, 4 levels. v6.12: 5 levels (KVM_PGTABLE_FIRST_LEVEL -1), + the VM table (255 pointers,
one page), + the vmemmap of every memblock rounded out to pages region by region (no fixed
point), + the FF-A proxy (2 mailbox pages + the 32864-byte descriptor buffer). Each expected
value is derived in its comment; the MiB figures are also what the Debian kernels printed when
booted under QEMU (docs/model.md; tests/kernel checks them live).
"""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.hyp_pool import pool_max_order
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.layout import GIB, KIB, MIB, PageGeometry
from pkvm_sim.core.profiles import PROFILES, Profile, kernel_profile_names
from pkvm_sim.core.reservation import (
    compare_profiles,
    compute_reservation,
    ffa_proxy_pages,
    gib_allowance_pages,
    hyp_pgtable_max_pages,
    partition_carveout,
    vm_table_pages,
    vmemmap_region_pages,
)

RAM = 0x4000_0000  # QEMU virt
G4K, G16K, G64K = PageGeometry(4 * KIB), PageGeometry(16 * KIB), PageGeometry(64 * KIB)
V6_12 = PROFILES[Profile.V6_12]


def reserve(profile: str, *sizes: int, page_size: str = "4K") -> Any:
    blocks, base = [], RAM
    for size in sizes:
        blocks.append(Memblock(base, size))
        base += size
    return compute_reservation(SimConfig.from_mapping(
        {"profile": profile, "page_size": page_size, "memblocks": tuple(blocks)}))


def test_five_level_budgets() -> None:
    # one more ceil(n / E) level on top of the four of v5.x
    assert hyp_pgtable_max_pages(262_144, G4K, 5) == 512 + 1 + 1 + 1 + 1
    assert gib_allowance_pages(G4K, 5) == 516
    assert gib_allowance_pages(G16K, 5) == 32 + 1 + 1 + 1 + 1
    assert gib_allowance_pages(G64K, 5) == 2 + 1 + 1 + 1 + 1


def test_vm_table_and_ffa_pages() -> None:
    assert [vm_table_pages(V6_12, g) for g in (G4K, G16K, G64K)] == [1, 1, 1]  # 2040 bytes
    # 32864 bytes: 9 pages of 4K, 3 of 16K, 1 of 64K, plus the RX and TX mailboxes
    assert [ffa_proxy_pages(V6_12, g) for g in (G4K, G16K, G64K)] == [11, 5, 3]
    v61 = PROFILES[Profile.V6_1]
    assert (vm_table_pages(v61, G4K), ffa_proxy_pages(v61, G4K)) == (0, 0)


def test_vmemmap_region_by_region_counts_a_shared_page_twice() -> None:
    # [1M, 2M) and [2M, 3M): pfns 256..511 and 512..767, 4-byte entries at vmemmap bytes
    # 1024..2047 and 2048..3071, both in vmemmap page 0: reserved twice, backed once
    blocks = (Memblock(0x10_0000, 0x10_0000), Memblock(0x20_0000, 0x10_0000))
    assert vmemmap_region_pages(blocks, 4, G4K) == 2


def test_v6_1_reserves_like_v5_14() -> None:
    # 1 GiB: T = G = 515, S1 = 1030, S2 = 515 + 16 + 515 = 1046, H = 2076,
    # V = ceil(2076 * 4 / 4096) = 3, + M(3) = 4 -> 7 (stable): 2083 pages = 8.14 MiB -> 10 MiB
    r = reserve("v6.1", GIB)
    assert (r.hyp_s1_pgtable_pages, r.host_s2_pgtable_pages, r.vmemmap_pages) == (1030, 1046, 7)
    assert (r.hyp_mem_pages, r.reserved_bytes) == (2083, 10 * MIB)
    for sizes in ((GIB,), (4 * GIB,), (64 * MIB, 9600 * MIB)):
        v514 = reserve("v5.14", *sizes)
        assert reserve("v6.1", *sizes).hyp_mem_pages == v514.hyp_mem_pages


def test_v6_12_4k_4gib() -> None:
    # T = M(1 Mi pages) = 2048 + 4 + 1 + 1 + 1 = 2055, G = 516: S1 = 2571, S2 = 2587,
    # VM table 1, FF-A 11, vmemmap 1 Mi * 4 B = 1024 pages: 6194 pages = 24.2 MiB -> 26 MiB
    r = reserve("v6.12", 4 * GIB)
    assert (r.hyp_s1_pgtable_pages, r.host_s2_pgtable_pages) == (2571, 2587)
    assert (r.vm_table_pages, r.ffa_proxy_pages, r.vmemmap_pages) == (1, 11, 1024)
    assert (r.hyp_mem_pages, r.reserved_bytes) == (6194, 26 * MIB)


def test_v6_12_numa_sums_region_by_region() -> None:
    # 64M: M(16384) = 32 + 1 + 1 + 1 + 1 = 36; 8896M: M(2277376) = 4448 + 9 + 1 + 1 + 1 = 4460;
    # S1 = 4496 + 516, S2 = 4496 + 16 + 516; vmemmap 16 + 2224; + 1 + 11 = 12292 -> 50 MiB.
    # One 8960M region instead: T = 4492, vmemmap 2240: 12284 pages -> 48 MiB.
    assert reserve("v6.12", 64 * MIB, 8896 * MIB).hyp_mem_pages == 12292
    assert reserve("v6.12", 64 * MIB, 8896 * MIB).reserved_bytes == 50 * MIB
    assert reserve("v6.12", 8960 * MIB).reserved_bytes == 48 * MIB


@pytest.mark.parametrize(("gib", "mib"), [(4, 32), (64, 96)])
def test_v6_12_16k(gib: int, mib: int) -> None:
    # 4G: T = M(262144) = 128+1+1+1+1 = 132, G = 36: 168 + 184 + 1 + 64 + 5 = 422 pages
    # (6.6 MiB) -> one 32 MiB PMD. 64G: T = 2052: 2088 + 2104 + 1 + 1024 + 5 = 5222 pages
    # (81.6 MiB) -> 96 MiB.
    assert reserve("v6.12", gib * GIB, page_size="16K").reserved_bytes == mib * MIB


def test_v6_12_partition_in_divide_memory_pool_order() -> None:
    cfg = SimConfig.from_mapping({"profile": "v6.12", "memblocks": [f"{RAM:#x}:4G"]})
    r = compute_reservation(cfg)
    layout = partition_carveout(r, cfg)
    assert [(reg.name, reg.nr_pages) for reg in layout.regions] == [
        ("vmemmap", 1024), ("vm_table", 1), ("hyp", 2571), ("host_s2", 2587),
        ("ffa_proxy", 11), ("slack", 26 * 256 - 6194),
    ]


def test_v6_12_has_no_carveout_only_vmemmap() -> None:
    with pytest.raises(ValueError, match="all memory"):
        SimConfig(profile=Profile.V6_12, vmemmap_coverage="carveout")


@pytest.mark.parametrize("profile", ["v6.1", "v6.12"])
@pytest.mark.parametrize("page_size", ["4K", "16K", "64K"])
def test_v6_machines_boot_and_pass_the_audit(profile: str, page_size: str) -> None:
    hv = Hypervisor.boot(SimConfig.from_mapping({"profile": profile, "page_size": page_size}))
    hv.audit()
    for addr in (0x8000_0000, 0x1_0000_0000, 0x0900_0000):  # memory, memory, MMIO
        hv.host_stage2.handle_fault(addr)
    hv.audit()


@pytest.mark.parametrize(
    ("nr_pages", "formula", "lists"),
    [
        # v5.14: min(11, get_order(n pages)): a 1024-page pool has no order-10 list
        (1024, "v5.14", 10), (1000, "v5.14", 10),
        # v5.17: get_order(n + 1 pages)
        (1024, "v5.17", 11), (1000, "v5.17", 10),
        # v6.4+: lists 0 .. min(MAX_PAGE_ORDER 10, get_order(n pages)): one more than v5.14
        (1024, "v6.4", 11), (1000, "v6.4", 11), (1, "v6.4", 1), (5000, "v6.4", 11),
    ],
)
def test_max_order_formulas(nr_pages: int, formula: str, lists: int) -> None:
    assert pool_max_order(nr_pages, page_shift=12, max_order_cap=11, formula=formula) == lists


def test_compare_every_kernel_profile_shows_the_growth() -> None:
    cfg = SimConfig.from_mapping({"memblocks": [f"{RAM:#x}:64G"]})
    mib = [r.reserved_bytes // MIB for r in compare_profiles(cfg, kernel_profile_names())]
    # v5.13 pays 32-byte entries for the carve-out only; booted: v6.1 262, v6.12 326.
    # v6.18 and v7.3 add 4 bytes of hyp_page per 4K page: 16 Mi pages x 4 B = 64 MiB more.
    assert mib[1:] == [262, 262, 326, 326 + 64, 326 + 64]
    assert mib[0] > mib[1]
