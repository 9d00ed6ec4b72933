"""`pkvm-sim scenario`: runs end to end and shows what the docs say it shows."""

from __future__ import annotations

import json

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
