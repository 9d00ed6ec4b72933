"""Keeping the machine across restarts: the service's half of `serve --state-file PATH`.

    start:    file exists -> restore it (core/state_file.py) instead of booting, then put
              back the VMs' tokens, their leases (as the time they had left), their clients,
              the hyp table charges and the request counters before the first call is
              served; no file -> boot as usual
    SaveState (admin RPC) and SIGTERM/SIGINT (after in-flight calls finish): save

The file's configuration wins over the defaults; a knob the user set explicitly (flag,
environment or config file) that contradicts it is an error (`conflicts`), so a machine is
never silently restored as something the user did not ask for (docs/state-file.md).

A save holds the simulator lock only while it copies the state (lists, the vmemmap bytes);
compressing, checksumming and the atomic write happen outside it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pkvm_sim.core import state_file
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.core.model import PoolKind
from pkvm_sim.core.state_file import FORMAT_VERSION, StateFileError

from .counters import OP_NAMES
from .table_users import run_time_tables

if TYPE_CHECKING:
    from .servicer import HypervisorServicer

log = logging.getLogger(__name__)


# At exit the save gets this many times the longest save or restore seen (and at least
# half of --grace-seconds), in-flight calls the rest of the grace period.
SAVE_MARGIN = 2.0


@dataclass(frozen=True)
class SaveResult:
    path: str
    size_bytes: int
    seconds: float
    nr_vms: int
    format_version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Restored:
    """A machine read back from a state file (the service's section waits in the keeper)."""

    hypervisor: Hypervisor
    config: SimConfig
    size_bytes: int
    notes: tuple[str, ...] = ()  # what restore changed to read the file (state_file.restore)


class StateKeeper:
    """The --state-file of one server: restores it at start, saves it on demand."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._save_lock = threading.Lock()  # one save at a time (one temporary file)
        self._pending_service: ServiceState | None = None
        self._lock: FileLock | None = None  # held from claim() to release()
        self.last_save_seconds = 0.0  # how long the last save took (sizes the exit's share)
        self.load_seconds = 0.0  # how long reading and restoring the file took

    def check_writable(self) -> None:
        """Refuse a path whose directory does not exist, before serving (not at SIGTERM)."""
        if not self.path.parent.is_dir():
            raise StateFileError(f"directory {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_file():
            raise StateFileError("not a regular file")

    def claim(self) -> None:
        """Make this process the file's only server, before anything is read: lock it
        (another server on the same file is refused), prove that a save can be written
        (a read-only directory is refused now, not when everything would be lost at exit),
        and remove the temporary files of saves that died mid-write. StateFileError
        (one line) otherwise; `release` undoes it."""
        self.check_writable()
        probe_writable(self.path)
        self._lock = FileLock.take(lock_path(self.path))
        try:
            for stale in state_file.temporary_files(self.path):
                stale.unlink(missing_ok=True)
                log.warning("removed %s, left by a save that did not finish", stale)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def load(self) -> Restored | None:
        """The machine in the file, audited; None when there is no file yet."""
        self.check_writable()
        if not self.path.exists():
            return None
        started = time.perf_counter()
        decoded = state_file.load(self.path)
        hv = state_file.restore(decoded)
        service = parse_service(decoded.service)
        odd = set(service.tokens) ^ set(hv.vm_table)
        if odd:
            raise StateFileError(f"the tokens of VMs {sorted(odd)} do not match the machine's"
                                 " VMs")
        check_charges(service, hv)
        self._pending_service = service
        self.load_seconds = time.perf_counter() - started
        return Restored(hv, hv.config, decoded.size_bytes, tuple(decoded.notes))

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
                nr_vms = len(hv.vm_table)
            size = state_file.write_snapshot(self.path, snap)
        seconds = time.perf_counter() - started
        self.last_save_seconds = seconds
        return SaveResult(str(self.path), size, seconds, nr_vms)

    def calls_grace(self, grace_seconds: float) -> float:
        """The share of the shutdown grace that in-flight calls get; the save has the rest:
        at least half, and SAVE_MARGIN times the longest a save or the restore took here."""
        expected = max(self.last_save_seconds, self.load_seconds)
        reserve = min(grace_seconds, max(grace_seconds / 2, SAVE_MARGIN * expected))
        return grace_seconds - reserve


# -- one server per file --------------------------------------------------------------------


def lock_path(path: Path) -> Path:
    """The lock beside the state file (the file itself is replaced by every save, so a lock
    on it would not outlive the first save)."""
    return path.with_name(f".{path.name}.lock")


class FileLock:
    """An exclusive flock(2) on a lock file, held by an open descriptor. The kernel drops it
    when the process dies, however it dies, so a crashed server never blocks the next."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def take(cls, path: Path) -> FileLock:
        """Lock `path` (created if missing) or raise StateFileError naming the holder.
        The loop guards against a holder that unlinked the file between our open and our
        flock: the lock is only ours once the path still names the inode we locked."""
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as error:
                raise StateFileError(f"cannot create the lock {path}:"
                                     f" {error.strerror or error}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise StateFileError(f"in use by another pkvm-sim serve (pid {holder}); one"
                                     " server per state file") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return cls(path, fd)
            os.close(fd)  # unlinked by its last holder meanwhile: lock the new one

    def release(self) -> None:
        """Unlink, then unlock (in this order: whoever opens the old inode meanwhile sees it
        unlinked and retries)."""
        self.path.unlink(missing_ok=True)
        os.close(self._fd)


def probe_writable(path: Path) -> None:
    """Write, sync and remove a file beside `path`, as a save would; StateFileError if the
    directory cannot take it (read-only file system, no permission, full disk)."""
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"pkvm-sim")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as error:
        raise StateFileError(f"cannot be saved: writing in {path.parent} fails"
                             f" ({error.strerror or error})") from None


