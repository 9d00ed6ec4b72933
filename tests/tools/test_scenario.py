"""`pkvm-sim scenario`: runs end to end and shows what the docs say it shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pkvm_sim.cli import main


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["scenario", *argv, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_default_machine_block_maps_mmio_in_both_profiles(
        capsys: pytest.CaptureFixture[str]) -> None:
    """One RAM region: MMIO in [0, 2 GiB) and above RAM is mapped with 1 GiB blocks, so the
    spans cost no table page and neither profile ever recycles."""
    out = run_json(capsys, "mmio-pressure", "--faults-per-span", "200")
    results = out["results"]
    assert isinstance(results, dict)
    for profile in ("v5.13", "v5.14"):
        r = results[profile]
        assert r["recycles"] == 0 and r["failures"] == 0
        assert r["mmio_pages_before_recycle"] == (2 << 30) // 4096  # two 1 GiB blocks
    assert results["v5.13"]["pool_pages"] == results["v5.14"]["pool_pages"]


def test_fragmented_machine_v5_14_maps_more_mmio_before_recycling(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "mmio-pressure", "--page-size", "16K", "--ram-fragments", "64",
                   "--hole", "1M", "--span-base", "0x80000000", "--faults-per-span", "500")
    results = out["results"]
    assert isinstance(results, dict)
    old, new = results["v5.13"], results["v5.14"]
    assert old["recycles"] > 0 and new["recycles"] == 0
    assert new["mmio_pages_before_recycle"] > old["mmio_pages_before_recycle"]
    assert old["failures"] == new["failures"] == 0


def test_refcount_limit_scenario_fails_visibly(capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(capsys, "refcount-limit")
    assert out["refcount_limit_hits"] == 2 and out["refcount_max"] == 8191
    first = out["first_failure"]
    assert isinstance(first, dict) and "REFCOUNT_OVERFLOW" in first["reason"]


def test_text_output_is_a_side_by_side_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "mmio-pressure", "--faults-per-span", "50"]) == 0
    text = capsys.readouterr().out
    assert "v5.13" in text and "v5.14" in text and "recycles" in text


@pytest.mark.parametrize("argv", [
    ["--spans", "lots"],
    # 1.6 MiB RAM fragments cannot hold the 52 MiB carve-out of a 64K-page machine.
    ["--page-size", "64K", "--ram-fragments", "100", "--hole", "64K"],
])
def test_bad_input_is_a_clear_error_not_a_crash(
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(["scenario", "mmio-pressure", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scenario: error: ") and "Traceback" not in err


@pytest.mark.parametrize(("ia_bits", "v5_13_recycles"), [(40, False), (48, True)])
def test_4k_mmio_pool_runs_dry_with_a_4_level_stage2(
        capsys: pytest.CaptureFixture[str], ia_bits: int, v5_13_recycles: bool) -> None:
    """With 4K pages and ia_bits 44 to 48 the host stage-2 has 4 levels, and level 0 (512 GiB
    per entry) holds no blocks: the first MMIO fault in each 512 GiB window needs a level-1
    table page. 3000 faults over 256 TiB touch nearly all 512 windows (about 511 pages), and
    the RAM/MMIO boundaries of 64 fragments need level-2/3 tables: more than v5.13's MMIO
    pool of G = 515 pages. With ia_bits 40 (3 levels from level 1, 1 GiB blocks) the same
    workload needs a few dozen pages. v5.14's one pool (2771 pages) holds either."""
    out = run_json(capsys, "mmio-pressure", "--ia-bits", str(ia_bits), "--ram-fragments", "64",
                   "--hole", "1M", "--span-base", "0x80000000", "--spans", "4G,256T",
                   "--faults-per-span", "3000")
    results = out["results"]
    assert isinstance(results, dict)
    assert out["ia_bits"] == ia_bits
    assert (results["v5.13"]["recycles"] > 0) is v5_13_recycles
    assert results["v5.14"]["recycles"] == 0
    assert results["v5.13"]["failures"] == results["v5.14"]["failures"] == 0


def test_all_profiles_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    """ia_bits 48: v6.x maps a whole 512 GiB window per MMIO fault (host_stage2_adjust_range),
    so of 300 faults over 256 TiB some land in windows already mapped (spurious) and fewer
    map anything than in v5.x, where every fault maps its own 1 GiB block. v6.16+ (v6.18,
    v7.3) maps one block of the first level that has blocks, 1 GiB here, as v5.x does."""
    out = run_json(capsys, "mmio-pressure", "--profile", "all", "--ia-bits", "48",
                   "--spans", "256T", "--faults-per-span", "300")
    results = out["results"]
    assert isinstance(results, dict)
    assert list(results) == ["v5.13", "v5.14", "v6.1", "v6.12", "v6.18", "v7.3"]
    mapped = {p: r["mmio_faults_before_recycle"] for p, r in results.items()}
    assert mapped["v5.13"] == mapped["v5.14"] == mapped["v6.18"] == mapped["v7.3"] == 300
    assert mapped["v6.1"] == mapped["v6.12"] < 300


