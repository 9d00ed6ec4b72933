"""The initrd of `kernel-check --lifecycle`: our static arm64 `/init` (el2_init/init.c),
cross-compiled with Debian's `aarch64-linux-gnu-gcc -static`, packed as a newc cpio archive.

    python -m pkvm_sim.tools.el2_initrd OUT.cpio      # build it by hand

The archive is written here rather than by cpio(1): it needs a `/dev/console` character
device (the kernel opens it for init's stdin/stdout before /init runs), which only root
could create in a staging folder.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CROSS_CC = "aarch64-linux-gnu-gcc"
INIT_SOURCE = Path(__file__).resolve().parent / "el2_init" / "init.c"
_CONSOLE_MAJOR, _CONSOLE_MINOR = 5, 1  # /dev/console


class InitrdError(RuntimeError):
    """The cross-compiler is missing or the build failed."""


def build_init(out: Path, source: Path = INIT_SOURCE) -> Path:
    """Cross-compile /init statically into `out`."""
    if shutil.which(CROSS_CC) is None:
        raise InitrdError(f"{CROSS_CC} not found (Debian: apt-get install "
                          "gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    done = subprocess.run([CROSS_CC, "-static", "-O2", "-Wall", "-o", str(out), str(source)],
                          capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise InitrdError(f"{CROSS_CC} failed:\n{done.stderr.strip()}")
    return out


def build_initrd(out: Path, workdir: Path) -> Path:
    """Compile /init in `workdir` and write the initrd (init, dev/console, proc, sys) to `out`."""
    init = build_init(workdir / "init")
    entries: list[tuple[str, int, bytes, int]] = [
        ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", _dev(_CONSOLE_MAJOR, _CONSOLE_MINOR)),
        ("proc", stat.S_IFDIR | 0o755, b"", 0),
        ("sys", stat.S_IFDIR | 0o755, b"", 0),
        ("init", stat.S_IFREG | 0o755, init.read_bytes(), 0),
    ]
    out.write_bytes(newc_archive(entries))
    return out


def _dev(major: int, minor: int) -> int:
    return (major << 8) | minor


def newc_archive(entries: Sequence[tuple[str, int, bytes, int]]) -> bytes:
    """A cpio 'newc' archive of (name, mode, data, rdev) entries, owned by root."""
    chunks: list[bytes] = []
    for inode, (name, mode, data, rdev) in enumerate(entries, start=1):
        chunks.append(_newc_member(inode, name, mode, data, rdev))
    chunks.append(_newc_member(0, "TRAILER!!!", 0, b"", 0))
    return b"".join(chunks)


def _newc_member(inode: int, name: str, mode: int, data: bytes, rdev: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev >> 8, rdev & 0xFF,
              len(encoded), 0)
    header = b"070701" + b"".join(f"{field:08x}".encode() for field in fields)
    member = header + encoded
    member += b"\0" * (-len(member) % 4)  # the name ends on a 4-byte boundary
    member += data
    return member + b"\0" * (-len(member) % 4)  # and so does the data


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m pkvm_sim.tools.el2_initrd OUT.cpio", file=sys.stderr)
        return 2
    out = Path(args[0])
    try:
        build_initrd(out, out.parent)
    except InitrdError as error:
        print(f"el2_initrd: {error}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
