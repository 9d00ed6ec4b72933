"""The scrape snapshot: what it reads under the simulator lock."""

from __future__ import annotations

import pytest
from pkvm_sim.core import CORE_FLAVOUR
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hyp_pool import HypPool
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import take_snapshot


@pytest.fixture(scope="module")
def hv_with_vms() -> Hypervisor:
    hv = Hypervisor.boot(SimConfig())
    for _ in range(200):
        hv.create_vm(nr_vcpus=1, slice_pages=1)
    return hv


def pool_reads(hv: Hypervisor, per_vm: bool, monkeypatch: pytest.MonkeyPatch) -> int:
    if CORE_FLAVOUR == "compiled":  # compiled code calls the method directly, past any patch
        pytest.skip("counts calls by patching HypPool: runs on the pure core (make test-pure)")
    reads = 0
    real = HypPool.statistics

    def counting(pool: HypPool) -> object:
        nonlocal reads
        reads += 1
        return real(pool)

    with monkeypatch.context() as patch:
        patch.setattr(HypPool, "statistics", counting)
        snapshot = take_snapshot(hv, None, per_vm=per_vm)
    assert snapshot.statistics.nr_vms == 200
    return reads


def test_default_snapshot_reads_the_host_pools_only(hv_with_vms: Hypervisor,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    host_pools = 1 + len(hv_with_vms.host_pools)  # hyp + host stage-2
    assert pool_reads(hv_with_vms, False, monkeypatch) == host_pools


def test_per_vm_snapshot_reads_every_vm_pool(hv_with_vms: Hypervisor,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    host_pools = 1 + len(hv_with_vms.host_pools)
    assert pool_reads(hv_with_vms, True, monkeypatch) == host_pools + 200