# -- vm-lifecycle: what a VM costs at EL2 (issue 16) -------------------------------------------

# Real kernels under QEMU (-M virt, -cpu max, protected mode), 4 GiB at 0x4000_0000, 1 CPU,
# EL2's memory read with the QEMU monitor after each step:
# (hyp pool free pages, stage-1 table pages, donated pages, shared pages).
REAL_4G_1CPU = {
    "v6.12": [(2534, 37, 0, 0), (2531, 40, 20, 3), (2534, 37, 0, 0), (2531, 40, 26, 8),
              (2531, 40, 46, 11), (2534, 37, 0, 0)],
    "v6.1": [(2536, 33, 0, 0), (2535, 34, 0, 5), (2536, 33, 0, 0), (2535, 34, 0, 13),
             (2535, 34, 0, 16), (2536, 33, 0, 0)],
}
REAL_VM_LIMIT = {"v6.12": 255, "v6.1": None}  # 6.12: the 256th KVM_RUN fails; 6.1: none


@pytest.mark.parametrize("profile", ["v6.12", "v6.1"])
def test_vm_lifecycle_json_equals_the_real_kernel(capsys: pytest.CaptureFixture[str],
                                                  profile: str) -> None:
    out = run_json(capsys, "vm-lifecycle", "--profile", profile, "--cpus", "1",
                   "--memblock", "0x40000000:4G", "--vm-cap", "300")
    assert set(out) == {"phases", "vm_limit"}
    phases = out["phases"]
    assert isinstance(phases, list)
    assert [p["phase"] for p in phases] == ["boot", "vm1-1vcpu", "vm1-destroyed",
                                            "vm2-4vcpus", "vm2-and-vm3", "all-destroyed"]
    got = [(p["hyp_pool_free_pages"], p["hyp_s1_table_pages"], p["donated_pages"],
            p["shared_pages"]) for p in phases]
    assert got == REAL_4G_1CPU[profile]
    assert out["vm_limit"] == REAL_VM_LIMIT[profile]


# Real 6.18.15 and 7.3.4 (Debian 4K builds) under QEMU, RAM at 0x4000_0000, read by `pkvm-sim
# kernel-check --lifecycle --kernel 6.18-4k|7.3-4k --memory M --cpus N --vm-cap 0` with the
# v6.16+ dump reader (EL2's page state from the 8-byte hyp_page). Donated pages are the guest
# PGD (16), pkvm_hyp_vm (2), pkvm_hyp_vcpu (2 in 6.18, 3 in 7.3: 9040 B) per vCPU and the 3
# memcache pages of the guest's first fault; shared pages are the pinned struct kvm and
# kvm_vcpu. The VM limit: 255, the 256th KVM_CREATE_VM failing with ENOMEM (6.18.15 with
# --vm-cap 300; 7.3.4 with --vm-cap 300 --vm-limit-keep).
# The model was written against the 4G 1-CPU machines; 6G 2 CPUs and 2G are checks.
REAL_TODAY = {
    ("v6.18", "4G", 1): [(2536, 35, 0, 0), (2533, 38, 23, 4), (2536, 35, 0, 0),
                         (2534, 37, 29, 9), (2534, 37, 52, 13), (2536, 35, 0, 0)],
    ("v7.3", "4G", 1): [(2536, 35, 0, 0), (2534, 37, 24, 5), (2536, 35, 0, 0),
                        (2534, 37, 33, 12), (2534, 37, 57, 17), (2536, 35, 0, 0)],
    ("v6.18", "6G", 2): [(3554, 43, 0, 0), (3550, 47, 23, 4), (3554, 43, 0, 0),
                         (3552, 45, 29, 9), (3552, 45, 52, 13), (3554, 43, 0, 0)],
    ("v7.3", "2G", 1): [(1516, 29, 0, 0), (1515, 30, 24, 5), (1516, 29, 0, 0),
                        (1515, 30, 33, 12), (1515, 30, 57, 17), (1516, 29, 0, 0)],
}
# The 16K builds, booted with QEMU's lpa2=off (48-bit IPA: a 1-page guest PGD, hyp VM and
# vCPU 1 page each, 3 memcache pages), 4 GiB, 1 CPU.
REAL_TODAY_16K = {
    "v6.18": [(155, 13, 0, 0), (155, 13, 6, 2), (155, 13, 0, 0), (155, 13, 9, 4),
              (155, 13, 15, 6), (155, 13, 0, 0)],
    "v7.3": [(154, 14, 0, 0), (154, 14, 6, 3), (154, 14, 0, 0), (154, 14, 9, 5),
             (154, 14, 15, 6), (154, 14, 0, 0)],
}


