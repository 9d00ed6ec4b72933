"""Reservation arithmetic and EL2 partition (docs/reservation.md).

Every expected number below is taken from the spec's worked examples (1.6: A, B, "other page
sizes"), the table of 1.2, or the tiny facts of 1.3 / 1.4, or reasoned out by hand in a comment;
none is copied from the implementation's output.
"""

from __future__ import annotations

from typing import Any

import pytest
from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.layout import GIB, KIB, MIB, PageGeometry, Profile
from pkvm_sim.core.reservation import (
    JSON_KEYS,
    Reservation,
    all_memory_vmemmap_pages,
    compare_profiles,
    compute_reservation,
    gib_allowance_pages,
    hyp_pgtable_max_pages,
    hyp_pgtable_total_pages,
    partition_carveout,
    vmemmap_backing_pages,
    vmemmap_pages_fixed_point,
)

G4K, G16K, G64K = PageGeometry(4 * KIB), PageGeometry(16 * KIB), PageGeometry(64 * KIB)
EXAMPLE_A = (Memblock(0x8000_0000, 4 * GIB),)
EXAMPLE_B = (Memblock(0x8000_0000, 2 * GIB), Memblock(0x8_8000_0000, 6 * GIB))


def config(**values: Any) -> SimConfig:
    return SimConfig.from_mapping(values)


def reservation(**values: Any) -> Reservation:
    return compute_reservation(config(**values))


# ---- M(), T, G (1.4) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nr_pages", "geometry", "expected"),
    [
        (1_048_576, G4K, 2048 + 4 + 1 + 1),  # example A's region
        (524_288, G4K, 1024 + 2 + 1 + 1),  # example B, 2 GiB
        (1_572_864, G4K, 3072 + 6 + 1 + 1),  # example B, 6 GiB
        (262_144, G4K, 512 + 1 + 1 + 1),  # G, 4K
        (41, G4K, 4),  # v5.13 fixed point step: M(41) = 4
        (6, G4K, 4),
        (1, G4K, 4),  # every level needs one page
        (0, G4K, 0),
        (262_144, G16K, 131),  # 4 GiB of 16K pages: 128 + 1 + 1 + 1
        (65_536, G16K, 35),  # G, 16K
        (65_536, G64K, 11),  # 4 GiB of 64K pages: 8 + 1 + 1 + 1
        (16_384, G64K, 5),  # G, 64K
        (512 * 512 + 1, G4K, 513 + 2 + 1 + 1),  # one past a full level-2 table
    ],
)
def test_hyp_pgtable_max_pages(nr_pages: int, geometry: PageGeometry, expected: int) -> None:
    assert hyp_pgtable_max_pages(nr_pages, geometry) == expected


def test_hyp_pgtable_max_pages_rejects_negative() -> None:
    with pytest.raises(ValueError):
        hyp_pgtable_max_pages(-1, G4K)


@pytest.mark.parametrize(
    ("geometry", "expected_t", "expected_g"), [(G4K, 2054, 515), (G16K, 131, 35), (G64K, 11, 5)]
)
def test_total_and_allowance_for_4_gib(
    geometry: PageGeometry, expected_t: int, expected_g: int
) -> None:
    assert hyp_pgtable_total_pages(EXAMPLE_A, geometry) == expected_t
    assert gib_allowance_pages(geometry) == expected_g


def test_total_is_summed_region_by_region() -> None:
    assert hyp_pgtable_total_pages(EXAMPLE_B, G4K) == 4108
    four_plus_four = (Memblock(0x8000_0000, 4 * GIB), Memblock(0x8_8000_0000, 4 * GIB))
    assert hyp_pgtable_total_pages(four_plus_four, G4K) == 2 * 2054


# ---- vmemmap fixed point (1.4) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("h_pages", "entry_bytes", "geometry", "expected"),
    [
        (5154, 32, G4K, 45),  # example A, v5.13: 41 + 4
        (5154, 4, G4K, 10),  # example A, v5.14: 6 + 4
        (9262, 32, G4K, 77),  # example B, v5.13: 73 + 4
        (9262, 4, G4K, 14),  # example B, v5.14: 10 + 4
        (348, 4, G16K, 5),  # 16K: 166 + 182 pre-vmemmap
        (48, 4, G64K, 5),  # 64K: 16 + 32 pre-vmemmap
        (0, 4, G4K, 0),
    ],
)
def test_vmemmap_fixed_point(
    h_pages: int, entry_bytes: int, geometry: PageGeometry, expected: int
) -> None:
    assert vmemmap_pages_fixed_point(h_pages, entry_bytes, geometry) == expected


