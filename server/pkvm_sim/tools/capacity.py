"""`pkvm-sim capacity`: how many guests of one shape a machine carries, and what stops it.

    pkvm-sim capacity --profile v6.12 --vcpus 2 --guest-memory 1G --memblock 0x40000000:16G
    pkvm-sim capacity --profile all --guest-memory 64M --json
    pkvm-sim capacity --profile v6.1 --profile v6.12 --plot capacity.png
    pkvm-sim capacity --target 127.0.0.1:50051 --guest-memory 16M   # a running service

The core is booted for the machine (the usual machine flags), then VMs of the shape are added
one by one (`add_vm`) until the first refusal. The refusal names the limit that bound first:

    vm-table          the hyp VM table is full: KVM_MAX_PVMS (255) slots, from v6.2 on
                      (find_free_vm_table_entry -> -ENOMEM)
    hyp-pool          the hyp pool cannot give EL2's stage-1 a table page for a donation or
                      a share (hyp_complete_donation / hyp_complete_share -> -ENOMEM)
    host-ram          the host has no free run for the guest's memory (the VMM's slice), the
                      donated VM / vCPU structures, the guest PGD or memcache pages
    host-stage2-pool  the host stage-2 pool has no table page to annotate donated pages or
                      change a shared page's state, even after recycling MMIO mappings
    memcache          a guest map found too few pages in the VM pool and EL2's memcache
    service-cap       the service's own caps: its VM records (4096, where the kernel keeps
                      no VM table: v5.x extension VMs, v6.1's EL1-only VMs) or, against a
                      server, its quotas (QUOTA_EXCEEDED: max_vms, quota_slice_pages)
    max-vms           --max-vms was reached without a refusal
    not-modelled      no answer: the simulator refuses VMs of this profile (NOT_MODELLED)
                      until its run-time rules are implemented

What one VM costs is whatever the core's VM model says (`Hypervisor.create_vm`, host shares,
guest maps and memcache top-ups): `add_vm` is the single place a VM of a shape is built, so
capacity follows the model when its per-VM costs change.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from pkvm_sim.core.config import SimConfig, parse_size
from pkvm_sim.core.errors import PkvmError
from pkvm_sim.core.hypervisor import MAX_PAGES_PER_CALL, Hypervisor
from pkvm_sim.core.layout import GIB, MIB, ceil_div
from pkvm_sim.core.model import VmInfo
from pkvm_sim.core.pgtable import pgd_geometry
from pkvm_sim.core.profiles import (
    Operation,
    kernel_profile_names,
    profile_names,
)
from pkvm_sim.knobs import add_sim_arguments

from .plots import _pyplot, _save, check_output

EXIT_OK = 0
EXIT_USAGE = 2
# The machine flags capacity shares with serve and reserve (pkvm_sim/knobs.py); --profile is
# capacity's own (repeatable, or 'all').
CAPACITY_KNOBS = (
    "memblocks", "page_size", "hyp_page_layout", "vmemmap_coverage", "ia_bits", "nr_cpus",
    "carveout_base", "hyp_pool_extra_pages", "hyp_s1_early_used_pages",
)
DEFAULT_PROFILES = ("v6.1", "v6.12")
GUEST_IPA_BASE = 0x8000_0000  # where a guest's touched memory starts in its IPA space


class Limit(StrEnum):
    """The limit that refused the next VM (module docstring)."""

    VM_TABLE = "vm-table"
    HYP_POOL = "hyp-pool"
    HOST_RAM = "host-ram"
    HOST_S2_POOL = "host-stage2-pool"
    MEMCACHE = "memcache"
    SERVICE_CAP = "service-cap"
    MAX_VMS = "max-vms"
    NOT_MODELLED = "not-modelled"  # the profile's VM rules are not in the simulator yet
    OTHER = "other"  # a refusal none of the above explains: its reason is reported


# The core's refusal reasons, by the limit they mean (VM_TABLE_FULL: see binding_limit).
_LIMIT_OF_REASON = {
    "HYP_POOL_EXHAUSTED": Limit.HYP_POOL,
    "HOST_MEMORY_EXHAUSTED": Limit.HOST_RAM,
    "POOL_EXHAUSTED": Limit.HOST_S2_POOL,  # the only pool add_vm's steps allocate from
    "MEMCACHE_EMPTY": Limit.MEMCACHE,
    "QUOTA_EXCEEDED": Limit.SERVICE_CAP,
    "NOT_MODELLED": Limit.NOT_MODELLED,
}


@dataclass(frozen=True)
class GuestShape:
    """What each VM is: vCPUs, guest memory (the VMM's slice of host RAM), how much of it the
    guest touches (guest stage-2 maps, where the profile has them) and how many of its pages
    the host shares with EL2 beyond what VM creation itself shares."""

    vcpus: int = 2
    memory_bytes: int = GIB
    touched_bytes: int = 0
    host_shared_pages: int = 0

    def __post_init__(self) -> None:
        if self.vcpus < 1:
            raise ValueError(f"a guest needs at least one vCPU, not {self.vcpus}")
        if self.memory_bytes < 1:
            raise ValueError(f"guest memory must be > 0 bytes, not {self.memory_bytes}")
        if not 0 <= self.touched_bytes <= self.memory_bytes:
            raise ValueError("touched memory must be between 0 and the guest's memory")
        if self.host_shared_pages < 0:
            raise ValueError("host shares per VM must be >= 0")

    def slice_pages(self, page_size: int) -> int:
        return ceil_div(self.memory_bytes, page_size)

    def touched_pages(self, page_size: int) -> int:
        return ceil_div(self.touched_bytes, page_size)

    @property
    def label(self) -> str:
        """'2 vCPU, 1 GiB' (+ ', touches 64 MiB', + ', shares 4 pages')."""
        text = f"{self.vcpus} vCPU, {size_label(self.memory_bytes)}"
        if self.touched_bytes:
            text += f", touches {size_label(self.touched_bytes)}"
        if self.host_shared_pages:
            text += f", shares {self.host_shared_pages} pages"
        return text


def size_label(value: int) -> str:
    if value <= 0:
        return "unknown"
    if value % GIB == 0:
        return f"{value // GIB} GiB"
    if value % MIB == 0:
        return f"{value // MIB} MiB"
    if value % 1024 == 0:
        return f"{value // 1024} KiB"
    return f"{value} B"


# --------------------------------------------------------------------------------------------
# One VM of a shape: the single place the per-VM steps live
# --------------------------------------------------------------------------------------------


def add_vm(hv: Hypervisor, shape: GuestShape, name: str | None = None) -> VmInfo:
    """Build one more VM of `shape` on `hv`, as a VMM would, all or nothing.

    1. create it (`create_vm`: the VM table slot, the donated VM and vCPU structures and
       guest PGD, EL2's stage-1 maps of them, the slice of host RAM for guest memory);
    2. share `host_shared_pages` pages of its slice with EL2 (where the profile shares);
    3. touch `touched_bytes` of guest memory: one guest map per page, the host memcache
       topped up to the guest stage-2's minimum before each (kvm_mmu_cache_min_pages), where
       the profile maps guest memory at EL2 (v6.14+, or an extension profile).

    On a refusal the partly built VM is destroyed (what a VMM does when KVM_CREATE_VM or
    KVM_RUN fails) and the refusal is raised: the machine is left as it was before the call.
    """
    info = hv.create_vm(nr_vcpus=shape.vcpus, slice_pages=shape.slice_pages(hv.page_size),
                        name=name)
    try:
        _share_with_hyp(hv, info, shape.host_shared_pages)
        _touch_guest_memory(hv, info, shape.touched_pages(hv.page_size))
    except PkvmError:
        hv.destroy_vm(info.handle)
        raise
    return info


def _share_with_hyp(hv: Hypervisor, info: VmInfo, nr_pages: int) -> None:
    if not nr_pages or Operation.SHARE_HYP not in hv.operations:
        return
    nr_pages = min(nr_pages, info.slice_nr_pages)
    for offset in range(0, nr_pages, MAX_PAGES_PER_CALL):
        count = min(MAX_PAGES_PER_CALL, nr_pages - offset)
        hv.host_share(info.handle, info.slice_base_pfn + offset, count)


def _touch_guest_memory(hv: Hypervisor, info: VmInfo, nr_pages: int) -> None:
    if not nr_pages or Operation.GUEST_SHARE not in hv.operations:
        return
    start_level, _pgd_pages = pgd_geometry(hv.geometry, hv.config.ia_bits)
    min_pages = 3 - start_level  # kvm_mmu_cache_min_pages: a table page per level below the PGD
    for index in range(nr_pages):
        _topup_to(hv, info.handle, min_pages)
        hv.guest_map(info.handle, GUEST_IPA_BASE + index * hv.page_size,
                     info.slice_base_pfn + index)


def _topup_to(hv: Hypervisor, handle: int, min_pages: int) -> None:
    """The host's memcache holds at least `min_pages` afterwards (__topup_hyp_memcache fills
    up to min_pages; a top-up that adds its count gets there too: both are handled)."""
    cached = hv.topup_memcache(handle, 0)  # the host memcache's size, nothing added
    if cached < min_pages and hv.topup_memcache(handle, min_pages - cached) < min_pages:
        hv.topup_memcache(handle, min_pages)


# --------------------------------------------------------------------------------------------
# Adding VMs until the first refusal
# --------------------------------------------------------------------------------------------


@dataclass
class CapacityResult:
    """How many VMs of a shape one machine carried, what bound, and the pools at that point
    (after the last VM that fit: the refused one is undone)."""

    profile: str
    page_size: int
    memory_bytes: int
    shape: str
    vcpus: int
    guest_memory_bytes: int
    vms: int = 0
    binding_limit: str = ""
    reason: str = ""
    message: str = ""
    hyp_pool_pages: int = 0
    hyp_pool_free_pages: int = 0
    host_s2_pool_pages: int = 0
    host_s2_pool_free_pages: int = 0
    host_ram_free_pages: int = 0
    # the longest free run: a VM's guest memory is one run of host RAM in the model (its
    # slice), so RAM can refuse a guest while holding more free pages than it needs
    host_ram_largest_free_run_pages: int = 0
    vm_table_entries: int = 0  # the kernel's VM table (0: none; the service's 4096 apply)
    first_vm_hyp_pool_pages: int = 0  # hyp pool pages the first VM took
    first_vm_host_ram_pages: int = 0  # host RAM pages the first VM took (slice included)
    first_vm_donated_pages: int = 0
    first_vm_shared_pages: int = 0  # host pages shared with EL2 for the first VM
    # hyp pool free pages after each VM (0 = at boot): what --plot draws; not in --json
    hyp_pool_free_after_vm: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["hyp_pool_free_after_vm"]
        return out


def binding_limit(error: PkvmError | Any, kernel_vm_table: bool) -> Limit:
    """The limit a refusal means. VM_TABLE_FULL is the kernel's VM table only where the
    profile reserves one; elsewhere it is the service's own VM records (service-cap)."""
    reason = str(getattr(error, "reason", ""))
    if reason == "VM_TABLE_FULL":
        return Limit.VM_TABLE if kernel_vm_table else Limit.SERVICE_CAP
    return _LIMIT_OF_REASON.get(reason, Limit.OTHER)


def run_capacity(hv: Hypervisor, shape: GuestShape, *, max_vms: int | None = None,
                 on_vm: Callable[[Hypervisor, int], None] | None = None) -> CapacityResult:
    """Add VMs of `shape` to a booted machine until a refusal (or `max_vms`); the VMs stay,
    so the caller can inspect or audit the machine. `on_vm(hv, n)` runs after the n-th VM."""
    config = hv.config
    result = CapacityResult(
        profile=config.profile.value, page_size=hv.page_size,
        memory_bytes=sum(b.size for b in config.memblocks), shape=shape.label,
        vcpus=shape.vcpus, guest_memory_bytes=shape.memory_bytes,
        vm_table_entries=config.kernel.vm_table_entries,
    )
    result.hyp_pool_free_after_vm.append(hv.hyp_pool.free_pages)
    hyp_before, ram_before = hv.hyp_pool.free_pages, hv.host_memory.free_pages
    shared_before = hv.statistics(vm_pools=False).shared_pages
    while max_vms is None or result.vms < max_vms:
        try:
            info = add_vm(hv, shape, name=f"capacity-{result.vms}")
        except PkvmError as error:
            limit = binding_limit(error, kernel_vm_table=bool(result.vm_table_entries))
            result.binding_limit, result.reason = limit.value, error.reason
            result.message = error.message
            break
        result.vms += 1
        if result.vms == 1:
            result.first_vm_hyp_pool_pages = hyp_before - hv.hyp_pool.free_pages
            result.first_vm_host_ram_pages = ram_before - hv.host_memory.free_pages
            result.first_vm_donated_pages = info.donated_pages
            result.first_vm_shared_pages = (hv.statistics(vm_pools=False).shared_pages
                                            - shared_before)
        result.hyp_pool_free_after_vm.append(hv.hyp_pool.free_pages)
        if on_vm is not None:
            on_vm(hv, result.vms)
    else:
        result.binding_limit = Limit.MAX_VMS.value
        result.message = f"--max-vms {max_vms} reached without a refusal"
    _record_pools(hv, result)
    return result


def _record_pools(hv: Hypervisor, result: CapacityResult) -> None:
    result.hyp_pool_pages = hv.hyp_pool.nr_pages
    result.hyp_pool_free_pages = hv.hyp_pool.free_pages
    result.host_s2_pool_pages = sum(pool.nr_pages for pool in hv.host_pools)
    result.host_s2_pool_free_pages = sum(pool.free_pages for pool in hv.host_pools)
    result.host_ram_free_pages = hv.host_memory.free_pages
    result.host_ram_largest_free_run_pages = max(
        (nr for _base, nr in hv.host_memory.free_ranges()), default=0)


def capacity(config: SimConfig, shape: GuestShape, *,
             max_vms: int | None = None) -> CapacityResult:
    """Boot `config` and run capacity on it (ValueError for an impossible machine)."""
    return run_capacity(Hypervisor.boot(config), shape, max_vms=max_vms)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    default = GuestShape()
    parser.add_argument("--vcpus", type=int, default=default.vcpus,
                        help="vCPUs per guest (default %(default)s)")
    parser.add_argument("--guest-memory", default="1G", metavar="SIZE",
                        help="guest memory per VM: the VMM's slice of host RAM (default 1G)")
    parser.add_argument("--touch", default="0", metavar="SIZE",
                        help="guest memory each guest touches: guest stage-2 maps and memcache"
                        " top-ups, where the profile has them (v6.14+ rules; default 0)")
    parser.add_argument("--host-shares", type=int, default=0, metavar="PAGES",
                        help="pages of each VM's memory the host shares with EL2, beyond what"
                        " VM creation shares (default 0)")


def shape_from_args(args: argparse.Namespace) -> GuestShape:
    return GuestShape(vcpus=args.vcpus, memory_bytes=parse_size(args.guest_memory),
                      touched_bytes=parse_size(args.touch), host_shared_pages=args.host_shares)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = __doc__.split("\n\n", 2)[2]  # how it works and the binding limits
    add_sim_arguments(parser, only=CAPACITY_KNOBS)
    parser.add_argument("--profile", action="append", metavar="PROFILE",
                        choices=[*profile_names(), "all"],
                        help="kernel profile, repeatable, side by side; 'all' = every released"
                        f" kernel (default {','.join(DEFAULT_PROFILES)})")
    add_shape_arguments(parser)
    parser.add_argument("--max-vms", type=int, default=None, metavar="N",
                        help="stop after N VMs even without a refusal")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per profile (a list when several)")
    parser.add_argument("--plot", metavar="FILE.png|FILE.svg",
                        help="draw the hyp pool's free pages as VMs are added, per profile")
    parser.add_argument("--target", metavar="HOST:PORT",
                        help="add the VMs to a running service through the SDK instead"
                        " (its machine and caps; VMs are destroyed at the end)")


def selected_profiles(values: Sequence[str] | None) -> list[str]:
    if not values:
        return list(DEFAULT_PROFILES)
    names: list[str] = []
    for value in values:
        for name in (kernel_profile_names() if value == "all" else [value]):
            if name not in names:
                names.append(name)
    return names


def config_for(args: argparse.Namespace, profile: str) -> SimConfig:
    values = {name: getattr(args, name, None) for name in CAPACITY_KNOBS}
    values = {k: v for k, v in values.items() if v is not None}
    values["profile"] = profile
    return SimConfig.from_mapping(values)


def run(args: argparse.Namespace) -> int:
    try:
        shape = shape_from_args(args)
        if args.max_vms is not None and args.max_vms < 1:
            raise ValueError(f"--max-vms must be >= 1, not {args.max_vms}")
        if args.target:
            from .capacity_remote import remote_capacity

            _note_ignored_by_target(args)
            results = [remote_capacity(args.target, shape, max_vms=args.max_vms)]
        else:
            results = [capacity(config_for(args, profile), shape, max_vms=args.max_vms)
                       for profile in selected_profiles(args.profile)]
        if args.plot:
            check_output(args.plot)
    except ValueError as error:  # PlotError is one
        print(f"capacity: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.plot:
        plot_capacity(results, args.plot)
    if args.json:
        rows = [r.as_dict() for r in results]
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    else:
        print(render_table(results))
    return EXIT_OK


def _note_ignored_by_target(args: argparse.Namespace) -> None:
    """The server's machine and profile apply with --target: say which flags are ignored."""
    given = [name for name in ("profile", *CAPACITY_KNOBS) if getattr(args, name, None)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        print(f"capacity: note: {flags} ignored with --target (the server's machine applies)",
              file=sys.stderr)


# What the side-by-side table shows, in order: (label, CapacityResult attribute).
TABLE_ROWS = (
    ("VMs carried", "vms"),
    ("binding limit", "binding_limit"),
    ("refusal reason", "reason"),
    ("hyp pool pages", "hyp_pool_pages"),
    ("hyp pool free pages", "hyp_pool_free_pages"),
    ("host stage-2 pool pages", "host_s2_pool_pages"),
    ("host stage-2 pool free pages", "host_s2_pool_free_pages"),
    ("host RAM free pages", "host_ram_free_pages"),
    ("host RAM longest free run", "host_ram_largest_free_run_pages"),
    ("kernel VM table entries", "vm_table_entries"),
    ("first VM: hyp pool pages", "first_vm_hyp_pool_pages"),
    ("first VM: host RAM pages", "first_vm_host_ram_pages"),
    ("first VM: donated pages", "first_vm_donated_pages"),
    ("first VM: shared pages", "first_vm_shared_pages"),
)


def render_table(results: Sequence[CapacityResult]) -> str:
    """Profiles side by side, as `reserve --compare` prints them."""
    first = results[0]
    title = (f"capacity: {first.shape} guests; RAM {size_label(first.memory_bytes)},"
             f" {first.page_size // 1024}K pages")
    header = ("", *(r.profile for r in results))
    rows = [(label, *(str(getattr(r, attr)) for r in results)) for label, attr in TABLE_ROWS]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                         for i, cell in enumerate(row)).rstrip()

    notes = [f"{r.profile}: {r.message}" for r in results if r.message]
    return "\n".join([title, "", line(header), *(line(row) for row in rows), "", *notes])


def plot_capacity(results: Sequence[CapacityResult], out: str) -> None:
    """Left: the hyp pool's free pages as VMs are added, one line per profile, ending where
    the binding limit refused the next VM. Right: the VMs carried, labelled by that limit."""
    plt = _pyplot()
    fig, (pool_ax, bar_ax) = plt.subplots(1, 2, figsize=(12, 4.5),
                                          gridspec_kw={"width_ratios": [3, 2]})
    for r in results:
        xs = range(len(r.hyp_pool_free_after_vm))
        (line,) = pool_ax.plot(xs, r.hyp_pool_free_after_vm, label=r.profile)
        pool_ax.annotate(r.binding_limit, (r.vms, r.hyp_pool_free_after_vm[-1]),
                         textcoords="offset points", xytext=(4, 4), fontsize=8,
                         color=line.get_color())
    pool_ax.set_xlabel("VMs added")
    pool_ax.set_ylabel("hyp pool free pages")
    pool_ax.set_ylim(bottom=0)
    pool_ax.grid(alpha=0.3)
    pool_ax.legend()
    names = [r.profile for r in results]
    bars = bar_ax.bar(names, [r.vms for r in results], color="#4c72b0")
    for bar, r in zip(bars, results, strict=True):
        bar_ax.annotate(f"{r.vms}\n{r.binding_limit}", (bar.get_x() + bar.get_width() / 2,
                                                       bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    bar_ax.set_ylabel("VMs carried")
    bar_ax.margins(y=0.2)
    first = results[0]
    fig.suptitle(f"capacity: {first.shape} guests, {size_label(first.memory_bytes)} of RAM,"
                 f" {first.page_size // 1024}K pages")
    _save(fig, check_output(out))


__all__ = [
    "CapacityResult", "GuestShape", "Limit", "add_arguments", "add_vm", "binding_limit",
    "capacity", "run", "run_capacity",
]
