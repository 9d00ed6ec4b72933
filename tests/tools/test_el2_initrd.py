"""The initrd of `kernel-check --lifecycle`: our newc writer read back by cpio(1), and /init
cross-compiled as a static arm64 executable (checked from its ELF header)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

from pkvm_sim.tools.el2_initrd import CROSS_CC, build_initrd, newc_archive

from tests.unavailable import unavailable

EM_AARCH64 = 183
PT_INTERP = 3


def test_cpio_reads_back_the_newc_archive(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        unavailable("cpio is not installed (Debian: cpio)")
    archive = newc_archive([
        ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
        ("init", stat.S_IFREG | 0o755, b"odd length!", 0),
    ])
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True,
                             check=True, timeout=60).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines] == ["dev", "dev/console", "init"]
    assert lines[1].startswith("crw-------") and "5,   1" in lines[1]
    assert lines[2].startswith("-rwxr-xr-x") and " 11 " in lines[2]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "init"], input=archive, cwd=out,
                   capture_output=True, check=True, timeout=60)
    assert (out / "init").read_bytes() == b"odd length!"


def test_init_is_a_static_arm64_executable(tmp_path: Path) -> None:
    if shutil.which(CROSS_CC) is None:
        unavailable(f"{CROSS_CC} is not installed (Debian: gcc-aarch64-linux-gnu "
                    "libc6-dev-arm64-cross)")
    build_initrd(tmp_path / "initrd.cpio", tmp_path)
    elf = (tmp_path / "init").read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64
    assert int.from_bytes(elf[18:20], "little") == EM_AARCH64
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize, phnum = (int.from_bytes(elf[54:56], "little"),
                        int.from_bytes(elf[56:58], "little"))
    types = [int.from_bytes(elf[phoff + i * phentsize: phoff + i * phentsize + 4], "little")
             for i in range(phnum)]
    assert PT_INTERP not in types  # static: no dynamic loader