@pytest.mark.parametrize(("profile", "memory", "cpus", "page_size"),
                         [(*key, "4K") for key in REAL_TODAY]
                         + [(p, "4G", 1, "16K") for p in REAL_TODAY_16K])
def test_vm_lifecycle_today_equals_the_real_kernel(capsys: pytest.CaptureFixture[str],
                                                   profile: str, memory: str,
                                                   cpus: int, page_size: str) -> None:
    """Donations and the VM limit exactly (and a 1-CPU boot); tables and shared pages within
    what the host's placement moves (kernel_lifecycle.placement_allowance: slab slots, 2 MiB
    windows, per-CPU areas), as `kernel-check --lifecycle` judges them."""
    from pkvm_sim.tools.kernel_lifecycle import Phase, placement_allowance  # noqa: PLC0415

    out = run_json(capsys, "vm-lifecycle", "--profile", profile, "--cpus", str(cpus),
                   "--memblock", f"0x40000000:{memory}", "--page-size", page_size,
                   "--vm-cap", "300")
    phases = out["phases"]
    assert isinstance(phases, list)
    assert out["vm_limit"] == 255
    figures = ("hyp_pool_free_pages", "hyp_s1_table_pages", "donated_pages", "shared_pages")
    table = (REAL_TODAY[profile, memory, cpus] if page_size == "4K"
             else REAL_TODAY_16K[profile])
    for sim, real in zip(phases, table, strict=True):
        kernel = Phase(sim["phase"], *real)
        for figure, real_value in zip(figures, real, strict=True):
            allowance = placement_allowance(kernel, figure, cpus)
            assert abs(sim[figure] - real_value) <= allowance, (sim["phase"], figure)
        assert sim["donated_pages"] == kernel.donated_pages
    if cpus == 1:
        assert phases[0]["hyp_s1_table_pages"] == table[0][1]


def test_vm_lifecycle_on_a_machine_it_was_not_written_for(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Real 6.12 under QEMU, 2 GiB at 0x4000_0000 (no RAM above 4 GiB), 1 CPU."""
    out = run_json(capsys, "vm-lifecycle", "--profile", "v6.12", "--memblock",
                   "0x40000000:2G", "--vm-cap", "300")
    phases = out["phases"]
    assert isinstance(phases, list)
    got = [(p["hyp_pool_free_pages"], p["hyp_s1_table_pages"], p["donated_pages"],
            p["shared_pages"]) for p in phases]
    assert got == [(1514, 31, 0, 0), (1511, 34, 20, 3), (1514, 31, 0, 0), (1511, 34, 26, 8),
                   (1511, 34, 46, 11), (1514, 31, 0, 0)]


def test_vm_lifecycle_without_lpa2_uses_a_48_bit_hyp_va(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Real 6.12 with QEMU's lpa2=off (IPA limit 48): a 4-level hyp stage-1 (33 boot tables,
    not 37) and a 1-page guest PGD (donations 1 + 2 + 2)."""
    out = run_json(capsys, "vm-lifecycle", "--profile", "v6.12", "--ia-bits", "48",
                   "--memblock", "0x40000000:4G", "--vm-cap", "0")
    phases = out["phases"]
    assert isinstance(phases, list)
    assert (phases[0]["hyp_pool_free_pages"], phases[0]["hyp_s1_table_pages"]) == (2538, 33)
    assert phases[1]["donated_pages"] == 5


def test_vm_lifecycle_table_and_plot(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    picture = tmp_path / "pool.png"
    assert main(["scenario", "vm-lifecycle", "--profile", "v6.12", "--profile", "v6.1",
                 "--vm-cap", "10", "--plot", str(picture)]) == 0
    text = capsys.readouterr().out
    assert "vm-lifecycle v6.12" in text and "vm-lifecycle v6.1" in text
    assert "255" not in text.split("VM limit")[1].splitlines()[0]  # capped at 10: none
    assert picture.stat().st_size > 10_000 and picture.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv", [["--ia-bits", "52", "--profile", "v6.1"],
                                  ["--memblock", "lots"], ["--vm-cap", "-1"]])
def test_vm_lifecycle_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                 argv: list[str]) -> None:
    assert main(["scenario", "vm-lifecycle", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scenario: error: ") and "Traceback" not in err


def test_vm_lifecycle_on_a_machine_without_a_modelled_build_says_why(
        capsys: pytest.CaptureFixture[str]) -> None:
    """v7.3 with 64K pages (no Debian build, so no run-time model): exit 2 and the reason,
    no traceback."""
    assert main(["scenario", "vm-lifecycle", "--profile", "v7.3", "--page-size", "64K",
                 "--vm-cap", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scenario: error: ") and "(NOT_MODELLED)" in err
    assert "Traceback" not in err