# ---- budgets per profile ---------------------------------------------------------------------


def test_example_a_v13_budgets() -> None:
    r = reservation(profile="v5.13")
    assert (r.hyp_pgtable_total_pages, r.gib_allowance_pages) == (2054, 515)
    assert r.hyp_s1_pgtable_pages == 2569
    assert (r.host_s2_mem_pages, r.host_s2_dev_pages) == (2070, 515)
    assert r.host_s2_pgtable_pages == 2070 + 515
    assert r.pre_vmemmap_pages == 5154
    assert r.vmemmap_pages == 45
    assert r.hyp_mem_pages == 5199
    assert r.entry_bytes == 32 and r.layout_name == "32"


def test_example_a_v14_budgets() -> None:
    r = reservation()  # v5.14 and one 4 GiB block at 0x8000_0000 are the defaults
    assert r.profile is Profile.V5_14
    assert r.hyp_s1_pgtable_pages == 2569
    assert r.host_s2_pgtable_pages == 2585
    assert r.host_s2_mem_pages is None and r.host_s2_dev_pages is None
    assert r.pre_vmemmap_pages == 5154
    assert r.vmemmap_pages == 10
    assert r.hyp_mem_pages == 5164
    assert r.entry_bytes == 4


def test_example_a_saving_before_rounding() -> None:
    before, after = compare_profiles(config())
    assert (before.hyp_mem_pages - after.hyp_mem_pages) * 4 * KIB == 140 * KIB  # 35 pages


@pytest.mark.parametrize(
    ("profile", "s2", "vmemmap", "hyp_mem"),
    [("v5.13", 4124 + 515, 77, 9339), ("v5.14", 4639, 14, 9276)],
)
def test_example_b_budgets(profile: str, s2: int, vmemmap: int, hyp_mem: int) -> None:
    r = reservation(profile=profile, memblocks=EXAMPLE_B)
    assert r.hyp_pgtable_total_pages == 4108
    assert r.hyp_s1_pgtable_pages == 4623
    assert r.host_s2_pgtable_pages == s2
    assert r.pre_vmemmap_pages == 9262
    assert r.vmemmap_pages == vmemmap
    assert r.hyp_mem_pages == hyp_mem
    if profile == "v5.13":
        assert (r.host_s2_mem_pages, r.host_s2_dev_pages) == (4124, 515)


# ---- reservation size and placement ----------------------------------------------------------


@pytest.mark.parametrize("profile", ["v5.13", "v5.14"])
def test_example_a_reserves_22_mib_at_the_top(profile: str) -> None:
    r = reservation(profile=profile)
    assert r.reserved_bytes == 22 * MIB
    assert r.reserved_pages == 5632
    assert r.pmd_rounded
    assert r.carveout_base == 0x1_7EA0_0000
    assert r.carveout_end == 0x1_8000_0000


@pytest.mark.parametrize("profile", ["v5.13", "v5.14"])
def test_example_b_reserves_38_mib_at_the_top(profile: str) -> None:
    r = reservation(profile=profile, memblocks=EXAMPLE_B)
    assert r.reserved_bytes == 38 * MIB
    assert r.reserved_pages == 9728
    assert r.carveout_base == 0x9_FDA0_0000
    assert r.carveout_end == 0xA_0000_0000


def test_16k_pages_total_and_32_mib_reservation() -> None:
    r = reservation(page_size="16K")
    assert (r.hyp_pgtable_total_pages, r.gib_allowance_pages) == (131, 35)
    assert (r.hyp_s1_pgtable_pages, r.host_s2_pgtable_pages) == (166, 182)
    assert r.vmemmap_pages == 5
    assert r.hyp_mem_pages == 353
    assert round(r.hyp_mem_pages * 16 * KIB / MIB, 1) == 5.5  # "353 pages = 5.5 MiB"
    assert r.reserved_bytes == 32 * MIB  # PMD = 32 MiB
    assert r.carveout_base == 0x1_8000_0000 - 32 * MIB


def test_16k_pages_v13_splits_147_plus_35() -> None:
    r = reservation(page_size="16K", profile="v5.13")
    assert (r.host_s2_mem_pages, r.host_s2_dev_pages) == (147, 35)


