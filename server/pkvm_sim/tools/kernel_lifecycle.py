"""`pkvm-sim kernel-check --lifecycle`: what EL2 does while VMs come and go, on the real
kernel, against `pkvm-sim scenario vm-lifecycle` for the same machine.

Each machine (cached kernel x memory map x CPU count) boots under QEMU with our static
`/init` (el2_init/init.c), which runs six steps through /dev/kvm and stops after each:

    boot           nothing created yet
    vm1-1vcpu      a VM with 1 vCPU, run once (the first KVM_RUN creates it at EL2 in v6.x)
    vm1-destroyed  its file descriptors closed
    vm2-4vcpus     a VM with 4 vCPUs, each run once
    vm2-and-vm3    plus a VM with 1 vCPU, run once
    all-destroyed  both closed

At each stop the QEMU monitor saves the carve-out, and el2_dump reads it: the hyp pool's
free pages, EL2's stage-1 table pages, and the pages donated to EL2 (leaves in state OWNED
that were not mapped at `boot`) and shared with it (SHARED_BORROWED, likewise), counted as
distinct physical pages. Then /init creates 1-vCPU VMs, each run once, until the first
refusal or `--vm-cap`: `vm_limit` is how many ran (None: no refusal up to the cap).

The simulator's figures come from a subprocess, `pkvm-sim scenario vm-lifecycle --json` with
the same machine flags, so the two stay decoupled; when that command is missing the check
says so and fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.profiles import VmemmapReservation
from pkvm_sim.core.reservation import compute_reservation
from pkvm_sim.tools.el2_dump import (
    CarveoutLayout,
    DumpUnreadable,
    HypPageLayout,
    StepFigures,
    mapped_ranges,
    read_step,
    render_ranges,
)
from pkvm_sim.tools.el2_initrd import build_initrd
from pkvm_sim.tools.el2_qemu import LifecycleBootError, qemu_command, run_lifecycle
from pkvm_sim.tools.kernel_check import KernelImage, MemoryMap

PHASES = ("boot", "vm1-1vcpu", "vm1-destroyed", "vm2-4vcpus", "vm2-and-vm3", "all-destroyed")
FIGURES = ("hyp_pool_free_pages", "hyp_s1_table_pages", "donated_pages", "shared_pages")
DEFAULT_VM_CAP = 300
DEFAULT_LIFECYCLE_TIMEOUT_S = 900.0
_IPA_RE = re.compile(r"kvm \[\d+\]: IPA Size Limit: (\d+) bits")


@dataclass(frozen=True)
class Machine:
    kernel: KernelImage
    memory: MemoryMap
    cpus: int
    qemu_cpu: str | None = None  # QEMU's -cpu, when not the default below
    # Power off with the VM-limit loop's VMs alive (no `vm-limit-destroyed` dump): 7.x
    # closes a VM in 2^22 steps with a 52-bit IPA (kvm_stage2_destroy, docs/model.md).
    keep_limit_vms: bool = False

    @property
    def name(self) -> str:
        name = f"{self.kernel.flavour}-{self.memory.name}-{self.cpus}cpu"
        if self.qemu_cpu is not None:
            name += "-" + re.sub(r"[^A-Za-z0-9=]+", "-", self.qemu_cpu)
        return name

    @property
    def cpu_model(self) -> str:
        if self.qemu_cpu is not None:
            return self.qemu_cpu
        # The 16K v6.12 kernel in protected mode hangs late in its boot with LPA2 present;
        # without LPA2 it reaches /init (and the host's IPA limit is 48 bits).
        if self.kernel.page_size == "16K":
            return "max,pauth-impdef=on,lpa2=off"
        return "max,pauth-impdef=on"


@dataclass(frozen=True)
class Phase:
    phase: str
    hyp_pool_free_pages: int
    hyp_s1_table_pages: int
    donated_pages: int
    shared_pages: int
    table_pages_by_level: dict[int, int] = field(default_factory=dict)


@dataclass
class KernelLifecycle:
    """What one real boot showed (error set, phases empty, when it could not be read)."""

    machine: str
    kernel: str
    profile: str
    page_size: str
    memory: str
    cpus: int
    cpu_model: str
    kernel_release: str | None = None
    carveout_base: int | None = None
    carveout_bytes: int | None = None
    ia_bits: int | None = None
    hyp_pool_base: int | None = None
    hyp_pool_pages: int | None = None
    vmemmap_pages: int | None = None
    vm_table_pages: int | None = None
    stage1_va_bits: int | None = None
    phases: list[Phase] = field(default_factory=list)
    vm_cap: int = DEFAULT_VM_CAP
    vm_limit: int | None = None
    vm_limit_failed_call: str | None = None
    vm_limit_errno: int | None = None
    extra_phases: list[Phase] = field(default_factory=list)  # vm-limit, vm-limit-destroyed
    boot_seconds: float = 0.0
    error: str | None = None
    boot_map: list[str] = field(default_factory=list)


def carveout_layout(kernel: KernelImage, memory: MemoryMap, base: int, size_bytes: int
                    ) -> CarveoutLayout:
    """The carve-out of this boot as divide_memory_pool cut it. The region sizes that have no
    other source (the hyp pool `hyp_s1_pgtable_pages`, the VM table) are the reservation
    formulas; a wrong one fails the dump's self-check rather than passing unnoticed."""
    config = SimConfig.from_mapping({"profile": kernel.profile, "page_size": kernel.page_size,
                                     "memblocks": memory.memblocks()})
    reservation = compute_reservation(config)
    return CarveoutLayout(
        base=base, size_bytes=size_bytes, page_size=config.geometry.page_size,
        memblocks=tuple((b.base, b.size) for b in memory.memblocks()),
        vmemmap_covers_all_memory=(
            config.kernel.vmemmap_reservation is VmemmapReservation.ALL_MEMORY),
        vm_table_pages=reservation.vm_table_pages,
        hyp_pool_pages=reservation.hyp_s1_pgtable_pages,
        hyp_page=HypPageLayout.of_entry_bytes(reservation.entry_bytes),
    )


