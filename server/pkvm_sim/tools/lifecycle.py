"""`pkvm-sim scenario vm-lifecycle`: what VMs cost at EL2, step by step.

The six steps of the real-kernel review (issue 16), on one booted machine:

    boot           the machine after __pkvm_init
    vm1-1vcpu      a VM with 1 vCPU, created and each vCPU run once (KVM_RUN)
    vm1-destroyed  that VM closed
    vm2-4vcpus     a VM with 4 vCPUs, created and run
    vm2-and-vm3    plus a 1-vCPU VM, created and run
    all-destroyed  both closed

Per step: the hyp pool's free pages and EL2's stage-1 table pages (absolute), and the pages
donated to and shared with EL2 (counted from `boot`). Then, on a fresh machine of the same
kind, the VM limit: how many 1-vCPU VMs run (each kept open) before the first refusal.

`run_vm_lifecycle(config)` is the reusable part (the `capacity` command, tests);
`lifecycle_config(...)` builds the machine the real QEMU boots use by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pkvm_sim.core.config import Memblock, SimConfig
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.profiles import Profile, version_key

PHASES = ("boot", "vm1-1vcpu", "vm1-destroyed", "vm2-4vcpus", "vm2-and-vm3", "all-destroyed")
DEFAULT_MEMBLOCK = "0x40000000:4G"  # QEMU virt: RAM at 1 GiB
DEFAULT_VM_CAP = 1024
VM_SLICE_PAGES = 1  # the VMM's memory for the guest is host memory EL2 never sees here


@dataclass(frozen=True)
class Phase:
    phase: str
    hyp_pool_free_pages: int
    hyp_s1_table_pages: int  # EL2 stage-1 tables, boot ones included
    donated_pages: int  # pages donated to EL2 beyond those at boot
    shared_pages: int  # host pages shared with EL2 beyond those at boot


@dataclass
class LifecycleResult:
    profile: str
    phases: list[Phase] = field(default_factory=list)
    vm_limit: int | None = None  # None: no refusal up to the cap
    vm_limit_reason: str | None = None  # the first refusal's reason

    def as_json(self) -> dict[str, Any]:
        """The command's --json for one profile: {"phases": [...], "vm_limit": N}."""
        return {"phases": [asdict(p) for p in self.phases], "vm_limit": self.vm_limit}


def default_ia_bits(profile: str, page_size: int) -> int:
    """The host's IPA limit on QEMU's max CPU, as the kernel sees it: 52 with LPA2 (v6.9+,
    4K pages; the Debian 16K build is booted with lpa2=off) or 64K pages, else 48."""
    if page_size == 64 * 1024 or (version_key(profile) >= (6, 9) and page_size == 4096):
        return 52
    return 48


def lifecycle_config(profile: str, *, page_size: int = 4096, memblocks: list[str] | None = None,
                     cpus: int = 1, ia_bits: int | None = None,
                     carveout_base: int | None = None) -> SimConfig:
    """The machine of the real-kernel review unless told otherwise: RAM at 0x4000_0000."""
    blocks = tuple(Memblock.parse(m) for m in (memblocks or [DEFAULT_MEMBLOCK]))
    return SimConfig(profile=Profile(profile), page_size=page_size, memblocks=blocks, nr_cpus=cpus,
                     ia_bits=ia_bits if ia_bits is not None else default_ia_bits(profile,
                                                                                 page_size),
                     carveout_base=carveout_base)


def _donated_pages(hv: Hypervisor) -> int:
    """Host pages EL2 owns by donation: VM structs and PGDs, admitted memcache pages."""
    return sum(vm.donated_pages + len(vm.admitted) + len(vm.hyp_memcache)
               for vm in hv.vm_table.values())


def _shared_pages(hv: Hypervisor) -> int:
    """Host pages EL2 maps as shared, as a dump of EL2's stage-1 counts them: every share up
    to v6.15; from v6.16 (a share maps nothing) only the pinned ones."""
    shared = set(hv.hyp_shared) | set(hv.kernel_shared)
    if hv.pins_map:
        return len(shared & hv.hyp_stage1.mapped)
    return len(shared)


def _snapshot(hv: Hypervisor, phase: str, base: Phase | None) -> Phase:
    stats = hv.statistics(vm_pools=False)
    donated, shared = _donated_pages(hv), _shared_pages(hv)
    if base is not None:
        donated -= base.donated_pages
        shared -= base.shared_pages
    return Phase(phase, hv.hyp_pool.free_pages,
                 stats.hyp_stage1_boot_table_pages + stats.hyp_stage1_table_pages,
                 donated, shared)


def _vm(hv: Hypervisor, nr_vcpus: int) -> int:
    """KVM_CREATE_VM, its vCPUs, then each vCPU's first KVM_RUN."""
    handle = hv.create_vm(nr_vcpus=nr_vcpus, slice_pages=VM_SLICE_PAGES, run=False).handle
    hv.run_vm(handle)
    _first_guest_fault(hv, handle)
    return handle


