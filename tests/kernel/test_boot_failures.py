"""A boot that never reports pKVM is a failure with a reason, and QEMU is always killed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pkvm_sim.cli import main
from pkvm_sim.tools.kernel_check import QEMU, KernelImage, MemoryMap, boot

from tests.unavailable import unavailable


@pytest.fixture
def garbage_image(tmp_path: Path) -> Path:
    if shutil.which(QEMU) is None:
        unavailable(f"{QEMU} is not installed (Debian: qemu-system-arm)")
    image = tmp_path / "Image"
    image.write_bytes(b"\0" * 4096)  # executes as nothing useful: no kernel log at all
    return image


def _qemu_children_running(image: Path) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return any(QEMU in line and str(image) in line for line in ps.stdout.splitlines())


def test_a_silent_boot_times_out_and_qemu_is_killed(garbage_image: Path) -> None:
    kernel = KernelImage("junk", "v6.12", "4K", "none", "none", garbage_image)
    result = boot(kernel, MemoryMap.parse("1G"), timeout_s=3)
    assert result.reserved_mib is None and not result.protected
    assert result.error is not None and "within 3 s" in result.error
    assert not _qemu_children_running(garbage_image)


def test_kernel_check_exits_1_when_a_boot_fails(
        garbage_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["kernel-check", "--image", str(garbage_image), "--profile", "v6.1",
                 "--memory", "1G", "--timeout", "3"])
    assert code == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "0/1 boots match" in out
