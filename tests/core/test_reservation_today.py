"""kvm_hyp_reserve of v6.18 and v7.3 against what the real kernels printed.

Expected MiB are the `kvm [0]: Reserved N MiB` lines of Debian's kernels booted in protected
mode under QEMU (`pkvm-sim kernel-check`, RAM from 0x4000_0000, '+' separates NUMA nodes):
real 6.18.15 (linux-image-6.18.15+deb13-arm64[-16k] 6.18.15-1~bpo13+1) and real 7.3.4
(linux-binary-7.3.4+deb13-arm64[-16k] 7.3.4-1~bpo13+1), 4 December 2026. None of these maps
was used to build the profiles: sizes that are not GiB multiples, two and three nodes, 16K
pages, tens of GiB. tests/kernel boots a subset of them live.

The page counts are derived by hand from the 7.3 source (arch/arm64/kvm/pkvm.c
kvm_hyp_reserve, asm/kvm_pkvm.h): v6.12's terms with sizeof(struct hyp_page) = 8.
"""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.layout import MIB
from pkvm_sim.core.reservation import compute_reservation

RAM = 0x4000_0000  # QEMU virt

# (kernel, page size, memory map) -> MiB the real kernel reserved
REAL_BOOTS: dict[tuple[str, str, str], int] = {
    ("v7.3", "4K", "1G"): 12,
    ("v7.3", "4K", "1320M"): 12,
    ("v7.3", "4K", "3584M"): 26,
    ("v7.3", "4K", "4G"): 30,
    ("v7.3", "4K", "64M+8896M"): 58,
    ("v7.3", "4K", "24G"): 150,
    ("v7.3", "16K", "4G"): 32,
    ("v7.3", "16K", "3584M"): 32,
    ("v7.3", "16K", "64M+8896M"): 32,
    ("v7.3", "16K", "24G"): 64,
    ("v6.18", "4K", "1320M"): 12,
    ("v6.18", "4K", "3584M"): 26,
    ("v6.18", "4K", "4G"): 30,
    ("v6.18", "4K", "2G+1G+1G"): 30,
    ("v6.18", "4K", "40G"): 246,
    ("v6.18", "16K", "4G"): 32,
    ("v6.18", "16K", "3584M"): 32,
    ("v6.18", "16K", "64M+8896M"): 32,
    ("v6.18", "16K", "24G"): 64,
}


def _size(text: str) -> int:
    return int(text[:-1]) << (30 if text.endswith("G") else 20)


def reserve(profile: str, page_size: str, memory: str) -> Any:
    blocks, base = [], RAM
    for size in map(_size, memory.split("+")):
        blocks.append(Memblock(base, size))
        base += size
    config = SimConfig.from_mapping({"profile": profile, "page_size": page_size,
                                     "memblocks": tuple(blocks)})
    return compute_reservation(config)


@pytest.mark.parametrize(("profile", "page_size", "memory"), list(REAL_BOOTS),
                         ids=["-".join(case) for case in REAL_BOOTS])
def test_reserves_what_the_real_kernel_reserved(profile: str, page_size: str,
                                                memory: str) -> None:
    reserved = reserve(profile, page_size, memory)
    assert reserved.reserved_bytes // MIB == REAL_BOOTS[profile, page_size, memory]


def test_one_gib_4k_by_hand() -> None:
    """1 GiB at 0x4000_0000, 4K pages (E = 512), 5 levels:
    M(262144) = 512 + 1 + 1 + 1 + 1 = 516 = T = G; S1 = 1032; S2 = 516 + 16 + 516 = 1048;
    VM table 1; FF-A 2 + ceil(32864 / 4096) = 11; vmemmap 262144 x 8 B / 4096 = 512.
    Total 2604 pages = 10.17 MiB -> 12 MiB PMD-rounded (v6.12, 4-byte hyp_page: 2348 -> 10)."""
    r = reserve("v7.3", "4K", "1G")
    assert (r.hyp_s1_pgtable_pages, r.host_s2_pgtable_pages) == (1032, 1048)
    assert (r.vm_table_pages, r.ffa_proxy_pages, r.vmemmap_pages) == (1, 11, 512)
    assert r.hyp_mem_pages == 2604 and r.reserved_bytes == 12 * MIB
    assert reserve("v6.12", "4K", "1G").hyp_mem_pages == 2604 - 256


def test_1320m_would_round_to_14_mib_with_el2_selftest_pages() -> None:
    """1320 MiB is where CONFIG_NVHE_EL2_DEBUG's 32 pkvm_selftest_pages would show: 3050
    pages (11.9 MiB) round to 12 MiB, 3082 would round to 14. Both kernels printed 12: Debian
    does not set it, and the profiles add none."""
    r = reserve("v7.3", "4K", "1320M")
    assert r.hyp_mem_pages == 3050
    assert 12 * MIB < (3050 + 32) * 4096


def test_the_two_profiles_reserve_alike_and_8_bytes_per_page_more_than_v6_12() -> None:
    for page_size, memory in (("4K", "64M+8896M"), ("16K", "24G"), ("4K", "2G+1G+1G")):
        new = reserve("v7.3", page_size, memory)
        assert reserve("v6.18", page_size, memory).hyp_mem_pages == new.hyp_mem_pages
        old = reserve("v6.12", page_size, memory)
        # only the vmemmap differs: twice as many bytes per page (region by region)
        assert new.hyp_mem_pages - new.vmemmap_pages == old.hyp_mem_pages - old.vmemmap_pages
        assert new.entry_bytes == 2 * old.entry_bytes == 8