def _first_guest_fault(hv: Hypervisor, handle: int) -> None:
    """v6.14+ (non-protected guests' stage-2 at EL2): the guest's first instruction fetch
    faults; user_mem_abort tops the vCPU memcache up to kvm_mmu_cache_min_pages (the guest
    stage-2's levels - 1: 3 with a 52-bit IPA and 4K pages) and shares the page with
    __pkvm_host_share_guest, whose refill donates those pages to EL2 and whose map takes
    the guest's tables from them. The other vCPUs run the same code: no second fault."""
    build = hv.build
    if build is None or not build.guest_stage2_at_el2:
        return
    vm = hv.guest_vm(handle)
    assert vm.pgt is not None
    hv.topup_memcache(handle, (4 - vm.pgt.start_level) - 1)
    hv.guest_map(handle, 0, vm.slice_base_pfn)


def run_vm_lifecycle(config: SimConfig, *, vm_cap: int = DEFAULT_VM_CAP) -> LifecycleResult:
    """The six steps on one machine, then the VM limit on a fresh one (audited after
    each step)."""
    hv = Hypervisor.boot(config)
    result = LifecycleResult(config.profile.value)
    boot = _snapshot(hv, "boot", None)
    absolute = Phase("boot", boot.hyp_pool_free_pages, boot.hyp_s1_table_pages, 0, 0)
    result.phases.append(absolute)

    def step(name: str) -> None:
        hv.audit()
        result.phases.append(_snapshot(hv, name, boot))

    vm1 = _vm(hv, 1)
    step("vm1-1vcpu")
    hv.destroy_vm(vm1)
    step("vm1-destroyed")
    vm2 = _vm(hv, 4)
    step("vm2-4vcpus")
    vm3 = _vm(hv, 1)
    step("vm2-and-vm3")
    hv.destroy_vm(vm2)
    hv.destroy_vm(vm3)
    step("all-destroyed")
    result.vm_limit, result.vm_limit_reason = vm_limit(config, vm_cap)
    return result


def vm_limit(config: SimConfig, vm_cap: int) -> tuple[int | None, str | None]:
    """1-vCPU VMs created and run, each kept open, until one is refused: (how many ran,
    the refusal's reason), or (None, None) when all `vm_cap` ran. A VM that cannot be
    created at all counts as a refusal too."""
    hv = Hypervisor.boot(config)
    for ran in range(vm_cap):
        handle = None
        try:
            handle = hv.create_vm(nr_vcpus=1, slice_pages=VM_SLICE_PAGES, run=False).handle
            hv.run_vm(handle)
        except PkvmError as error:
            return ran, error.reason
    return None, None


def plot_lifecycle(results: list[LifecycleResult], path: str, machine: str) -> None:
    """The hyp pool's free pages over the steps (one line per profile) and, below, what
    the steps hold at EL2: stage-1 tables, donated and shared pages."""
    from .plots import _pyplot, _save, check_output  # noqa: PLC0415 (matplotlib is optional)

    out = check_output(path)
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    steps = list(range(len(PHASES)))
    annotated: set[tuple[int, int]] = set()
    # Profiles often agree (v6.18 and v7.3 do on the pool): distinct markers and line styles
    # keep a line drawn under another visible, and each value is labelled once.
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for i, result in enumerate(results):
        free = [p.hyp_pool_free_pages for p in result.phases]
        marker, line = styles[i % len(styles)]
        top.plot(steps, free, marker=marker, linestyle=line, markerfacecolor="none",
                 label=f"{result.profile}: hyp pool free pages")
        for x, y in zip(steps, free, strict=True):
            if (x, y) in annotated:
                continue
            annotated.add((x, y))
            top.annotate(str(y), (x, y), textcoords="offset points", xytext=(0, 6),
                         ha="center", fontsize=8)
    top.set_ylabel("hyp pool free pages")
    top.set_title(f"vm-lifecycle: {machine}", loc="left", fontsize=10)
    top.margins(y=0.25)
    top.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(results),
               frameon=False)
    top.grid(alpha=0.3)
    width = 0.8 / (3 * len(results))
    for i, result in enumerate(results):
        for j, (key, label) in enumerate((("hyp_s1_table_pages", "stage-1 tables"),
                                          ("donated_pages", "donated"),
                                          ("shared_pages", "shared"))):
            values = [getattr(p, key) for p in result.phases]
            offset = (3 * i + j - (3 * len(results) - 1) / 2) * width
            bottom.bar([x + offset for x in steps], values, width,
                       label=f"{result.profile}: {label}")
    bottom.set_ylabel("pages")
    bottom.set_xticks(steps, list(PHASES), rotation=15, fontsize=8)
    bottom.margins(y=0.15)
    bottom.legend(fontsize=7, ncol=3 * len(results), loc="upper center",
                  bbox_to_anchor=(0.5, -0.22), frameon=False)
    bottom.grid(axis="y", alpha=0.3)
    _save(fig, out)


__all__ = ["DEFAULT_MEMBLOCK", "DEFAULT_VM_CAP", "LifecycleResult", "PHASES", "Phase",
           "default_ia_bits", "lifecycle_config", "plot_lifecycle", "run_vm_lifecycle",
           "vm_limit"]