def test_64k_pages_total_and_512_mib_reservation() -> None:
    r = reservation(page_size="64K")
    assert (r.hyp_pgtable_total_pages, r.gib_allowance_pages) == (11, 5)
    assert (r.hyp_s1_pgtable_pages, r.host_s2_pgtable_pages) == (16, 32)
    assert r.vmemmap_pages == 5
    assert r.hyp_mem_pages == 53
    assert r.reserved_bytes == 512 * MIB  # PMD = 512 MiB
    assert r.carveout_base == 0x1_6000_0000  # top of DRAM minus 512 MiB, 512 MiB aligned


def test_exact_size_fallback_when_no_pmd_hole() -> None:
    # 256 MiB of 64K pages: T = M(4096) = 4, G = 5, S1 = 9, S2 = 25, H = 34,
    # V = ceil(34*4/64K) + M(1) = 5 -> 39 pages; a 512 MiB block cannot fit, so exact size.
    r = reservation(page_size="64K", memblocks=[Memblock(0x8000_0000, 256 * MIB)])
    assert r.hyp_mem_pages == 39
    assert not r.pmd_rounded
    assert r.reserved_bytes == 39 * 64 * KIB
    assert r.carveout_end == 0x8000_0000 + 256 * MIB


def test_pmd_attempt_prefers_any_block_with_an_aligned_hole() -> None:
    # The top block (1 MiB) cannot hold 22 MiB; the lower 4 GiB block takes it at its top.
    blocks = [Memblock(0x8000_0000, 4 * GIB), Memblock(0x2_0000_0000, 1 * MIB)]
    r = reservation(memblocks=blocks)
    assert r.reserved_bytes == 22 * MIB
    assert r.carveout_base == 0x1_7EA0_0000


def test_no_room_anywhere_is_an_error() -> None:
    # 1 MiB of RAM cannot hold G = 515 pages alone.
    with pytest.raises(ValueError, match="room"):
        reservation(memblocks=[Memblock(0x8000_0000, 1 * MIB)])


def test_129_memblocks_are_rejected() -> None:
    blocks = [f"{0x8000_0000 + i * 4 * MIB:#x}:2M" for i in range(129)]
    with pytest.raises(ValueError, match="128"):
        config(memblocks=blocks)
    assert len(config(memblocks=blocks[:128]).memblocks) == 128


# ---- carveout_base override ------------------------------------------------------------------


def test_carveout_base_override_pmd_aligned_keeps_rounding() -> None:
    r = reservation(carveout_base="0x1_0000_0000")
    assert r.carveout_base == 0x1_0000_0000
    assert r.reserved_bytes == 22 * MIB


def test_carveout_base_override_unaligned_to_pmd_is_exact_size() -> None:
    r = reservation(carveout_base="0x1_0000_1000")
    assert r.reserved_bytes == 5164 * 4 * KIB
    assert not r.pmd_rounded


@pytest.mark.parametrize(
    "base",
    [
        "0x1_0000_0800",  # not page aligned
        "0x4000_0000",  # below the memblock
        "0x1_8000_0000",  # just past its end
        "0x1_7FF0_0000",  # inside, but 1 MiB is not enough
    ],
)
def test_bad_carveout_base_is_rejected(base: str) -> None:
    with pytest.raises(ValueError, match="carveout_base"):
        reservation(carveout_base=base)


# ---- 1.2: vmemmap cost per GiB -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "page_size", "per_gib"),
    [
        ("32", "4K", 8 * MIB),
        ("32", "16K", 2 * MIB),
        ("32", "64K", 512 * KIB),
        ("4", "4K", 1 * MIB),
        ("4", "16K", 256 * KIB),
        ("4", "64K", 64 * KIB),
        ("2", "4K", 512 * KIB),
        ("2", "16K", 128 * KIB),
        ("2", "64K", 32 * KIB),
    ],
)
def test_vmemmap_bytes_per_gib(layout: str, page_size: str, per_gib: int) -> None:
    r = reservation(hyp_page_layout=layout, page_size=page_size)
    assert r.vmemmap_bytes_per_gib == per_gib


def test_layout_overrides_profile_entry_size() -> None:
    # v5.13 budgets with 4-byte entries: same H as example A, v5.14's fixed point.
    r = reservation(profile="v5.13", hyp_page_layout="4")
    assert r.host_s2_mem_pages == 2070
    assert r.vmemmap_pages == 10