def phases_from_steps(steps: Mapping[str, StepFigures]) -> list[Phase]:
    """The figures of each step, donated and shared counted against `boot`."""
    boot = steps["boot"]
    owned_at_boot = boot.pages_by_state["owned"]
    borrowed_at_boot = boot.pages_by_state["shared-borrowed"]
    return [
        Phase(name, figures.hyp_pool_free_pages, figures.hyp_s1_table_pages,
              len(figures.pages_by_state["owned"] - owned_at_boot),
              len(figures.pages_by_state["shared-borrowed"] - borrowed_at_boot),
              figures.table_pages_by_level)
        for name, figures in steps.items()
    ]


def measure(machine: Machine, initrd: Path, workdir: Path, *, vm_cap: int = DEFAULT_VM_CAP,
            timeout_s: float = DEFAULT_LIFECYCLE_TIMEOUT_S) -> KernelLifecycle:
    """Boot `machine`, dump EL2 at every step, read the dumps (deleted once read)."""
    kernel = machine.kernel
    result = KernelLifecycle(
        machine=machine.name, kernel=kernel.flavour, profile=kernel.profile,
        page_size=kernel.page_size, memory=machine.memory.name, cpus=machine.cpus,
        cpu_model=machine.cpu_model, vm_cap=vm_cap,
    )
    monitor = workdir / "monitor.sock"
    command = qemu_command(kernel.image, initrd, cpus=machine.cpus,
                           memory_args=machine.memory.qemu_args(workdir, machine.cpus),
                           monitor=monitor, cpu_model=machine.cpu_model, vm_cap=vm_cap,
                           keep_vms=machine.keep_limit_vms)
    try:
        boot = run_lifecycle(command, monitor, workdir, timeout_s)
    except (LifecycleBootError, OSError) as error:
        tail = getattr(error, "log_tail", ())
        result.error = f"{error}" + ("\n  " + "\n  ".join(tail[-8:]) if tail else "")
        return result
    result.kernel_release = boot.kernel_release
    result.carveout_base, result.carveout_bytes = boot.carveout_base, boot.carveout_bytes
    result.boot_seconds = boot.seconds
    result.ia_bits = next((int(m.group(1)) for line in boot.log
                           if (m := _IPA_RE.search(line))), None)
    _read_vm_limit(result, boot.results)
    layout = carveout_layout(kernel, machine.memory, boot.carveout_base, boot.carveout_bytes)
    result.hyp_pool_base, result.hyp_pool_pages = layout.hyp_pool_base, layout.hyp_pool_pages
    result.vmemmap_pages, result.vm_table_pages = layout.vmemmap_pages, layout.vm_table_pages
    steps: dict[str, StepFigures] = {}
    try:
        for name, dump in boot.dumps.items():
            steps[name] = read_step(dump.read_bytes(), layout)
            dump.unlink()
    except DumpUnreadable as error:
        result.error = f"step {name}: dump unreadable: {error}"
        return result
    missing = [p for p in PHASES if p not in steps]
    if missing:
        result.error = f"no dump for {', '.join(missing)}"
        return result
    phases = phases_from_steps(steps)
    result.phases = [p for p in phases if p.phase in PHASES]
    result.extra_phases = [p for p in phases if p.phase not in PHASES]
    result.stage1_va_bits = steps["boot"].stage1.va_bits
    result.boot_map = list(render_ranges(mapped_ranges(steps["boot"].stage1,
                                                       layout.page_size), layout))
    return result


