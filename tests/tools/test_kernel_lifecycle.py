"""The comparison of `kernel-check --lifecycle`, on kernel records written by hand (the
QEMU side is tests/kernel/test_lifecycle.py): which differences it names, the placement
allowance, and the VM limit rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pkvm_sim.tools.kernel_lifecycle import (
    PHASES,
    KernelLifecycle,
    LifecycleCheck,
    Phase,
    differences,
    render_table,
)

# 6.12, 4 GiB, 1 CPU as a real boot showed it (pool 2571 pages)
REAL = {
    "boot": (2534, 37, 0, 0), "vm1-1vcpu": (2531, 40, 20, 3), "vm1-destroyed": (2534, 37, 0, 0),
    "vm2-4vcpus": (2531, 40, 26, 8), "vm2-and-vm3": (2531, 40, 46, 11),
    "all-destroyed": (2534, 37, 0, 0),
}


def kernel(vm_limit: int | None = 255, vm_cap: int = 300) -> KernelLifecycle:
    record = KernelLifecycle(machine="m", kernel="6.12-4k", profile="v6.12", page_size="4K",
                             memory="4G", cpus=1, cpu_model="max", vm_cap=vm_cap,
                             vm_limit=vm_limit, carveout_base=0x13DC00000,
                             carveout_bytes=26 << 20, ia_bits=52)
    record.phases = [Phase(name, *REAL[name]) for name in PHASES]
    return record


def simulated(changes: dict[tuple[str, str], int] | None = None, vm_limit: int | None = 255
              ) -> dict[str, Any]:
    phases = []
    for name in PHASES:
        free, tables, donated, shared = REAL[name]
        phase = {"phase": name, "hyp_pool_free_pages": free, "hyp_s1_table_pages": tables,
                 "donated_pages": donated, "shared_pages": shared}
        for (where, figure), value in (changes or {}).items():
            if where == name:
                phase[figure] = value
        phases.append(phase)
    return {"phases": phases, "vm_limit": vm_limit}


def test_equal_figures_are_no_difference() -> None:
    assert differences(kernel(), simulated()) == []


def test_a_boot_figure_must_be_exact() -> None:
    found = differences(kernel(), simulated({("boot", "hyp_pool_free_pages"): 2571}))
    assert found == ["boot: hyp_pool_free_pages kernel 2534, simulator 2571"]


def test_donated_pages_are_exact_even_with_vms_alive() -> None:
    found = differences(kernel(), simulated({("vm1-1vcpu", "donated_pages"): 2}))
    assert found == ["vm1-1vcpu: donated_pages kernel 20, simulator 2"]


def test_shared_pages_may_differ_by_one_page_per_live_vcpu() -> None:
    # vm2-and-vm3: five vCPUs alive -> 11 +- 5 passes, 17 does not
    assert differences(kernel(), simulated({("vm2-and-vm3", "shared_pages"): 6})) == []
    found = differences(kernel(), simulated({("vm2-and-vm3", "shared_pages"): 17}))
    assert found == ["vm2-and-vm3: shared_pages kernel 11, simulator 17 "
                     "(placement allowance 5)"]
    assert differences(kernel(), simulated({("vm2-and-vm3", "shared_pages"): 6}),
                       exact=True) != []


def test_tables_may_differ_by_one_per_object_el2_maps() -> None:
    # vm1-1vcpu on 6.12 (it donates): struct kvm, FP state, kvm_vcpu, PGD, pkvm_hyp_vm,
    # pkvm_hyp_vcpu: six objects, each may or may not need a new table
    assert differences(kernel(), simulated({("vm1-1vcpu", "hyp_s1_table_pages"): 46})) == []
    assert differences(kernel(), simulated({("vm1-1vcpu", "hyp_s1_table_pages"): 47})) != []
    assert differences(kernel(), simulated({("vm1-destroyed", "hyp_s1_table_pages"): 38})) != []


def test_without_donations_fewer_objects_are_mapped() -> None:
    record = kernel()
    record.phases = [Phase(p.phase, p.hyp_pool_free_pages, p.hyp_s1_table_pages, 0,
                           p.shared_pages) for p in record.phases]
    sim = simulated({(name, "donated_pages"): 0 for name in PHASES})
    # 6.1-like vm1-1vcpu: struct kvm, FP state, kvm_vcpu: three
    sim_phases = {p["phase"]: p for p in sim["phases"]}
    sim_phases["vm1-1vcpu"]["hyp_s1_table_pages"] = 43
    assert differences(record, sim) == []
    sim_phases["vm1-1vcpu"]["hyp_s1_table_pages"] = 44
    assert differences(record, sim) != []


def test_boot_tables_may_differ_by_two_per_cpu_past_the_first() -> None:
    record = kernel()
    record.cpus = 3  # per-CPU area and SVE state of CPUs 1 and 2: four
    assert differences(record, simulated({("boot", "hyp_s1_table_pages"): 33})) == []
    assert differences(record, simulated({("boot", "hyp_s1_table_pages"): 32})) != []
    assert differences(kernel(), simulated({("boot", "hyp_s1_table_pages"): 36})) != []


def test_a_missing_phase_is_named() -> None:
    sim = simulated()
    sim["phases"] = [p for p in sim["phases"] if p["phase"] != "vm2-4vcpus"]
    assert differences(kernel(), sim) == ["vm2-4vcpus: the simulator has no such phase"]


def test_vm_limit_rules() -> None:
    assert differences(kernel(255), simulated(vm_limit=256)) == [
        "vm_limit: kernel 255 (then None errno None), simulator 256"]
    # no refusal up to the cap: the simulator may refuse later, or never, but not sooner
    assert differences(kernel(None, vm_cap=300), simulated(vm_limit=None)) == []
    assert differences(kernel(None, vm_cap=300), simulated(vm_limit=400)) == []
    assert differences(kernel(None, vm_cap=300), simulated(vm_limit=255)) != []


def test_the_table_marks_each_differing_figure() -> None:
    sim = simulated({("boot", "hyp_pool_free_pages"): 2571, ("vm1-1vcpu", "shared_pages"): 4})
    check = LifecycleCheck(kernel(), sim, [], differences(kernel(), sim))
    text = render_table([check])
    assert "2534/2571 *" in text
    assert "3/4 ~" in text
    assert "DIFFERS boot: hyp_pool_free_pages kernel 2534, simulator 2571" in text
    assert text.endswith("0/1 machines match the simulator")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pkvm_sim.cli", "kernel-check", "--lifecycle",
                           *args], capture_output=True, text=True, timeout=120, check=False)


def test_bad_usage_exits_2_before_booting(tmp_path: Path) -> None:
    image = tmp_path / "Image"
    image.write_bytes(b"not booted")
    done = _cli("--image", str(image), "--profile", "v6.12", "--cpus", "9")
    assert (done.returncode, done.stdout) == (2, "")
    assert "--cpus must be 1 to 8" in done.stderr
    done = _cli("--image", str(tmp_path / "missing"), "--profile", "v6.12")
    assert done.returncode == 2 and "no such file" in done.stderr
    done = _cli("--image", str(image), "--profile", "v6.12", "--vm-cap", "-1")
    assert done.returncode == 2 and "--vm-cap" in done.stderr


FAKE_SIMULATOR = '''
import json, sys
args = sys.argv[1:]
assert args[:3] == ["scenario", "vm-lifecycle", "--json"], args
print(json.dumps(json.load(open(sys.argv[0] + ".json"))))
'''


def test_saved_records_are_compared_with_the_given_simulator(tmp_path: Path) -> None:
    """--saved reads a record --save wrote; --simulator runs another program (here a stand-in
    that checks its arguments and prints prepared figures); the exit status follows."""
    from pkvm_sim.tools.kernel_lifecycle import load_truth, write_truth

    saved = write_truth(kernel(), tmp_path)
    assert load_truth(saved).phases == kernel().phases
    fake = tmp_path / "fake_sim.py"
    fake.write_text(FAKE_SIMULATOR)
    (tmp_path / "fake_sim.py.json").write_text(json.dumps(simulated()))
    done = _cli("--saved", str(saved), "--simulator", f"{sys.executable} {fake}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1/1 machines match the simulator" in done.stdout
    (tmp_path / "fake_sim.py.json").write_text(
        json.dumps(simulated({("vm1-1vcpu", "donated_pages"): 19})))
    done = _cli("--saved", str(saved), "--simulator", f"{sys.executable} {fake}", "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["machines"][0]["differences"] == [
        "vm1-1vcpu: donated_pages kernel 20, simulator 19"]
    assert report["machines"][0]["simulator_command"][-6:] == [
        "--memblock=0x40000000:4G", "--carveout-base=0x13dc00000", "--cpus", "1",
        "--ia-bits", "52"]


def test_a_file_that_is_no_saved_record_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    done = _cli("--saved", str(bad))
    assert done.returncode == 2 and "not a saved kernel record" in done.stderr


def test_the_boot_map_is_printed_on_request() -> None:
    record = kernel()
    record.boot_map = ["VA start ... header", "0x1000 0x2000 -> 0x5000_0000 owned"]
    check = LifecycleCheck(record, simulated(), [], [])
    assert "0x1000 0x2000 -> 0x5000_0000 owned" in render_table([check], show_map=True)
    assert "0x5000_0000" not in render_table([check])


def test_the_vm_limit_keep_knob_reaches_the_guest_command_line(tmp_path: Path) -> None:
    """--vm-limit-keep: /init (el2_init/init.c) reads pkvm_vm_keep=1 from /proc/cmdline and
    powers off with the VM-limit VMs alive; without it nothing is added."""
    from pkvm_sim.tools.el2_qemu import qemu_command  # noqa: PLC0415

    def append(keep: bool) -> str:
        argv = qemu_command(tmp_path / "Image", tmp_path / "initrd", cpus=1, memory_args=[],
                            monitor=tmp_path / "mon", cpu_model="max", vm_cap=300,
                            keep_vms=keep)
        return argv[argv.index("-append") + 1]

    assert "pkvm_vm_keep=1" in append(True).split()
    assert "pkvm_vm_keep" not in append(False)
    source = (Path(__file__).resolve().parents[2] / "server" / "pkvm_sim" / "tools" / "el2_init"
              / "init.c").read_text()
    assert 'cmdline_number("pkvm_vm_keep", 0)' in source


SAVED_TODAY = sorted((Path(__file__).resolve().parents[1] / "data" / "lifecycle").glob("*.json"))


def test_the_saved_6_18_and_7_3_records_match_the_simulator() -> None:
    """The real 6.18.15 and 7.3.4 records (tests/data/lifecycle, 4K and 16K, several memory
    sizes and CPU counts) against `scenario vm-lifecycle` for the same machines, as
    `kernel-check --lifecycle --saved` judges them: every one matches."""
    from pkvm_sim.tools.kernel_lifecycle import compare, load_truth  # noqa: PLC0415

    assert len(SAVED_TODAY) == 6
    for path in SAVED_TODAY:
        kernel = load_truth(path)
        assert kernel.error is None
        check = compare(kernel)
        assert check.match, (path.name, check.differences)
        if kernel.vm_cap:  # 4G 4K: the limit was measured (--vm-limit-keep)
            assert (kernel.vm_limit, kernel.vm_limit_failed_call) == (255, "KVM_CREATE_VM")
