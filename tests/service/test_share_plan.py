"""The service plans a share's stage-1 tables from one page per leaf-table span; the plan
must be the per-page walk's (HypStage1.missing_tables over every page)."""

from __future__ import annotations

import random

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.operations import planned_tables


@pytest.mark.parametrize("profile, page_size", [("v6.12", "4K"), ("v6.12", "16K"),
                                               ("v5.14", "4K"), ("v7.3", "4K")])
def test_the_sampled_plan_is_the_per_page_plan(profile: str, page_size: str) -> None:
    hv = Hypervisor.boot(SimConfig.from_mapping({"profile": profile, "page_size": page_size}))
    vm = hv.create_vm(nr_vcpus=1, slice_pages=8192)
    stage1 = hv.hyp_stage1
    rng = random.Random(7)
    # Some pages mapped already (their tables exist), in a few places.
    for pfn in rng.sample(range(vm.slice_base_pfn, vm.slice_base_pfn + 8192), 12):
        if pfn not in stage1.mapped:
            stage1.map_pages([pfn])
    for _ in range(300):
        nr = rng.choice([1, 2, 255, 256, 511, 512, 513, 1024, 4096])
        start = vm.slice_base_pfn + rng.randrange(8192 - nr + 1)
        per_page = stage1.missing_tables(range(start, start + nr))
        assert sorted(planned_tables(stage1, start, nr)) == sorted(per_page), (start, nr)
