"""Preemption points (core/preempt.py): a long core operation calls the hook as it walks.

Expected counts come from the operation's shape, not from a run: a share of N pages in a
profile that maps shares at EL2 changes the host stage-2 state of each page (one walk per
page) and maps each page in EL2's stage-1 (one more walk per page), so it makes at least
2N walks and calls the hook at least 2N / WALKS_PER_POINT times.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pkvm_sim.core import preempt
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor

NR_PAGES = 256


@pytest.fixture
def calls() -> Iterator[list[int]]:
    seen: list[int] = []
    preempt.set_hook(lambda: seen.append(1))
    try:
        yield seen
    finally:
        preempt.set_hook(None)


def test_the_hook_runs_every_walks_per_point_calls(calls: list[int]) -> None:
    for _ in range(3 * preempt.WALKS_PER_POINT - 1):
        preempt.point()
    assert len(calls) == 2


def test_a_long_share_and_unshare_offer_the_interpreter_as_they_go(calls: list[int]) -> None:
    hv = Hypervisor.boot(SimConfig.from_mapping({"memblocks": ["0x80000000:256M"]}))
    vm = hv.create_vm(nr_vcpus=1, slice_pages=NR_PAGES)
    calls.clear()
    hv.host_share(vm.handle, vm.slice_base_pfn, NR_PAGES)
    assert len(calls) >= 2 * NR_PAGES // preempt.WALKS_PER_POINT
    calls.clear()
    hv.host_unshare(vm.handle, vm.slice_base_pfn, NR_PAGES)
    assert len(calls) >= 2 * NR_PAGES // preempt.WALKS_PER_POINT


def test_without_a_hook_nothing_is_called(calls: list[int]) -> None:
    preempt.set_hook(None)  # the hook `calls` counts is taken away again
    for _ in range(4 * preempt.WALKS_PER_POINT):
        preempt.point()  # and the core runs without a service too: no hook, no failure
    assert calls == []
