"""The simulator's reservation against the real kernel, booted in pKVM protected mode.

Each Debian arm64 kernel (6.1 4K, 6.12 4K and 16K, 6.18 4K and 16K, 7.3 4K and 16K) boots
under QEMU for several memory maps: one region of 1 to 64 GiB, or several NUMA nodes (several
memblock regions). The 6.18 and 7.3 maps are ones the profiles were not tuned to: sizes that
are not GiB multiples (1320M crosses a 2 MiB boundary if EL2 selftest pages were reserved),
three nodes, 24 GiB (16K: 32 MiB under a 4-byte hyp_page, 64 MiB under 8). The kernel's
`kvm [0]: Reserved N MiB` line is the expected value; the simulator's figure is what the
user-facing CLI prints, `pkvm-sim reserve --profile ... --page-size ... --memblock ... --json`
(`reserved_bytes`; the kernel prints whole MiB). Every boot must also reach `Protected ...
mode initialized successfully`: the carve-out was big enough for EL2's own partition.

Boots run two at a time, biggest maps first; the whole module takes 1 to 3 minutes on two
cores (a 64 GiB 4K boot is the longest, 20 to 60 s, spent initialising 16 M struct pages).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from pkvm_sim.tools.kernel_check import CheckRow, KernelImage, MemoryMap, run_checks

from .conftest import report

pytestmark = pytest.mark.qemu

# flavour -> memory maps. Sizes after '+' are further NUMA nodes (memblock regions).
MATRIX: dict[str, tuple[str, ...]] = {
    "6.1-4k": ("1G", "16G", "64G", "64M+9600M"),
    "6.12-4k": ("1G", "4G", "64G", "64M+8896M", "2G+2G+4G"),
    "6.12-16k": ("4G", "64G", "64M+8896M"),
    "6.18-4k": ("1320M", "2G+1G+1G"),
    "6.18-16k": ("24G",),
    "7.3-4k": ("3584M", "64M+8896M"),
    "7.3-16k": ("24G",),
}
BOOT_TIMEOUT_S = 150.0
CASES = [(flavour, memory) for flavour, maps in MATRIX.items() for memory in maps]


def cli_reserved_bytes(kernel: KernelImage, memory: MemoryMap) -> int:
    """reserved_bytes as `pkvm-sim reserve --json` prints it (the CLI users run)."""
    out = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "reserve", "--json", "--profile", kernel.profile,
         "--page-size", kernel.page_size, *memory.memblock_flags()],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    return int(json.loads(out)["reserved_bytes"])


@pytest.fixture(scope="module")
def boots(real_kernels: list[KernelImage]) -> dict[tuple[str, str], tuple[KernelImage, CheckRow]]:
    by_flavour = {k.flavour: k for k in real_kernels}
    missing = sorted(set(MATRIX) - set(by_flavour))
    assert not missing, f"kernels missing from the cache: {missing} (scripts/fetch-kernels)"
    pairs = [(by_flavour[flavour], MemoryMap.parse(memory)) for flavour, memory in CASES]
    start = time.monotonic()
    rows = run_checks(pairs, jobs=2, timeout_s=BOOT_TIMEOUT_S)
    results = {case: (kernel, row) for case, (kernel, _), row in zip(CASES, pairs, rows,
                                                                        strict=True)}
    report(f"{len(results)} boots in {time.monotonic() - start:.0f} s")
    for (flavour, memory), (kernel, row) in results.items():
        report(f"{flavour:9} {kernel.package} {kernel.version} ({row.kernel_release}): "
               f"{memory:10} kernel {row.kernel_mib} MiB, simulator {row.simulator_mib} MiB"
               f"  [{row.boot_seconds:.0f} s]")
    return results



@pytest.mark.timeout(900)
@pytest.mark.parametrize(("flavour", "memory"), CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_simulator_reserves_what_the_kernel_reserves(
    boots: dict[tuple[str, str], tuple[KernelImage, CheckRow]], flavour: str, memory: str
) -> None:
    kernel, row = boots[flavour, memory]
    assert row.kernel_mib is not None, f"no 'Reserved N MiB' line: {row.error}"
    assert row.protected, f"pKVM did not initialise: {row.error}"
    simulated = cli_reserved_bytes(kernel, MemoryMap.parse(memory))
    assert simulated >> 20 == row.kernel_mib, (
        f"{kernel.package} {kernel.version} on {memory}: kernel reserved {row.kernel_mib} MiB,"
        f" pkvm-sim reserve says {simulated / (1 << 20):.2f} MiB"
    )


def test_the_booted_kernel_is_the_cached_package(
    boots: dict[tuple[str, str], tuple[KernelImage, CheckRow]],
) -> None:
    """uname -r of the boot log names the package's kernel (linux-image-<release>)."""
    for kernel, row in boots.values():
        assert row.kernel_release is not None
        assert kernel.package == f"linux-image-{row.kernel_release}", (kernel, row)
