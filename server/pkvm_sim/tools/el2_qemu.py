"""Boot a real kernel under QEMU with our /init and dump EL2's memory at each step.

The guest's /init (el2_init/init.c) prints `PKVM-STEP <name>` and waits for a line on the
console; meanwhile the QEMU monitor (a unix socket) stops the machine, `pmemsave`s the
carve-out (base and size from the kernel's `kvm [0]: Reserved N MiB at 0xBASE` line) into
`<workdir>/<step>.bin`, and lets it continue. Then the host writes the line and /init goes on.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pkvm_sim.core.layout import MIB
from pkvm_sim.tools.kernel_check import QEMU, RESERVED_RE, VERSION_RE, lines_until

_STEP_RE = re.compile(r"PKVM-STEP (\S+)")
_RESULT_RE = re.compile(r"PKVM-RESULT (.*)")


class LifecycleBootError(RuntimeError):
    """The boot did not get through the steps; `log_tail` has the last console lines."""

    def __init__(self, message: str, log_tail: Sequence[str]) -> None:
        super().__init__(message)
        self.log_tail = tuple(log_tail)


@dataclass
class LifecycleBoot:
    """What one boot produced: the dumps (one file per step) and /init's results."""

    carveout_base: int
    carveout_bytes: int
    dumps: dict[str, Path] = field(default_factory=dict)  # step -> file, in step order
    results: dict[str, str] = field(default_factory=dict)  # PKVM-RESULT key=value pairs
    kernel_release: str | None = None
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


def qemu_command(image: Path, initrd: Path, *, cpus: int, memory_args: Sequence[str],
                 monitor: Path, cpu_model: str, vm_cap: int, keep_vms: bool = False
                 ) -> list[str]:
    append = ("console=ttyAMA0 earlycon kvm-arm.mode=protected panic=-1 rdinit=/init "
              f"pkvm_vm_cap={vm_cap}" + (" pkvm_vm_keep=1" if keep_vms else ""))
    return [
        QEMU, "-M", "virt,virtualization=on,gic-version=3", "-cpu", cpu_model,
        "-smp", str(cpus), *memory_args, "-display", "none", "-serial", "stdio",
        "-monitor", f"unix:{monitor},server,nowait", "-nic", "none", "-no-reboot",
        "-kernel", str(image), "-initrd", str(initrd), "-append", append,
    ]


class Monitor:
    """The QEMU human monitor over its unix socket: one command at a time."""

    def __init__(self, path: Path, deadline: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        while True:
            try:
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._read_prompt(deadline)

    def _read_prompt(self, deadline: float) -> str:
        buffer = b""
        while not buffer.endswith(b"(qemu) "):
            self._sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("QEMU monitor closed")
            buffer += chunk
        return buffer.decode("utf-8", "replace")

    def command(self, line: str, deadline: float) -> str:
        self._sock.sendall(line.encode() + b"\n")
        return self._read_prompt(deadline)

    def close(self) -> None:
        self._sock.close()


def run_lifecycle(command: Sequence[str], monitor_path: Path, workdir: Path,
                  timeout_s: float, on_line: Callable[[str], None] | None = None
                  ) -> LifecycleBoot:
    """Run QEMU until /init powers off; dump the carve-out at every PKVM-STEP marker.
    QEMU is always gone when this returns or raises."""
    start = time.monotonic()
    deadline = start + timeout_s
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    boot: LifecycleBoot | None = None
    monitor: Monitor | None = None
    log: list[str] = []
    release: str | None = None
    finished = False
    try:
        for line in lines_until(proc.stdout, deadline):
            log.append(line)
            if on_line is not None:
                on_line(line)
            if release is None and (m := VERSION_RE.search(line)):
                release = m.group(1)
            if boot is None and (m := RESERVED_RE.search(line)):
                boot = LifecycleBoot(int(m.group(2), 16), int(m.group(1)) * MIB,
                                     kernel_release=release, log=log)
            if "PKVM-ERROR" in line or "Kernel panic" in line:
                raise LifecycleBootError(line.strip(), log[-30:])
            if "PKVM-" not in line:
                continue
            if boot is None:
                raise LifecycleBootError("no 'kvm [0]: Reserved' line before /init", log[-30:])
            if m := _RESULT_RE.search(line):
                boot.results.update(pair.partition("=")[::2] for pair in m.group(1).split())
            elif m := _STEP_RE.search(line):
                monitor = monitor or Monitor(monitor_path, deadline)
                boot.dumps[m.group(1)] = _dump(monitor, boot, workdir / f"{m.group(1)}.bin",
                                               deadline)
                proc.stdin.write(b"\n")  # /init goes on
                proc.stdin.flush()
            elif "PKVM-DONE" in line:
                finished = True
                boot.seconds = round(time.monotonic() - start, 1)
                return boot
        reason = "QEMU exited" if proc.poll() is not None else f"timeout after {timeout_s:.0f} s"
        raise LifecycleBootError(f"{reason} before /init finished", log[-30:])
    finally:
        if monitor is not None:
            monitor.close()
        _stop(proc, finished)


def _dump(monitor: Monitor, boot: LifecycleBoot, path: Path, deadline: float) -> Path:
    """Save the carve-out with the machine stopped, so that the dump is one instant."""
    monitor.command("stop", deadline)
    monitor.command(f'pmemsave {boot.carveout_base:#x} {boot.carveout_bytes:#x} "{path}"',
                    deadline)
    monitor.command("cont", deadline)
    return path


def _stop(proc: subprocess.Popen[bytes], finished: bool) -> None:
    """After /init's power-off let QEMU exit by itself (a few seconds), else kill it."""
    try:
        proc.wait(timeout=10 if finished else 0.1)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):  # stdin's pipe to a QEMU that is gone
                stream.close()