# ---- vmemmap coverage (1.3) -------------------------------------------------------------------


def test_all_memory_vmemmap_v62_figures() -> None:
    assert all_memory_vmemmap_pages(EXAMPLE_A, 4, G4K) == 1024  # 4 MiB
    assert all_memory_vmemmap_pages(EXAMPLE_A, 32, G4K) == 8192  # 32 MiB
    assert all_memory_vmemmap_pages(EXAMPLE_B, 4, G4K) == 512 + 1536


def test_all_memory_vmemmap_counts_a_shared_page_once() -> None:
    # Two 2 MiB blocks 1 MiB apart: pfns 0x80000..0x80200 and 0x80300..0x80500; with 4-byte
    # entries their slices are bytes [0x200000, 0x200800) -> page 0x200000 (1 page) and
    # [0x200C00, 0x201400) -> pages 0x200000 and 0x201000 (2 pages). Page 0x200000 is
    # shared, so 2 pages in all, not 3.
    blocks = (Memblock(0x8000_0000, 2 * MIB), Memblock(0x8030_0000, 2 * MIB))
    assert all_memory_vmemmap_pages(blocks, 4, G4K) == 2


def test_coverage_figure_follows_the_setting() -> None:
    assert reservation(vmemmap_coverage="all").all_memory_vmemmap_pages == 1024
    assert reservation(memblocks=EXAMPLE_B).all_memory_vmemmap_pages == 2048
    # 'carveout': the carve-out's own slice, the partition's vmemmap region (6 pages in A)
    assert reservation(vmemmap_coverage="carveout").all_memory_vmemmap_pages == 6
    assert reservation(vmemmap_coverage="carveout", profile="v5.13").all_memory_vmemmap_pages == 44


def test_coverage_does_not_change_the_reservation() -> None:
    keys = ("hyp_mem_pages", "reserved_bytes", "carveout_base")
    carveout = reservation(vmemmap_coverage="carveout")
    everything = reservation(vmemmap_coverage="all")
    assert [getattr(carveout, k) for k in keys] == [getattr(everything, k) for k in keys]


@pytest.mark.parametrize(
    ("base", "end", "entry_bytes", "expected"),
    [
        (0x1_7EA0_0000, 0x1_8000_0000, 4, 6),
        (0x1_7EA0_0000, 0x1_8000_0000, 32, 44),
        (0x9_FDA0_0000, 0xA_0000_0000, 4, 10),  # base slice only 2 KiB aligned
        (0x9_FDA0_0000, 0xA_0000_0000, 32, 76),
    ],
)
def test_carveout_vmemmap_slice(base: int, end: int, entry_bytes: int, expected: int) -> None:
    assert vmemmap_backing_pages(base, end, entry_bytes, G4K) == expected


# ---- 1.5 / 1.6: partition --------------------------------------------------------------------


def partition(**values: Any) -> list[tuple[str, int, int]]:
    cfg = config(**values)
    layout = partition_carveout(compute_reservation(cfg), cfg)
    return [(r.name, r.base, r.nr_pages) for r in layout.regions]


def test_partition_example_a_v13() -> None:
    assert partition(profile="v5.13") == [
        ("vmemmap", 0x1_7EA0_0000, 44),
        ("hyp", 0x1_7EA2_C000, 2569),
        ("host_s2_mem", 0x1_7F43_5000, 2070),
        ("host_s2_dev", 0x1_7FC4_B000, 515),
        ("slack", 0x1_7FE4_E000, 434),
    ]


def test_partition_example_a_v14() -> None:
    cfg = config()
    layout = partition_carveout(compute_reservation(cfg), cfg)
    assert [(r.name, r.base, r.nr_pages) for r in layout.regions] == [
        ("vmemmap", 0x1_7EA0_0000, 6),
        ("hyp", 0x1_7EA0_6000, 2569),
        ("host_s2", 0x1_7F40_F000, 2585),
        ("slack", 0x1_7FE2_8000, 472),
    ]
    assert layout.region("host_s2").end == 0x1_7FE2_8000
    assert layout.used_end == 0x1_7FE2_8000
    assert layout.slack_pages == 472
    assert layout.regions[-1].end == 0x1_8000_0000


