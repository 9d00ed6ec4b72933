"""The profile registry: one record per kernel version, and nobody else decides by version."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.layout import LAYOUTS
from pkvm_sim.core.profiles import (
    MAX_ORDER_FORMULAS,
    PROFILES,
    Profile,
    profile_names,
    profile_spec,
    version_key,
)

CORE = Path(__file__).resolve().parents[2] / "server" / "pkvm_sim"


def test_every_profile_has_exactly_its_own_record() -> None:
    assert set(PROFILES) == set(Profile)
    for profile, spec in PROFILES.items():
        assert spec.profile is profile
        assert spec.default_layout in LAYOUTS
        assert spec.max_order_formula in MAX_ORDER_FORMULAS
        # MAX_ORDER became inclusive in v6.4, and the formula with it
        assert spec.max_order_inclusive is (spec.max_order_formula == "v6.4")


def test_every_profile_has_one_pool_for_memory_and_one_for_mmio_faults() -> None:
    for spec in PROFILES.values():
        assert sum(p.memory_faults for p in spec.host_s2_pools) == 1, spec.profile
        assert sum(p.mmio_faults for p in spec.host_s2_pools) == 1, spec.profile
        # the PGD comes from the memory pool (kvm_host_prepare_stage2)
        assert spec.host_s2_pool_for(is_memory=True).pgd_pages


def test_series_facts() -> None:
    """Cover letter: v5.13 has a 32-byte hyp_page and split pools; v5.14 4 bytes, one pool."""
    before, after = PROFILES[Profile.V5_13], PROFILES[Profile.V5_14]
    assert (LAYOUTS[before.default_layout].entry_bytes, before.split_host_s2_pools) == (32, True)
    assert (LAYOUTS[after.default_layout].entry_bytes, after.split_host_s2_pools) == (4, False)
    # v5.13: only the MMIO pool recycles (a memory fault's -ENOMEM is fatal)
    assert not before.host_s2_pool_for(is_memory=True).recycles_mmio
    assert before.host_s2_pool_for(is_memory=False).recycles_mmio
    assert after.host_s2_pool_for(is_memory=True).recycles_mmio


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="v5.13, v5.14"):
        profile_spec("v4.19")
    with pytest.raises(ValueError, match="unknown profile"):
        SimConfig(profile="v4.19")  # type: ignore[arg-type]


def test_registry_order_is_oldest_first() -> None:
    names = profile_names()
    assert names[:2] == ("v5.13", "v5.14")
    versions = [version_key(n) for n in names]
    assert versions == sorted(versions)


def test_no_module_decides_by_comparing_profiles() -> None:
    """Decisions come from the record: `profile is Profile.X` / `== Profile.X` appear nowhere
    outside the registry (every `else` would silently mean one version)."""
    pattern = re.compile(r"(is|==|!=)\s+Profile\.V\d")
    offenders = [
        f"{path.relative_to(CORE)}:{n}"
        for path in CORE.rglob("*.py")
        if path.name != "profiles.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