def _read_vm_limit(result: KernelLifecycle, results: Mapping[str, str]) -> None:
    limit = results.get("vm_limit")
    if limit is None or limit == "none":
        return
    result.vm_limit = int(limit)
    result.vm_limit_failed_call = results.get("failed_call")
    result.vm_limit_errno = int(results["errno"]) if "errno" in results else None


def prepare_initrd(workdir: Path) -> Path:
    return build_initrd(workdir / "initrd.cpio", workdir)


# --------------------------------------------------------------------------------------------
# the simulator, as a subprocess
# --------------------------------------------------------------------------------------------


def default_simulator() -> list[str]:
    """This pkvm-sim, run as users run it."""
    return [sys.executable, "-m", "pkvm_sim.cli"]


def scenario_command(kernel: KernelLifecycle, simulator: Sequence[str] | None = None
                     ) -> list[str]:
    """`scenario vm-lifecycle --json` for the machine this kernel record was measured on."""
    assert kernel.carveout_base is not None
    return [
        *(simulator or default_simulator()), "scenario", "vm-lifecycle", "--json",
        "--profile", kernel.profile, "--page-size", kernel.page_size,
        *MemoryMap.parse(kernel.memory).memblock_flags(),
        f"--carveout-base={kernel.carveout_base:#x}", "--cpus", str(kernel.cpus),
        "--ia-bits", str(kernel.ia_bits or 48),
    ]


