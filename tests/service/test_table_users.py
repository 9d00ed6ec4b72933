"""Who uses a hyp stage-1 table (service/table_users.py), against the core's own tables, and
who pays for it once its payer is gone (limits.choose_payer)."""

from __future__ import annotations

import pytest
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.limits import choose_payer
from pkvm_sim.service.table_users import (
    mapped_under,
    pages_under,
    run_time_tables,
    table_key,
    users_of,
)


@pytest.mark.parametrize("profile", ["v6.1", "v6.12", "v7.3"])
def test_every_run_time_table_is_used_by_the_vms_mapping_pages_under_it(profile: str) -> None:
    """Each table the core took from the hyp pool spans the pages our keys say, holds a page
    EL2 maps, and that page is a live VM's: its share or pin, its structs, its donations."""
    hv = Hypervisor.boot(SimConfig.from_mapping({"profile": profile}))
    vms = [hv.create_vm(nr_vcpus=2, slice_pages=2048) for _ in range(3)]
    for i, vm in enumerate(vms):
        for step in range(i + 1):
            pfn = vm.slice_base_pfn + 512 * step + i
            hv.host_share(vm.handle, pfn, 1)
            if hv.pins_map:
                hv.pin_shared(vm.handle, pfn, 1)
    stage1 = hv.hyp_stage1
    tables = run_time_tables(stage1)
    assert len(tables) == stage1.nr_tables > 0
    users = users_of(hv, tables.values())
    for pfn, key in tables.items():
        assert stage1.table_at(key) == pfn
        under = pages_under(stage1, key)
        assert table_key(stage1, under[0], key[0]) == key
        assert table_key(stage1, under[-1], key[0]) == key
        assert mapped_under(stage1, key), key
        assert users[key], key  # every page EL2 maps at run time is some VM's
        assert set(users[key]) <= {vm.handle for vm in vms}
    # Every VM with a share mapped under a run-time table is one of its users.
    for pfn, handle in hv.hyp_shared.items():
        if pfn in stage1.mapped:
            for level in stage1.table_levels:
                key = table_key(stage1, pfn, level)
                if key in users:  # else a boot table: never freed, charged to nobody
                    assert handle in users[key]

def test_the_payer_is_a_vm_of_the_same_client_then_the_oldest() -> None:
    client = {1: "alice", 2: "bob", 3: "alice", 4: None}.get
    assert choose_payer([2, 3], client, "alice") == 3
    assert choose_payer([2, 3], client, "bob") == 2
    assert choose_payer([3, 2], client, "carol") == 2
    assert choose_payer([4, 3], client, None) == 3
    assert choose_payer([], client, "alice") is None
