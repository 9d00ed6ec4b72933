"""`pkvm-sim kernel-check`: boot real arm64 kernels in pKVM protected mode under QEMU and
compare what they reserve for EL2 with what the simulator computes for the same memory map.

    scripts/fetch-kernels                         # once: Debian's 6.1 to 7.3 kernels, cached
    pkvm-sim kernel-check                         # every cached kernel x the default maps
    pkvm-sim kernel-check --kernel 6.12-16k --memory 4G --memory 64M+8896M --json
    pkvm-sim kernel-check --image ./Image --profile v6.12 --page-size 4K --memory 8G

Each boot is `qemu-system-aarch64 -M virt,virtualization=on` (software emulation) with
`kvm-arm.mode=protected`; no root filesystem is needed, since pKVM initialises long before
one is looked for. The kernel prints `kvm [0]: Reserved N MiB at 0x...` (kvm_hyp_reserve) and
later `Protected nVHE|hVHE mode initialized successfully`; QEMU is killed then. RAM starts at
0x4000_0000 on the virt machine; a memory map of several sizes is several NUMA nodes, which
follow each other and are several memblock regions. Big maps are backed by sparse files.

The kernel prints whole MiB, rounded down, so the comparison is of `reserved_bytes >> 20`.
Exit status: 0 when every boot matches, 1 when one differs or fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from pkvm_sim.core.config import Memblock, SimConfig, parse_size
from pkvm_sim.core.layout import GIB, MIB
from pkvm_sim.core.profiles import profile_help
from pkvm_sim.core.reservation import compute_reservation

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2

DEFAULT_CACHE = Path(os.environ.get("PKVM_SIM_KERNEL_CACHE", "/var/cache/pkvm-sim/kernels"))
MANIFEST = "kernels.tsv"  # written by scripts/fetch-kernels
QEMU = "qemu-system-aarch64"
RAM_BASE = 0x4000_0000  # first RAM address of QEMU's virt machine
FILE_BACKED_FROM = 8 * GIB  # larger maps are backed by sparse files (the host refuses ~24G+)
DEFAULT_MAPS = ("1G", "4G", "64G", "64M+9600M")
DEFAULT_TIMEOUT_S = 90.0

RESERVED_RE = re.compile(r"kvm \[\d+\]: Reserved (\d+) MiB at (0x[0-9a-fA-F]+)")
_PROTECTED_RE = re.compile(r"Protected (nVHE|hVHE) mode initialized successfully")
VERSION_RE = re.compile(r"Linux version (\S+) ")


@dataclass(frozen=True)
class KernelImage:
    """An arm64 kernel Image and the profile the simulator should model it with."""

    flavour: str  # e.g. '6.12-16k'
    profile: str  # a profile of the registry
    page_size: str  # '4K', '16K', '64K'
    package: str
    version: str  # the Debian package version, e.g. '6.12.117-1'
    image: Path


def load_manifest(cache: Path = DEFAULT_CACHE) -> list[KernelImage]:
    """The kernels scripts/fetch-kernels cached; [] when there are none."""
    path = cache / MANIFEST
    if not path.is_file():
        return []
    kernels = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) == 6:
            flavour, profile, page_size, package, version, image = fields
            kernels.append(KernelImage(flavour, profile, page_size, package, version, Path(image)))
    return [k for k in kernels if k.image.is_file()]


@dataclass(frozen=True)
class MemoryMap:
    """RAM as QEMU's virt machine lays it out: nodes back to back from 0x4000_0000."""

    node_bytes: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> MemoryMap:
        """'4G' (one region) or '64M+9600M' (two NUMA nodes, two memblock regions)."""
        sizes = tuple(parse_size(part) for part in text.split("+"))
        if not sizes or any(size <= 0 or size % (2 * MIB) for size in sizes):
            raise ValueError(f"memory map {text!r}: sizes must be positive multiples of 2M")
        return cls(sizes)

    @property
    def name(self) -> str:
        return "+".join(_size_name(size) for size in self.node_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(self.node_bytes)

    def memblocks(self) -> tuple[Memblock, ...]:
        blocks, base = [], RAM_BASE
        for size in self.node_bytes:
            blocks.append(Memblock(base, size))
            base += size
        return tuple(blocks)

    def memblock_flags(self) -> list[str]:
        """The `--memblock BASE:SIZE` flags of `pkvm-sim reserve` for this map."""
        return [f"--memblock={b.base:#x}:{_size_name(b.size)}" for b in self.memblocks()]

    def qemu_args(self, workdir: Path, cpus: int = 1) -> list[str]:
        """-m and, for several nodes or a big map, memory backends and NUMA nodes."""
        total = _size_name(self.total_bytes)
        if len(self.node_bytes) == 1 and self.total_bytes < FILE_BACKED_FROM:
            return ["-m", total]
        args = ["-m", total]
        for i, size in enumerate(self.node_bytes):
            if self.total_bytes >= FILE_BACKED_FROM:
                backing = f"memory-backend-file,mem-path={workdir / f'ram{i}'},share=on"
            else:
                backing = "memory-backend-ram"
            args += ["-object", f"{backing},id=m{i},size={size}"]
            if len(self.node_bytes) == 1:
                args += ["-machine", f"memory-backend=m{i}"]
            else:  # the CPUs sit in node 0; the other nodes are memory only
                cpu_list = "0" if cpus == 1 else f"0-{cpus - 1}"
                args += ["-numa", f"node,memdev=m{i},nodeid={i}"
                         + (f",cpus={cpu_list}" if i == 0 else "")]
        return args


def _size_name(size: int) -> str:
    for unit, suffix in ((GIB, "G"), (MIB, "M")):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


@dataclass(frozen=True)
class BootResult:
    """What one boot showed. `reserved_mib` is None when the line never came."""

    reserved_mib: int | None
    reserved_base: int | None
    protected: bool  # 'Protected ... mode initialized successfully' was seen
    kernel_release: str | None  # uname -r, from the 'Linux version' line
    seconds: float
    error: str | None = None
    log_tail: tuple[str, ...] = ()


def qemu_command(kernel: KernelImage, memory: MemoryMap, workdir: Path) -> list[str]:
    return [
        QEMU, "-M", "virt,virtualization=on,gic-version=3", "-cpu", "max,pauth-impdef=on",
        "-smp", "1", *memory.qemu_args(workdir), "-nographic", "-nic", "none", "-no-reboot",
        "-kernel", str(kernel.image),
        "-append", "console=ttyAMA0 earlycon kvm-arm.mode=protected panic=-1",
    ]


def boot(kernel: KernelImage, memory: MemoryMap, timeout_s: float = DEFAULT_TIMEOUT_S
         ) -> BootResult:
    """Boot under QEMU until pKVM reports it is initialised (or fails, or the timeout); QEMU
    is always killed and its sparse RAM files removed before this returns."""
    start = time.monotonic()
    reserved: tuple[int, int] | None = None
    release: str | None = None
    tail: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pkvm-kernel-check-") as tmp:
        proc = subprocess.Popen(
            qemu_command(kernel, memory, Path(tmp)), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            for line in lines_until(proc.stdout, start + timeout_s):
                tail = [*tail[-19:], line]
                if release is None and (m := VERSION_RE.search(line)):
                    release = m.group(1)
                if reserved is None and (m := RESERVED_RE.search(line)):
                    reserved = int(m.group(1)), int(m.group(2), 16)
                if _PROTECTED_RE.search(line):
                    return _result(reserved, True, release, start, None, tail)
                if "Kernel panic" in line:
                    return _result(reserved, False, release, start, "kernel panic", tail)
            error = ("QEMU exited" if proc.poll() is not None
                     else f"no 'initialized successfully' within {timeout_s:.0f} s")
            return _result(reserved, False, release, start, error, tail)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def _result(reserved: tuple[int, int] | None, protected: bool, release: str | None,
            start: float, error: str | None, tail: list[str]) -> BootResult:
    return BootResult(
        reserved_mib=reserved[0] if reserved else None,
        reserved_base=reserved[1] if reserved else None,
        protected=protected, kernel_release=release,
        seconds=round(time.monotonic() - start, 1), error=error, log_tail=tuple(tail),
    )


def lines_until(stream: IO[bytes], deadline: float) -> Iterator[str]:
    """Decoded lines of `stream` until EOF or the monotonic `deadline`."""
    selector = selectors.DefaultSelector()
    selector.register(stream, selectors.EVENT_READ)
    buffer = b""
    fd = stream.fileno()
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                yield raw.decode("utf-8", "replace").rstrip("\r")
    finally:
        selector.close()


def simulated_reserved_bytes(kernel: KernelImage, memory: MemoryMap) -> int:
    """What the simulator reserves for this kernel's profile and page size on this map."""
    config = SimConfig.from_mapping({
        "profile": kernel.profile, "page_size": kernel.page_size,
        "memblocks": memory.memblocks(),
    })
    return compute_reservation(config).reserved_bytes


@dataclass(frozen=True)
class CheckRow:
    flavour: str
    package: str
    version: str
    profile: str
    page_size: str
    memory: str
    memblocks: int
    kernel_mib: int | None
    simulator_mib: int
    simulator_bytes: int
    match: bool
    protected: bool
    kernel_release: str | None
    boot_seconds: float
    error: str | None


def check_one(kernel: KernelImage, memory: MemoryMap, timeout_s: float) -> CheckRow:
    simulated = simulated_reserved_bytes(kernel, memory)
    result = boot(kernel, memory, timeout_s)
    error = result.error
    if result.reserved_mib is None and error is None:
        error = "no 'kvm [0]: Reserved N MiB' line"
    return CheckRow(
        flavour=kernel.flavour, package=kernel.package, version=kernel.version,
        profile=kernel.profile, page_size=kernel.page_size, memory=memory.name,
        memblocks=len(memory.node_bytes), kernel_mib=result.reserved_mib,
        simulator_mib=simulated >> 20, simulator_bytes=simulated,
        match=result.protected and result.reserved_mib == simulated >> 20,
        protected=result.protected, kernel_release=result.kernel_release,
        boot_seconds=result.seconds, error=error,
    )


def run_checks(pairs: Sequence[tuple[KernelImage, MemoryMap]], *, jobs: int = 2,
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[CheckRow]:
    """Boot each (kernel, map) pair, `jobs` boots at a time; rows in the pairs' order."""
    # Biggest maps first: the longest boots start early and the pool drains evenly.
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][1].total_bytes)
    rows: dict[int, CheckRow] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {i: pool.submit(check_one, *pairs[i], timeout_s) for i in order}
        for i, future in futures.items():
            rows[i] = future.result()
    return [rows[i] for i in range(len(pairs))]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where scripts/fetch-kernels cached the kernels ({DEFAULT_CACHE})")
    parser.add_argument("--kernel", action="append", metavar="FLAVOUR",
                        help="cached kernel to boot, repeatable (default: all; e.g. 6.12-16k)")
    parser.add_argument("--image", type=Path, help="boot this arm64 Image instead")
    parser.add_argument("--profile", metavar=profile_help(), help="profile of --image")
    parser.add_argument("--page-size", metavar="4K|16K|64K", default="4K",
                        help="page size of --image (default 4K)")
    parser.add_argument("--memory", action="append", metavar="SIZE[+SIZE...]",
                        help="memory map, repeatable; '+' separates NUMA nodes "
                        f"(default: {' '.join(DEFAULT_MAPS)})")
    parser.add_argument("--jobs", type=int, default=2, help="boots at a time (default 2)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"seconds per boot (default {DEFAULT_TIMEOUT_S:.0f}; with "
                        "--lifecycle 900)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    lifecycle = parser.add_argument_group(
        "--lifecycle", "run VMs through /dev/kvm under the real kernel, read EL2's memory at "
        "each step and compare with `pkvm-sim scenario vm-lifecycle` (one boot per kernel, "
        "memory map and CPU count; default map 4G)")
    lifecycle.add_argument("--lifecycle", action="store_true",
                           help="the run-time check instead of the boot-line check")
    lifecycle.add_argument("--cpus", type=int, action="append", metavar="N",
                           help="CPUs of the machine (-smp), repeatable (default 1)")
    lifecycle.add_argument("--vm-cap", type=int, default=300, metavar="N",
                           help="VMs the VM-limit step tries at most (default 300; 0 skips)")
    lifecycle.add_argument("--vm-limit-keep", action="store_true",
                           help="power off with the VM-limit VMs alive (no vm-limit-destroyed "
                           "step): closing 255 VMs takes 7.x kernels over 15 minutes under "
                           "emulation with a 52-bit IPA")
    lifecycle.add_argument("--qemu-cpu", metavar="MODEL",
                           help="QEMU -cpu (default max,pauth-impdef=on, with lpa2=off for 16K "
                           "kernels; e.g. max,pauth-impdef=on,lpa2=off gives 4K kernels a "
                           "48-bit IPA limit)")
    lifecycle.add_argument("--show-map", action="store_true",
                           help="print EL2's stage-1 at boot (VA -> PA ranges, state, tables)")
    lifecycle.add_argument("--saved", type=Path, nargs="+", metavar="FILE",
                           help="compare kernel records saved by --save (JSON) with the "
                           "simulator instead of booting")
    lifecycle.add_argument("--simulator", metavar="COMMAND",
                           help="the pkvm-sim to compare with, as a command line (default: "
                           "this one, `python -m pkvm_sim.cli`)")
    lifecycle.add_argument("--exact", action="store_true",
                           help="no placement allowance: every figure must be equal")
    lifecycle.add_argument("--save", type=Path, metavar="DIR",
                           help="write each machine's kernel figures (JSON) and EL2 stage-1 "
                           "map at boot (text) into DIR")


def select_kernels(args: argparse.Namespace) -> list[KernelImage]:
    if args.image is not None:
        if not args.profile:
            raise ValueError("--image needs --profile (the kernel version it is)")
        if not args.image.is_file():
            raise ValueError(f"--image {args.image}: no such file")
        return [KernelImage("image", args.profile, args.page_size.upper(), args.image.name,
                            "unknown", args.image)]
    cached = load_manifest(args.cache)
    if not cached:
        raise ValueError(f"no kernels cached in {args.cache}: run scripts/fetch-kernels "
                         "(or pass --image)")
    if not args.kernel:
        return cached
    by_flavour = {k.flavour: k for k in cached}
    unknown = [f for f in args.kernel if f not in by_flavour]
    if unknown:
        raise ValueError(f"no cached kernel {', '.join(unknown)}: have "
                         f"{', '.join(by_flavour)}")
    return [by_flavour[f] for f in args.kernel]


def run(args: argparse.Namespace) -> int:
    if args.lifecycle:
        return run_lifecycle_cli(args)
    try:
        kernels = select_kernels(args)
        maps = [MemoryMap.parse(m) for m in (args.memory or DEFAULT_MAPS)]
        for kernel in kernels:  # a bad profile or page size is a usage error, before booting
            simulated_reserved_bytes(kernel, maps[0])
    except ValueError as error:
        print(f"kernel-check: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if shutil.which(QEMU) is None:
        print(f"kernel-check: error: {QEMU} not found (Debian: apt-get install "
              "qemu-system-arm)", file=sys.stderr)
        return EXIT_USAGE
    pairs = [(kernel, memory) for kernel in kernels for memory in maps]
    rows = run_checks(pairs, jobs=args.jobs, timeout_s=args.timeout or DEFAULT_TIMEOUT_S)
    print(render_json(rows) if args.json else render_table(rows))
    return EXIT_OK if all(row.match for row in rows) else EXIT_MISMATCH


def run_lifecycle_cli(args: argparse.Namespace) -> int:
    from pkvm_sim.tools import kernel_lifecycle as lifecycle
    from pkvm_sim.tools.el2_initrd import CROSS_CC

    simulator = shlex.split(args.simulator) if args.simulator else None
    if args.saved:
        try:
            saved = [lifecycle.load_truth(path) for path in args.saved]
        except ValueError as error:
            print(f"kernel-check: error: {error}", file=sys.stderr)
            return EXIT_USAGE
        checks = [lifecycle.compare(k, exact=args.exact, simulator=simulator) for k in saved]
        print(lifecycle.render_json(checks) if args.json else lifecycle.render_table(checks))
        return EXIT_OK if all(check.match for check in checks) else EXIT_MISMATCH
    try:
        kernels = select_kernels(args)
        maps = [MemoryMap.parse(m) for m in (args.memory or ("4G",))]
        cpu_counts = args.cpus or [1]
        if any(not 1 <= n <= 8 for n in cpu_counts):
            raise ValueError("--cpus must be 1 to 8")
        if args.vm_cap < 0:
            raise ValueError("--vm-cap must not be negative")
        for kernel in kernels:
            simulated_reserved_bytes(kernel, maps[0])
    except ValueError as error:
        print(f"kernel-check: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for tool, package in ((QEMU, "qemu-system-arm"),
                          (CROSS_CC, "gcc-aarch64-linux-gnu libc6-dev-arm64-cross")):
        if shutil.which(tool) is None:
            print(f"kernel-check: error: {tool} not found (Debian: apt-get install {package})",
                  file=sys.stderr)
            return EXIT_USAGE
    machines = [lifecycle.Machine(kernel, memory, cpus, args.qemu_cpu, args.vm_limit_keep)
                for kernel in kernels for memory in maps for cpus in cpu_counts]
    timeout_s = args.timeout or lifecycle.DEFAULT_LIFECYCLE_TIMEOUT_S
    checks = lifecycle.run_lifecycle_checks(machines, vm_cap=args.vm_cap, timeout_s=timeout_s,
                                            truth_dir=args.save, exact=args.exact,
                                            simulator=simulator)
    print(lifecycle.render_json(checks) if args.json
          else lifecycle.render_table(checks, show_map=args.show_map))
    return EXIT_OK if all(check.match for check in checks) else EXIT_MISMATCH


def render_json(rows: Sequence[CheckRow]) -> str:
    return json.dumps({"ok": all(r.match for r in rows), "boots": [asdict(r) for r in rows]},
                      indent=1)


def render_table(rows: Sequence[CheckRow]) -> str:
    header = ("kernel", "package version", "memory", "kernel MiB", "simulator MiB", "",
              "boot s")
    body = [
        (r.flavour, r.version, r.memory, "-" if r.kernel_mib is None else str(r.kernel_mib),
         str(r.simulator_mib), "ok" if r.match else f"DIFFERS{': ' + r.error if r.error else ''}",
         f"{r.boot_seconds:.1f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
             for row in [header, *body]]
    matched = sum(r.match for r in rows)
    lines.append(f"\n{matched}/{len(rows)} boots match the simulator")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pkvm-sim kernel-check",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