def test_partition_example_b_v13() -> None:
    regions = partition(profile="v5.13", memblocks=EXAMPLE_B)
    assert [(name, base) for name, base, _ in regions] == [
        ("vmemmap", 0x9_FDA0_0000),
        ("hyp", 0x9_FDA4_C000),
        ("host_s2_mem", 0x9_FEC5_B000),
        ("host_s2_dev", 0x9_FFC7_7000),
        ("slack", 0x9_FFE7_A000),
    ]
    assert regions[0][2] == 76 and regions[-1][2] == 390


def test_partition_example_b_v14() -> None:
    regions = partition(memblocks=EXAMPLE_B)
    assert [(name, base) for name, base, _ in regions] == [
        ("vmemmap", 0x9_FDA0_0000),
        ("hyp", 0x9_FDA0_A000),
        ("host_s2", 0x9_FEC1_9000),
        ("slack", 0x9_FFE3_8000),
    ]
    assert regions[0][2] == 10 and regions[-1][2] == 456


def test_partition_carries_hyp_reserved_pages() -> None:
    cfg = config(hyp_s1_early_used_pages=100)
    assert partition_carveout(compute_reservation(cfg), cfg).hyp_reserved_pages == 100
    too_many = config(hyp_s1_early_used_pages=2570)  # S1 is 2569
    with pytest.raises(ValueError, match="hyp_s1_early_used_pages"):
        partition_carveout(compute_reservation(too_many), too_many)


def test_partition_rejects_a_mismatched_config() -> None:
    with pytest.raises(ValueError):
        partition_carveout(reservation(profile="v5.13"), config(profile="v5.14"))


def test_64k_partition_fits_with_large_slack() -> None:
    # 512 MiB = 8192 pages of 64K; vmemmap slice of 0x1_6000_0000..0x1_8000_0000 with 4-byte
    # entries: pfns 0x16000..0x18000 -> bytes 0x58000..0x60000 = 32 KiB -> 1 page.
    regions = partition(page_size="64K")
    assert [(n, p) for n, _, p in regions] == [
        ("vmemmap", 1),
        ("hyp", 16),
        ("host_s2", 32),
        ("slack", 8192 - 49),
    ]


# ---- hyp_pool_extra_pages (A.3) ---------------------------------------------------------------


def test_hyp_pool_extra_pages_grow_s1_and_the_reservation() -> None:
    # 1000 extra pages: S1 = 3569, H = 6154; v5.14: ceil(6154*4/4096) = 7, + M(7) = 4 -> 11;
    # hyp_mem_pages = 6165 (24.08 MiB) -> 26 MiB.
    cfg = config(hyp_pool_extra_pages=1000)
    r = compute_reservation(cfg)
    assert r.hyp_s1_pgtable_pages == 3569
    assert r.host_s2_pgtable_pages == 2585
    assert r.vmemmap_pages == 11
    assert r.hyp_mem_pages == 6165
    assert r.reserved_bytes == 26 * MIB
    assert partition_carveout(r, cfg).region("hyp").nr_pages == 3569


# ---- comparison and JSON -----------------------------------------------------------------------


def test_compare_profiles_uses_each_profiles_layout() -> None:
    before, after = compare_profiles(config(hyp_page_layout="2", profile="v5.13"))
    assert (before.profile, before.entry_bytes, before.vmemmap_bytes_per_gib) == (
        Profile.V5_13,
        32,
        8 * MIB,
    )
    assert (after.profile, after.entry_bytes, after.vmemmap_bytes_per_gib) == (
        Profile.V5_14,
        4,
        1 * MIB,
    )
    assert (before.hyp_mem_pages, after.hyp_mem_pages) == (5199, 5164)


def test_json_dict_has_exactly_the_six_keys() -> None:
    figures = reservation().to_json_dict()
    assert figures == {
        "hyp_s1_pgtable_pages": 2569,
        "host_s2_pgtable_pages": 2585,
        "vmemmap_pages": 10,
        "hyp_mem_pages": 5164,
        "reserved_bytes": 22 * MIB,
        "vmemmap_bytes_per_gib": 1 * MIB,
    }
    assert tuple(figures) == JSON_KEYS


def test_json_detail_lives_under_one_key() -> None:
    figures = reservation(profile="v5.13").to_json_dict(detail=True)
    assert set(figures) == {*JSON_KEYS, "detail"}
    assert figures["detail"]["host_s2_mem_pages"] == 2070
    assert figures["detail"]["carveout_base"] == 0x1_7EA0_0000