# -- the service section -------------------------------------------------------------------


def capture_service(servicer: HypervisorServicer) -> dict[str, Any]:
    """Tokens, clients, hyp table charges, leases (as seconds left) and counters; call
    under the simulator lock."""
    counters = servicer.counters
    return {
        "tokens": [[handle, token] for handle, token in servicer.tokens.tokens()],
        "clients": servicer.machine.clients.state(),
        "hyp_tables": servicer.ledger.table_charges(),
        "leases": [[handle, duration, left]
                   for handle, duration, left in servicer.leases.state()],
        "counters": {
            "requests": [[method, code, n] for (method, code), n in counters.requests().items()],
            "operations": counters.operations_by_name(),
            "fault_failures": dict(counters.fault_failures),
            "vms_expired": counters.vms_expired,
        },
    }


@dataclass(frozen=True)
class ServiceState:
    """The service section, typed and checked."""

    tokens: dict[int, str]
    leases: list[tuple[int, float, float]]  # (handle, lease seconds, seconds left)
    requests: dict[tuple[str, str], int]
    operations: dict[str, int]
    fault_failures: dict[str, int]
    vms_expired: int
    clients: dict[int, str] = field(default_factory=dict)  # handle -> its client
    # table pfn -> VM charged (a file written before the charges were saved: empty, and
    # every table is charged by choose_payer)
    hyp_tables: dict[int, int] = field(default_factory=dict)


def parse_service(section: Mapping[str, Any]) -> ServiceState:
    """The service section of a state file; StateFileError if it is malformed."""
    try:
        counters = section.get("counters", {})
        state = ServiceState(
            tokens={int(h): str(token) for h, token in section.get("tokens", ())},
            leases=[(int(h), float(d), float(left)) for h, d, left in section.get("leases", ())],
            requests={(str(m), str(c)): int(n) for m, c, n in counters.get("requests", ())},
            operations={str(k): int(n) for k, n in counters.get("operations", {}).items()},
            fault_failures={str(k): int(n)
                            for k, n in counters.get("fault_failures", {}).items()},
            vms_expired=int(counters.get("vms_expired", 0)),
            clients={int(h): str(client) for h, client in section.get("clients", ())},
            hyp_tables={int(pfn): int(h) for pfn, h in section.get("hyp_tables", ())},
        )
    except (AttributeError, TypeError, ValueError) as error:
        raise StateFileError(f"corrupt service section: {type(error).__name__}: {error}") \
            from None
    unknown = set(state.operations) - set(OP_NAMES)
    if unknown:
        raise StateFileError(f"unknown operation counters {sorted(unknown)}")
    return state