def simulate(command: Sequence[str]) -> dict[str, Any]:
    """Run `scenario vm-lifecycle --json`; ValueError says why it could not run."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        stderr = done.stderr.strip().splitlines()
        if "invalid choice" in done.stderr and "vm-lifecycle" in done.stderr:
            raise ValueError("this pkvm-sim has no `scenario vm-lifecycle` command yet")
        raise ValueError(f"`{' '.join(command)}` exited {done.returncode}: "
                         + (stderr[-1] if stderr else "no message"))
    try:
        parsed: dict[str, Any] = json.loads(done.stdout)
    except json.JSONDecodeError as error:
        raise ValueError(f"scenario vm-lifecycle printed no JSON: {error}") from error
    return parsed


# (VMs, vCPUs) alive at each step
LIVE_AT_PHASE = {"boot": (0, 0), "vm1-1vcpu": (1, 1), "vm1-destroyed": (0, 0),
                 "vm2-4vcpus": (1, 4), "vm2-and-vm3": (2, 5), "all-destroyed": (0, 0)}


def placement_allowance(phase: Phase, figure: str, cpus: int = 1) -> int:
    """How far the kernel's figure can move with where the host kernel happens to put
    things, which the simulator cannot know:
    * shared pages: `struct kvm_vcpu` comes from a slab cache (kvm_vcpu_cache), objects not
      page aligned, so kvm_share_hyp(vcpu, vcpu + 1) covers one page more or less by its
      offset, and neighbours share pages (`struct kvm` is kzalloc'ed whole pages): one page
      per live vCPU;
    * stage-1 tables (and so free pool pages) while VMs live: EL2 maps what the host shares
      and donates in its linear map, and needs a new last-level table for each 2 MiB of PA
      it had none in. Each separately allocated object can land in such a region, or not:
      per VM `struct kvm` and the task's FP state (kvm_arch_vcpu_run_map_fp), per vCPU
      `struct kvm_vcpu`; where the kernel donates (v6.12), also per VM the guest PGD and
      `pkvm_hyp_vm`, per vCPU `pkvm_hyp_vcpu`. Seen: 6.1 1 to 3 new tables for a 1-vCPU VM,
      1 to 4 for a 4-vCPU one; 6.12 1 to 3 (an independent review saw 4), 1 to 5 for the
      4-vCPU one, 1 to 6 for both VMs.
    * stage-1 tables at boot with several CPUs: each CPU's hyp per-CPU area
      (`recreate_hyp_mappings`) and, v6.12, its host SVE state (`pkvm_create_host_sve_mappings`)
      are separate host allocations mapped in the linear map; past the first CPU each can
      land in a 2 MiB region of its own, differently from boot to boot (6.12 2 GiB, 4 CPUs:
      31, 32 and 33 tables in three boots; one CPU: the same count in every boot).
    Donated pages and the VM limit are exact, and so is everything on a 1-CPU machine with
    no VM alive."""
    vms, vcpus = LIVE_AT_PHASE.get(phase.phase, (0, 0))
    if figure == "shared_pages":
        return vcpus
    if figure in ("hyp_s1_table_pages", "hyp_pool_free_pages"):
        objects = 2 * (cpus - 1) + 2 * vms + vcpus
        if phase.donated_pages:
            objects += 2 * vms + vcpus
        return objects
    return 0


def differences(kernel: KernelLifecycle, simulated: Mapping[str, Any], *,
                exact: bool = False) -> list[str]:
    """Each figure where the simulator differs from the kernel (beyond the placement
    allowance unless `exact`), named."""
    found: list[str] = []
    by_phase = {p.get("phase"): p for p in simulated.get("phases", [])}
    for phase in kernel.phases:
        sim = by_phase.get(phase.phase)
        if sim is None:
            found.append(f"{phase.phase}: the simulator has no such phase")
            continue
        for figure in FIGURES:
            real, model = getattr(phase, figure), sim.get(figure)
            allowance = 0 if exact else placement_allowance(phase, figure, kernel.cpus)
            if not isinstance(model, int) or abs(real - model) > allowance:
                within = f" (placement allowance {allowance})" if allowance else ""
                found.append(f"{phase.phase}: {figure} kernel {real}, simulator {model}{within}")
    sim_limit = simulated.get("vm_limit")
    if kernel.vm_limit is not None:
        if sim_limit != kernel.vm_limit:
            found.append(f"vm_limit: kernel {kernel.vm_limit} (then {kernel.vm_limit_failed_call}"
                         f" errno {kernel.vm_limit_errno}), simulator {sim_limit}")
    elif kernel.vm_cap > 0 and sim_limit is not None and sim_limit < kernel.vm_cap:
        found.append(f"vm_limit: kernel ran {kernel.vm_cap} VMs with no refusal, simulator "
                     f"{sim_limit}")
    return found


@dataclass
class LifecycleCheck:
    kernel: KernelLifecycle
    simulator: dict[str, Any] | None
    simulator_command: list[str]
    differences: list[str]

    @property
    def match(self) -> bool:
        return self.kernel.error is None and self.simulator is not None \
            and not self.differences


def check_machine(machine: Machine, initrd: Path, *, vm_cap: int, timeout_s: float,
                  exact: bool = False, simulator: Sequence[str] | None = None
                  ) -> LifecycleCheck:
    with tempfile.TemporaryDirectory(prefix="pkvm-lifecycle-") as tmp:
        kernel = measure(machine, initrd, Path(tmp), vm_cap=vm_cap, timeout_s=timeout_s)
    return compare(kernel, exact=exact, simulator=simulator)


def compare(kernel: KernelLifecycle, *, exact: bool = False,
            simulator: Sequence[str] | None = None) -> LifecycleCheck:
    """The kernel's figures against the simulator's for the same machine."""
    if kernel.error is not None or kernel.carveout_base is None:
        return LifecycleCheck(kernel, None, [], [f"kernel: {kernel.error}"])
    command = scenario_command(kernel, simulator)
    try:
        simulated = simulate(command)
    except (ValueError, subprocess.TimeoutExpired) as error:
        return LifecycleCheck(kernel, None, command, [f"simulator: {error}"])
    return LifecycleCheck(kernel, simulated, command,
                          differences(kernel, simulated, exact=exact))


def write_truth(kernel: KernelLifecycle, directory: Path) -> Path:
    """`<machine>.json` (everything but the map) and `<machine>.map.txt` in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    record = asdict(kernel)
    boot_map = record.pop("boot_map")
    path = directory / f"{kernel.machine}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    (directory / f"{kernel.machine}.map.txt").write_text("\n".join(boot_map) + "\n")
    return path


def load_truth(path: Path) -> KernelLifecycle:
    """A kernel record `write_truth` saved (ValueError when it is not one)."""
    try:
        record = json.loads(path.read_text())
        phases = [_phase(p) for p in record.pop("phases")]
        extra = [_phase(p) for p in record.pop("extra_phases")]
        kernel = KernelLifecycle(**record)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a saved kernel record ({error})") from error
    kernel.phases, kernel.extra_phases = phases, extra
    return kernel


def _phase(record: dict[str, Any]) -> Phase:
    levels = {int(level): pages for level, pages in record.pop("table_pages_by_level").items()}
    return Phase(**record, table_pages_by_level=levels)


def render_table(checks: Sequence[LifecycleCheck], show_map: bool = False) -> str:
    lines: list[str] = []
    for check in checks:
        k = check.kernel
        lines.append(f"== {k.machine} ({k.kernel_release or 'kernel ?'}; carve-out "
                     + (f"{k.carveout_bytes >> 20} MiB at {k.carveout_base:#x}"
                        if k.carveout_base is not None and k.carveout_bytes is not None
                        else "?") + f"; IPA {k.ia_bits} bits)")
        sim_phases = {p.get("phase"): p for p in (check.simulator or {}).get("phases", [])}
        header = ("phase", "free k/sim", "tables k/sim", "donated k/sim", "shared k/sim")
        rows: list[tuple[str, ...]] = [header]
        for phase in k.phases:
            sim = sim_phases.get(phase.phase, {})
            rows.append((phase.phase, *(
                f"{getattr(phase, f)}/{sim.get(f, '-')}"
                + _mark(check, phase.phase, f, getattr(phase, f) == sim.get(f))
                for f in FIGURES)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
        if k.vm_limit is not None:
            limit = f"{k.vm_limit} (then {k.vm_limit_failed_call} errno {k.vm_limit_errno})"
        else:
            limit = f"none up to {k.vm_cap}" if k.vm_cap else "not measured (--vm-cap 0)"
        sim_limit = (check.simulator or {}).get("vm_limit", "-")
        lines.append(f"vm_limit: kernel {limit}, simulator {sim_limit}")
        if show_map and k.boot_map:
            lines += ["EL2 stage-1 at boot:", *k.boot_map]
        lines += [f"DIFFERS {d}" for d in check.differences] or [
            "ok" + (" (~: within the placement allowance)" if any(
                "~" in cell for row in rows for cell in row) else "")]
        lines.append("")
    matched = sum(c.match for c in checks)
    lines.append("k/sim: kernel/simulator; *: differs; ~: differs within the placement "
                 "allowance (docs/kernel-lifecycle.md)")
    lines.append(f"{matched}/{len(checks)} machines match the simulator")
    return "\n".join(lines)


def _mark(check: LifecycleCheck, phase: str, figure: str, equal: bool) -> str:
    """'' equal, ' *' a difference, ' ~' unequal within the placement allowance."""
    if any(d.startswith(f"{phase}: {figure} ") for d in check.differences):
        return " *"
    return "" if equal or check.simulator is None else " ~"


def render_json(checks: Sequence[LifecycleCheck]) -> str:
    machines = []
    for check in checks:
        record = asdict(check.kernel)
        record.pop("boot_map")
        machines.append({"kernel": record, "simulator": check.simulator,
                         "simulator_command": check.simulator_command,
                         "differences": check.differences, "match": check.match})
    return json.dumps({"ok": all(c.match for c in checks), "machines": machines}, indent=1)


def run_lifecycle_checks(machines: Sequence[Machine], *, vm_cap: int, timeout_s: float,
                         truth_dir: Path | None = None, exact: bool = False,
                         simulator: Sequence[str] | None = None) -> list[LifecycleCheck]:
    """Check each machine in turn (one boot at a time: each runs hundreds of VMs)."""
    checks = []
    with tempfile.TemporaryDirectory(prefix="pkvm-initrd-") as tmp:
        initrd = prepare_initrd(Path(tmp))
        for machine in machines:
            check = check_machine(machine, initrd, vm_cap=vm_cap, timeout_s=timeout_s,
                                  exact=exact, simulator=simulator)
            if truth_dir is not None and check.kernel.error is None:
                write_truth(check.kernel, truth_dir)
            checks.append(check)
    return checks
