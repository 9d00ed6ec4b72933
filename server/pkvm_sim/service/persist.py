"""Keeping the machine across restarts: the service's half of `serve --state-file PATH`.

    start:    file exists -> restore it (core/state_file.py) instead of booting, then put
              back the VMs' tokens, their leases (as the time they had left) and the request
              counters before the first call is served; no file -> boot as usual
    SaveState (admin RPC) and SIGTERM/SIGINT (after in-flight calls finish): save

The file's configuration wins over the defaults; a knob the user set explicitly (flag,
environment or config file) that contradicts it is an error (`conflicts`), so a machine is
never silently restored as something the user did not ask for (docs/state-file.md).

A save holds the simulator lock only while it copies the state (lists, the vmemmap bytes);
compressing, checksumming and the atomic write happen outside it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.state_file import FORMAT_VERSION, StateFileError

from .counters import OP_NAMES

if TYPE_CHECKING:
    from .servicer import HypervisorServicer


@dataclass(frozen=True)
class SaveResult:
    path: str
    size_bytes: int
    seconds: float
    nr_vms: int
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Restored:
    """A machine read back from a state file, and the service's section of it."""

    hypervisor: Hypervisor
    config: SimConfig
    service: dict[str, Any]
    size_bytes: int


class StateKeeper:
    """The --state-file of one server: restores it at start, saves it on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._save_lock = threading.Lock()  # one save at a time (one temporary file)
        self._pending_service: dict[str, Any] | None = None

    def check_writable(self) -> None:
        """Refuse a path whose directory does not exist, before serving (not at SIGTERM)."""
        if not self.path.parent.is_dir():
            raise StateFileError(f"directory {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise StateFileError("not a regular file")

    def load(self) -> Restored | None:
        """The machine in the file, audited; None when there is no file yet."""
        self.check_writable()
        if not self.path.exists():
            return None
        decoded = state_file.load(self.path)
        hv = state_file.restore(decoded)
        tokens = {int(handle) for handle, _token in decoded.service.get("tokens", ())}
        if tokens != set(hv._vms):
            raise StateFileError(f"the tokens of VMs {sorted(tokens ^ set(hv._vms))} do not"
                                 " match the machine's VMs")
        self._pending_service = decoded.service
        return Restored(hv, hv.config, decoded.service, decoded.size_bytes)

    def attach(self, servicer: HypervisorServicer) -> None:
        """Give the servicer the restored tokens, leases and counters (before serving)."""
        servicer.state = self
        if self._pending_service is not None:
            restore_service(servicer, self._pending_service)
            self._pending_service = None

    def save(self, servicer: HypervisorServicer) -> SaveResult:
        started = time.perf_counter()
        with self._save_lock:
            with servicer.lock:
                hv = servicer.hypervisor
                snap = state_file.snapshot(hv, capture_service(servicer))
                nr_vms = len(hv._vms)
            size = state_file.write_snapshot(self.path, snap)
        return SaveResult(str(self.path), size, time.perf_counter() - started, nr_vms)


# -- the service section -------------------------------------------------------------------


def capture_service(servicer: HypervisorServicer) -> dict[str, Any]:
    """Tokens, leases (as seconds left) and counters; call under the simulator lock."""
    leases = servicer.leases
    now = leases.clock()
    counters = servicer.counters
    return {
        "tokens": [[handle, token] for handle, token in servicer.tokens._tokens.items()],
        "leases": [[handle, duration, max(0.0, leases._deadlines.get(handle, now) - now)]
                   for handle, duration in leases._durations.items()],
        "counters": {
            "requests": [[method, code, n] for (method, code), n in counters.requests().items()],
            "operations": dict(zip(OP_NAMES, counters.operations, strict=True)),
            "fault_failures": dict(counters.fault_failures),
            "vms_expired": counters.vms_expired,
        },
    }


def restore_service(servicer: HypervisorServicer, section: Mapping[str, Any]) -> None:
    """Put a saved service section back (`StateKeeper.load` checked it)."""
    tokens = {int(handle): str(token) for handle, token in section.get("tokens", ())}
    servicer.tokens._tokens.update(tokens)
    leases = servicer.leases
    now = leases.clock()
    for handle, duration, left in section.get("leases", ()):
        leases._durations[int(handle)] = float(duration)
        leases._deadlines[int(handle)] = now + float(left)
    counters = section.get("counters", {})
    counters_obj = servicer.counters
    for method, code, n in counters.get("requests", ()):
        counters_obj._requests[(str(method), str(code))] = int(n)
    for name, n in counters.get("operations", {}).items():
        if name in OP_NAMES:
            counters_obj.operations[OP_NAMES.index(name)] = int(n)
    for kind, n in counters.get("fault_failures", {}).items():
        counters_obj.fault_failures[str(kind)] = int(n)
    counters_obj.vms_expired = int(counters.get("vms_expired", 0))


# -- file vs flags -------------------------------------------------------------------------


def conflicts(file_config: SimConfig, wanted: SimConfig, explicit: Iterable[str]) -> list[str]:
    """The knobs set explicitly to something else than the file's machine has."""
    return [
        f"{knob} (file: {_show(getattr(file_config, knob))}, asked:"
        f" {_show(getattr(wanted, knob))})"
        for knob in sorted(explicit)
        if getattr(file_config, knob) != getattr(wanted, knob)
    ]


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{b.base:#x}:{b.size >> 20}M" for b in value)
    return str(getattr(value, "value", value))


def describe(restored: Restored) -> str:
    """One line about what was restored."""
    c = restored.config
    gib = sum(b.size for b in c.memblocks) / (1 << 30)
    return (f"{len(restored.hypervisor._vms)} VMs, {c.profile.value}, {gib:g} GiB in"
            f" {len(c.memblocks)} memblock(s); its configuration is kept")


# -- serve's start and exit ----------------------------------------------------------------


def restore_at_start(
    path: str, wanted: SimConfig, explicit: Iterable[str]
) -> tuple[StateKeeper, Restored | None] | str:
    """The keeper and what it restored, or the one-line reason `serve` must exit 2 (the
    file is never written on that path)."""
    keeper = StateKeeper(path)
    try:
        restored = keeper.load()
    except StateFileError as error:
        return f"state file {path}: {error} (the file was left as it is)"
    if restored is None:
        print(f"pkvm-sim serve: no state file at {path} yet: booting a fresh machine, saved"
              " there on exit", file=sys.stderr, flush=True)
        return keeper, None
    clash = conflicts(restored.config, wanted, explicit)
    if clash:
        return (f"state file {path} holds a machine booted with another configuration:"
                f" {'; '.join(clash)} (drop those settings, or use another --state-file)")
    print(f"pkvm-sim serve: restored {path}: {describe(restored)}", file=sys.stderr,
          flush=True)
    return keeper, restored


def save_at_exit(keeper: StateKeeper, servicer: HypervisorServicer) -> int:
    """Save on SIGTERM/SIGINT; the exit status (1 when the save failed)."""
    try:
        saved = keeper.save(servicer)
    except (OSError, TypeError, ValueError) as error:
        print(f"pkvm-sim serve: saving {keeper.path} failed: {error}", file=sys.stderr)
        return 1
    print(f"pkvm-sim serve: saved {saved.nr_vms} VMs to {saved.path} ({saved.size_bytes}"
          f" bytes in {saved.seconds:.2f} s)", file=sys.stderr, flush=True)
    return 0
