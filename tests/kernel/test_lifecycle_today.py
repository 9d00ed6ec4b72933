"""EL2 at run time on the real 6.18 and 7.3 kernels (Debian 4K builds): `pkvm-sim
kernel-check --lifecycle --vm-limit-keep` boots them with our /init, reads EL2's memory at
each step, and compares with `scenario vm-lifecycle --profile v6.18|v7.3`.

Expected values are the kernels' behaviour (Debian linux-source-7.3, arch/arm64/kvm/; 6.18
from its image's BTF and these boots), not the simulator's:
* the 256th VM fails at KVM_CREATE_VM with ENOMEM: pkvm_init_host_vm -> __pkvm_reserve_vm
  takes the VM table slot (KVM_MAX_PVMS = 255) at creation;
* a 1-vCPU VM donates the guest PGD (16 pages at QEMU's 52-bit IPA limit), pkvm_hyp_vm
  (PAGE_ALIGN(4432 or 4496 + 8) = 2 pages), pkvm_hyp_vcpu (7344 B: 2 pages in 6.18, 9040 B:
  3 in 7.3) and the 3 memcache pages of the guest's first fault (kvm_mmu_cache_min_pages =
  stage-2 levels - 1 = 3); the structs it shares are pinned (hyp_pin_shared_mem), so they are
  mapped as shared, not donated;
* teardown gives everything back.
--vm-limit-keep powers off with the 255 VMs alive: 7.3 closes each VM by walking its 52-bit
IPA space 1 GiB at a time (kvm_stage2_destroy), which would take the run past 15 minutes.
Two boots, one at a time: about 3 minutes on two busy cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from .conftest import report

KERNELS = ("6.18-4k", "7.3-4k")
DONATED_VM1 = {"6.18-4k": 16 + 2 + 2 + 3, "7.3-4k": 16 + 2 + 3 + 3}

pytestmark = [pytest.mark.qemu]


@pytest.fixture(scope="module")
def machines(real_kernels: object) -> dict[str, dict[str, Any]]:
    command = [sys.executable, "-m", "pkvm_sim.cli", "kernel-check", "--lifecycle", "--json",
               *(f"--kernel={k}" for k in KERNELS), "--memory", "4G", "--cpus", "1",
               "--vm-cap", "260", "--vm-limit-keep"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False)
    assert done.returncode in (0, 1), f"{' '.join(command)}: {done.stderr}"
    found: dict[str, dict[str, Any]] = {}
    for record in json.loads(done.stdout)["machines"]:
        k = record["kernel"]
        found[k["kernel"]] = record
        report(f"lifecycle {k['machine']}: {k['boot_seconds']} s, vm_limit {k['vm_limit']} "
               f"at {k['vm_limit_failed_call']}")
    return found


def _kernel(machines: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    record = machines[name]["kernel"]
    assert record["error"] is None, f"{name}: {record['error']}"
    return record


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", KERNELS)
def test_the_256th_vm_fails_at_creation(machines: dict[str, dict[str, Any]], name: str) -> None:
    record = _kernel(machines, name)
    assert (record["vm_limit"], record["vm_limit_failed_call"], record["vm_limit_errno"]) == (
        255, "KVM_CREATE_VM", 12)


@pytest.mark.parametrize("name", KERNELS)
def test_donations_and_teardown(machines: dict[str, dict[str, Any]], name: str) -> None:
    phases = {p["phase"]: p for p in _kernel(machines, name)["phases"]}
    assert phases["vm1-1vcpu"]["donated_pages"] == DONATED_VM1[name]
    assert phases["vm1-1vcpu"]["shared_pages"] > 0  # pinned structs, told apart by hyp_page
    for after in ("vm1-destroyed", "all-destroyed"):
        assert phases[after] == {**phases["boot"], "phase": after}


@pytest.mark.parametrize("name", KERNELS)
def test_the_simulator_matches_the_kernel(machines: dict[str, dict[str, Any]], name: str
                                          ) -> None:
    record = machines[name]
    assert record["match"], "\n".join(record["differences"])
