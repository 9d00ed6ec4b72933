"""The one place the load tool touches the SDK (`pkvm_client`).

Everything else in the package sees plain values: pfns as ints, refusals as `Refusal`
(gRPC code name + reason), pool figures as `PoolFigures`. When the SDK's public API moves
(typed results, pool enums, per-call timeouts), only this module changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pkvm_client import (
    AsyncHypervisor,
    AsyncVM,
    Batch,
    BatchResult,
    Hypervisor,
    PkvmError,
)

__all__ = [
    "AsyncHypervisor", "AsyncVM", "Batch", "BatchResult", "Hypervisor", "PkvmError",
    "PoolFigures", "Refusal", "ServerFigures", "VmFacts",
    "pool_figures", "refusal_of", "vm_facts",
]


@dataclass(frozen=True)
class Refusal:
    """A call that did not succeed: its gRPC status code name and pkvm.v1 reason."""

    code: str
    reason: str = ""

    @property
    def key(self) -> str:
        return f"{self.code}/{self.reason}" if self.reason else self.code


def refusal_of(error: PkvmError) -> Refusal:
    return Refusal(error.code.name, error.reason)


@dataclass(frozen=True)
class VmFacts:
    """What the load tool needs to know about a VM it created."""

    handle: int
    token: str
    slice_base_pfn: int
    slice_pages: int
    donated_pages: int


def vm_facts(vm: Any) -> VmFacts:
    info = vm.info
    return VmFacts(int(vm.handle), str(vm.token), int(info.slice_base_pfn),
                   int(info.slice_nr_pages), int(info.donated_pages))


@dataclass(frozen=True)
class PoolFigures:
    name: str
    free_pages: int
    total_pages: int
    free_blocks_per_order: tuple[int, ...]


@dataclass(frozen=True)
class ServerFigures:
    """One GetStats answer, as the load tool samples it."""

    nr_vms: int
    mmio_recycles: int  # host stage-2 MMIO recycles since boot
    pools: list[PoolFigures]


def pool_figures(stats: Any) -> ServerFigures:
    """The server's shared pools from a GetStats answer; per-VM pools ("vm/<handle>") are
    left out: they come and go with the VMs."""
    pools = [PoolFigures(str(p.name), int(p.free_pages), int(p.total_pages),
                         tuple(int(n) for n in p.free_blocks_per_order))
             for p in stats.pools if not str(p.name).startswith("vm/")]
    return ServerFigures(int(stats.nr_vms), int(stats.host_stage2.mmio_recycles), pools)
