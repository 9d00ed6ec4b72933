"""EL2 at run time on the real kernel: `pkvm-sim kernel-check --lifecycle` (a subprocess, as
users run it) boots Debian's 6.1 and 6.12 4K kernels with our /init, which runs VMs through
/dev/kvm, and reads EL2's memory at each step through the QEMU monitor.

Expected values are the kernels' own behaviour, not the simulator's:
* the self-check (hyp-pool pages with refcount > 0 are exactly the stage-1 table pages)
  holds on every dump, else the machine reports an error;
* v6.12 keeps at most KVM_MAX_PVMS = 255 VMs at EL2 (arch/arm64/kvm/hyp/include/nvhe/pkvm.h,
  the VM table of __pkvm_init_vm), and the 256th VM is refused at its first KVM_RUN
  (kvm_arch_vcpu_run_pid_change -> pkvm_create_hyp_vm) with ENOMEM; v6.1 creates nothing
  at EL2 per VM, so 260 VMs run;
* 6.12 4 GiB 1 CPU after boot: 2534 free pool pages out of 2571, 37 stage-1 tables, and a
  1-vCPU VM donates 16 (guest PGD, 52-bit IPA) + 2 (pkvm_hyp_vm) + 2 (pkvm_hyp_vcpu) pages:
  the figures of an independent review that read the same memory;
* teardown gives everything back.
Four boots, two at a time: about 2 minutes on two busy cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.unavailable import unavailable

from .conftest import report

KERNELS = ("6.1-4k", "6.12-4k")
VM_CAP = 260  # above v6.12's 255, so both the refusal and its absence on v6.1 show
RUNS = {  # (memory, cpus, vm cap): one CLI run for both kernels
    "1cpu": ("4G", 1, VM_CAP),
    "4cpu": ("2G", 4, 0),
}

pytestmark = [pytest.mark.qemu]


def _kernel_check(memory: str, cpus: int, vm_cap: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "pkvm_sim.cli", "kernel-check", "--lifecycle", "--json",
               *(f"--kernel={k}" for k in KERNELS), "--memory", memory, "--cpus", str(cpus),
               "--vm-cap", str(vm_cap)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode in (0, 1), f"{' '.join(command)}: {done.stderr}"
    parsed: dict[str, Any] = json.loads(done.stdout)
    return parsed


@pytest.fixture(scope="module")
def machines(real_kernels: object) -> dict[str, dict[str, Any]]:
    """machine name (e.g. '6.12-4k-4G-1cpu') -> its record in the JSON output."""
    found: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=len(RUNS)) as pool:  # two QEMUs at a time
        outputs = list(pool.map(lambda run: _kernel_check(*run), RUNS.values()))
    for output in outputs:
        for record in output["machines"]:
            found[record["kernel"]["machine"]] = record
            k = record["kernel"]
            report(f"lifecycle {k['machine']}: {k['boot_seconds']} s, vm_limit "
                   f"{k['vm_limit']}, " + ", ".join(
                       f"{p['phase']} {p['hyp_pool_free_pages']}/{p['hyp_s1_table_pages']}"
                       for p in k["phases"]))
    return found


def _kernel(machines: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    record = machines[name]["kernel"]
    assert record["error"] is None, f"{name}: {record['error']}"
    return record


def _phases(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["phase"]: p for p in record["phases"]}


MACHINES = [f"{k}-{memory}-{cpus}cpu" for k in KERNELS for memory, cpus, _ in RUNS.values()]


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", MACHINES)
def test_every_dump_passes_the_self_check(machines: dict[str, dict[str, Any]], name: str
                                          ) -> None:
    record = _kernel(machines, name)
    assert [p["phase"] for p in record["phases"]] == [
        "boot", "vm1-1vcpu", "vm1-destroyed", "vm2-4vcpus", "vm2-and-vm3", "all-destroyed"]


@pytest.mark.parametrize("name", MACHINES)
def test_teardown_gives_everything_back(machines: dict[str, dict[str, Any]], name: str
                                        ) -> None:
    phases = _phases(_kernel(machines, name))
    for after in ("vm1-destroyed", "all-destroyed"):
        assert phases[after] == {**phases["boot"], "phase": after}


def test_v6_12_refuses_the_256th_vm_at_its_first_run(machines: dict[str, dict[str, Any]]
                                                     ) -> None:
    record = _kernel(machines, "6.12-4k-4G-1cpu")
    assert (record["vm_limit"], record["vm_limit_failed_call"], record["vm_limit_errno"]) == (
        255, "KVM_RUN", 12)
    extra = {p["phase"]: p for p in record["extra_phases"]}
    assert extra["vm-limit-destroyed"]["hyp_pool_free_pages"] == _phases(record)["boot"][
        "hyp_pool_free_pages"]


def test_v6_1_has_no_vm_limit(machines: dict[str, dict[str, Any]]) -> None:
    record = _kernel(machines, "6.1-4k-4G-1cpu")
    assert record["vm_limit"] is None and record["vm_cap"] == VM_CAP


def test_v6_12_figures_agree_with_the_independent_review(machines: dict[str, dict[str, Any]]
                                                         ) -> None:
    record = _kernel(machines, "6.12-4k-4G-1cpu")
    assert (record["hyp_pool_pages"], record["ia_bits"]) == (2571, 52)
    phases = _phases(record)
    assert (phases["boot"]["hyp_pool_free_pages"], phases["boot"]["hyp_s1_table_pages"]) == (
        2534, 37)
    assert phases["vm1-1vcpu"]["donated_pages"] == 16 + 2 + 2
    # 4 vCPUs: the PGD, one hyp VM, four hyp vCPUs of 2 pages each
    assert phases["vm2-4vcpus"]["donated_pages"] == 16 + 2 + 4 * 2


def test_v6_1_donates_nothing_per_vm(machines: dict[str, dict[str, Any]]) -> None:
    for phase in _kernel(machines, "6.1-4k-4G-1cpu")["phases"]:
        assert phase["donated_pages"] == 0, phase


@pytest.mark.parametrize("name", MACHINES)
def test_the_simulator_matches_the_kernel(machines: dict[str, dict[str, Any]], name: str
                                          ) -> None:
    record = machines[name]
    if record["simulator"] is None and any("no `scenario vm-lifecycle`" in d
                                           for d in record["differences"]):
        unavailable("this pkvm-sim has no `scenario vm-lifecycle` command")
    assert record["match"], "\n".join(record["differences"])


def test_a_kernel_that_never_reaches_init_is_reported(tmp_path: Path) -> None:
    """Not a kernel: QEMU runs garbage, no boot line comes; the check says so, exits 1, and
    leaves no QEMU behind (the timeout is the whole budget of the boot)."""
    if shutil.which("qemu-system-aarch64") is None:
        unavailable("qemu-system-aarch64 is not installed (Debian: qemu-system-arm)")
    image = tmp_path / "Image"
    image.write_bytes(b"\x00" * 65536)
    done = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "kernel-check", "--lifecycle", "--json",
         "--image", str(image), "--profile", "v6.12", "--timeout", "5"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)["machines"][0]
    assert "timeout after 5 s before /init finished" in record["kernel"]["error"]
    assert record["match"] is False