def check_charges(state: ServiceState, hv: Hypervisor) -> None:
    """StateFileError unless the saved clients name live VMs and the saved table charges
    name run-time tables of the machine and live VMs."""
    strays = set(state.clients) - set(hv.vm_table)
    if strays:
        raise StateFileError(f"clients are saved for VMs {sorted(strays)} the machine lacks")
    tables = run_time_tables(hv.hyp_stage1)
    bad = sorted(pfn for pfn, handle in state.hyp_tables.items()
                 if pfn not in tables or handle not in hv.vm_table)
    if bad:
        raise StateFileError(f"hyp table charges {bad} name no table or no VM of the machine")


def restore_service(servicer: HypervisorServicer, state: ServiceState) -> None:
    """Put a checked service section back, before the first call is served."""
    for handle, token in state.tokens.items():
        servicer.tokens.adopt(handle, token)
    hv = servicer.hypervisor
    for pfn, (handle, kind) in hv.owners.items():  # the hyp-pool quota ledger, re-derived
        if kind is PoolKind.HYP:
            servicer.ledger.allocated(handle, [pfn], hv.hyp_pool.page_order(pfn))
    leases = servicer.leases
    if leases.enabled:  # a server started with leases off gives none back
        leases.restore(state.leases)
    restore_clients(servicer, state.clients)
    restore_table_charges(servicer, state.hyp_tables)
    counters = servicer.counters
    counters.restore_requests(state.requests)
    counters.operations.update(state.operations)
    counters.fault_failures.update(state.fault_failures)
    counters.vms_expired = state.vms_expired


def restore_clients(servicer: HypervisorServicer, saved: Mapping[int, str]) -> None:
    """Each restored VM's client: the saved one when this server's client token file names
    it; else, without a token file, whoever first calls the VM with its token adopts it
    (a connection's client cannot be named again after a restart); else none."""
    names = servicer.client_token.names
    adoptable = not servicer.client_token.required
    leases = servicer.leases
    for handle in servicer.hypervisor.vm_table:
        client = saved.get(handle)
        servicer.machine.clients.restored(
            handle, client if client in names else None,
            leases.lease_seconds(handle), adoptable)


def restore_table_charges(servicer: HypervisorServicer, saved: Mapping[int, int]) -> None:
    """Charge the restored stage-1 tables as the saved server did; the tables the file does
    not charge (saved without a quota, or by an older server) go to a VM that uses them,
    the lowest handle (choose_payer), so every restart of one file charges alike."""
    ledger = servicer.ledger
    if not ledger.tracking:
        return
    tables = run_time_tables(servicer.hypervisor.hyp_stage1)
    unsaved = {pfn: key for pfn, key in tables.items() if pfn not in saved}
    payers = servicer.machine.payers_of(unsaved, None) if unsaved else {}
    ledger.restore_tables(tables, dict(saved), payers)


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
    return (f"{len(restored.hypervisor.vm_table)} VMs, {c.profile.value}, {gib:g} GiB in"
            f" {len(c.memblocks)} memblock(s); its configuration is kept")


# -- serve's start and exit ----------------------------------------------------------------


def restore_at_start(
    path: str, wanted: SimConfig, explicit: Iterable[str]
) -> tuple[StateKeeper, Restored | None] | str:
    """The keeper and what it restored, or the one-line reason `serve` must exit 2 (the
    file is never written on that path)."""
    keeper = StateKeeper(path)
    try:
        keeper.claim()
    except StateFileError as error:
        return f"state file {path}: {error}"
    try:
        restored = keeper.load()
    except StateFileError as error:
        keeper.release()
        return f"state file {path}: {error} (the file was left as it is)"
    if restored is None:
        print(f"pkvm-sim serve: no state file at {path} yet: booting a fresh machine, saved"
              " there on exit", file=sys.stderr, flush=True)
        return keeper, None
    clash = conflicts(restored.config, wanted, explicit)
    if clash:
        keeper.release()
        return (f"state file {path} holds a machine booted with another configuration:"
                f" {'; '.join(clash)} (drop those settings, or use another --state-file)")
    for note in restored.notes:
        print(f"pkvm-sim serve: state file {path}: note: {note}", file=sys.stderr, flush=True)
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
