"""The state file: one whole simulated machine, saved and restored exactly (docs/state-file.md).

A restored machine continues where the saved one stopped: every pool with its free lists in
their exact order, the vmemmap, the page contents the model keeps (table entries, memcache
links), the host and guest stage-2 tables, the VMs with their slices, memcaches, shares and
pins, the counters, and the configuration the machine was booted with. The service adds its
own section (tokens, leases, request counters) as an opaque JSON document.

Layout (all integers little-endian):

    offset  size  field
    0       8     magic  b"PKVMSTAT"
    8       4     format version (u32), FORMAT_VERSION
    12      4     flags (u32), 0
    16      8     payload length in bytes (u64)
    24      32    SHA-256 of the payload
    56      ...   payload: sections, each
                    u8 name length, name (ASCII), u64 data length, zlib-compressed data

Sections of version 1: "machine" (JSON, below), "service" (JSON, the service's), and
"vmemmap/<i>" (segment i's packed `struct hyp_page` entries, raw little-endian items of the
layout's width). A reader refuses a file whose magic, version, length or checksum is wrong
before it decodes anything, so a refusal never depends on what the payload says.

How a restore works, and why it is merge-safe: `restore` boots a fresh machine from the
file's configuration (so every attribute derived from the configuration is computed by the
same code as at boot), then overwrites the mutable state with the file's: vmemmap entries
in place, page contents, free lists, host allocations, VMs, owner records, counters. Then
`audit()` must pass. `tests/core/test_state_file.py` deep-compares a restored machine with
the original object by object, so mutable state that a later change adds to a core class but
forgets here fails that test; add it here and bump FORMAT_VERSION (docs/state-file.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import zlib
from array import array
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .config import SimConfig
from .errors import PkvmError
from .guest import GuestMmOps, GuestVm
from .host_memory import HostAllocation
from .hyp_pool import HypPool
from .hyp_stage1 import HypStage1
from .hypervisor import Hypervisor
from .model import PageState, PoolKind
from .pgtable import STATE_OWNED, Stage2PageTable
from .profiles import REMOVED_PROFILES

MAGIC = b"PKVMSTAT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, flags, payload length, sha256
SECTION_HEAD = struct.Struct("<B")
SECTION_LENGTH = struct.Struct("<Q")
COMPRESS_LEVEL = 1  # zlib level 1: a 64 GiB machine's vmemmap shrinks ~100x in well under 1 s
FILE_MODE = 0o600  # the file holds the VMs' tokens: readable by its owner only

# GuestVm fields that are objects rebuilt on restore, not saved values.
_VM_OBJECT_FIELDS = ("pool", "pgt", "mm")


class StateFileError(Exception):
    """A state file that cannot be read or restored; str() is one line for the user."""


@dataclass
class StateFile:
    """A decoded state file: checked, not yet restored."""

    version: int
    machine: dict[str, Any]
    service: dict[str, Any]
    vmemmap: list[bytes] = field(repr=False)
    size_bytes: int = 0
    # What restore() changed to read the file, one line each for the user (a profile
    # that was removed, restored as its replacement).
    notes: list[str] = field(default_factory=list)


# -- encoding ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A copy of everything a state file holds, taken quickly (under the caller's lock);
    `pack` then does the slow part (JSON, compression, checksum) on the copy."""

    machine: dict[str, Any]
    service: dict[str, Any]
    vmemmap: list[bytes] = field(repr=False)


def snapshot(hv: Hypervisor, service: Mapping[str, Any] | None = None) -> Snapshot:
    return Snapshot(capture(hv), dict(service or {}),
                    [_array_le_bytes(seg.entries) for seg in hv.vmemmap.segments])


def pack(snap: Snapshot) -> bytes:
    """The bytes of a state file holding `snap`."""
    sections: list[tuple[str, bytes]] = [
        ("machine", _json_bytes(snap.machine)),
        ("service", _json_bytes(snap.service)),
    ]
    sections += [(f"vmemmap/{i}", blob) for i, blob in enumerate(snap.vmemmap)]
    payload = b"".join(_section(name, data) for name, data in sections)
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), digest) + payload


def encode(hv: Hypervisor, service: Mapping[str, Any] | None = None) -> bytes:
    """The whole machine (and the service's section) as the bytes of a state file."""
    return pack(snapshot(hv, service))


def capture(hv: Hypervisor) -> dict[str, Any]:
    """The "machine" section: every piece of mutable state, as JSON-able values."""
    hs2 = hv.host_stage2
    return {
        "config": config_to_json(hv.config),
        "vms_created": hv._vms_created,
        "vmemmap": [
            {"base_pfn": seg.base_pfn, "nr_pages": seg.nr_pages,
             "item_bytes": seg.entries.itemsize}
            for seg in hv.vmemmap.segments
        ],
        "physmem": [[pfn, encode_value(hv.physmem.read(pfn))]
                    for pfn in hv.physmem.written_pfns()],
        "pools": {pool.name: _pool_state(pool) for pool in (hv.hyp_pool, *hv.host_pools)},
        "host_stage2": {
            "pgd_pfns": list(hs2.pgt.pgd_pfns),
            "counters": asdict(hs2.counters),
            "tables_allocated": hs2.mm.allocated,
            "tables_freed": hs2.mm.freed,
        },
        "host_memory": {
            "free": [[start, end] for start, end in hv.host_memory._free],
            "allocations": [[a.base_pfn, a.nr_pages, a.owner]
                            for a in hv.host_memory.allocations.values()],
        },
        "vms": [_vm_state(vm) for vm in hv._vms.values()],
        "owners": [[pfn, handle, kind.value] for pfn, (handle, kind) in hv._owners.items()],
        "hyp_shared": [[pfn, handle] for pfn, handle in hv._hyp_shared.items()],
        **_optional_state(hv),
    }


def _optional_state(hv: Hypervisor) -> dict[str, Any]:
    """State of parts only some kernel profiles' machines have: EL2's stage-1 tables over
    the pages it maps (shares, donations) and guest share counts (v6.14+)."""
    out: dict[str, Any] = {}
    stage1 = getattr(hv, "hyp_stage1", None)
    if stage1 is not None:
        out["hyp_stage1"] = {
            "tables": [[level, index, pfn] for (level, index), pfn in stage1._tables.items()],
            "mapped": sorted(stage1.mapped),
        }
        if stage1.va_layout is not None:  # tables keyed by hyp VA (a modelled boot)
            out["hyp_stage1"]["va"] = "linear"
    guest_shared = getattr(hv, "_guest_shared", None)
    if guest_shared is not None:
        out["guest_shared"] = [[pfn, count] for pfn, count in guest_shared.items()]
    kernel_shared = getattr(hv, "_kernel_shared", None)
    if kernel_shared:  # v6.1/v6.12 machines: the host kernel's structs shared with hyp
        out["kernel_shared"] = [[pfn, count] for pfn, count in kernel_shared.items()]
        out["task_fp_pfn"] = hv._task_fp_pfn
    return out


def config_to_json(config: SimConfig) -> dict[str, Any]:
    """SimConfig as `SimConfig.from_mapping` reads it back (every knob, defaults included)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "memblocks":
            value = [{"base": b.base, "size": b.size} for b in value]
        elif isinstance(value, Enum):
            value = value.value
        out[f.name] = value
    return out


def _pool_state(pool: HypPool) -> dict[str, Any]:
    return {
        "base_pfn": pool.base_pfn,
        "nr_pages": pool.nr_pages,
        "reserved_pages": pool.reserved_pages,
        "max_order": pool.max_order,
        "free_lists": [pool.free_list(order) for order in range(pool.max_order)],
        "admitted": sorted(pool._admitted),
        "alloc_failures": pool.alloc_failures,
    }


def _vm_state(vm: GuestVm) -> dict[str, Any]:
    """Every GuestVm field by name (fields a later change adds are saved too), the objects
    rebuilt on restore described by what they hold."""
    state = {f.name: encode_value(getattr(vm, f.name)) for f in fields(vm)
             if f.name not in _VM_OBJECT_FIELDS}
    state["pool"] = None if vm.pool is None else _pool_state(vm.pool)
    state["pgd_pfns"] = None if vm.pgt is None else list(vm.pgt.pgd_pfns)
    state["tables_allocated"] = None if vm.mm is None else vm.mm.allocated
    return state


def encode_value(value: Any) -> Any:
    """Page contents and VM fields as JSON: scalars as themselves, a tuple as an array,
    {"l": [...]} a list, {"s": [...]} a set (sorted), {"d": [[key, value], ...]} a dict."""
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if isinstance(value, tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, list):
        return {"l": [encode_value(v) for v in value]}
    if isinstance(value, set | frozenset):
        return {"s": [encode_value(v) for v in sorted(value)]}
    if isinstance(value, dict):
        return {"d": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    raise TypeError(f"the state file cannot hold a {type(value).__name__}: {value!r:.80}")


def decode_value(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(decode_value(v) for v in value)
    if isinstance(value, dict):
        if "l" in value:
            return [decode_value(v) for v in value["l"]]
        if "s" in value:
            return {decode_value(v) for v in value["s"]}
        return {decode_value(k): decode_value(v) for k, v in value["d"]}
    return value


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _array_le_bytes(entries: array[int]) -> bytes:
    if sys.byteorder == "little":
        return entries.tobytes()
    swapped = array(entries.typecode, entries)
    swapped.byteswap()
    return swapped.tobytes()


def _section(name: str, data: bytes) -> bytes:
    raw = name.encode("ascii")
    packed = zlib.compress(data, COMPRESS_LEVEL)
    return SECTION_HEAD.pack(len(raw)) + raw + SECTION_LENGTH.pack(len(packed)) + packed


# -- decoding ------------------------------------------------------------------------------


def decode(data: bytes) -> StateFile:
    """Check and unpack a state file's bytes; StateFileError (one line) if anything is off."""
    if not data:
        raise StateFileError("empty file: not a pkvm-sim state file")
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise StateFileError("not a pkvm-sim state file (wrong magic)")
    if len(data) < HEADER.size:
        raise StateFileError(f"truncated: {len(data)} bytes, shorter than the header")
    _magic, version, _flags, length, digest = HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise StateFileError(f"format version {version} is {newer} format; this pkvm-sim"
                             f" reads version {FORMAT_VERSION}")
    payload = memoryview(data)[HEADER.size:]
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise StateFileError(f"{what}: the header announces {length} payload bytes, the file"
                             f" has {len(payload)}")
    if hashlib.sha256(payload).digest() != digest:
        raise StateFileError("corrupt: the SHA-256 checksum of the payload does not match")
    try:
        sections = _sections(payload)
        machine = json.loads(sections.pop("machine"))
        service = json.loads(sections.pop("service"))
        vmemmap = [sections.pop(f"vmemmap/{i}") for i in range(len(machine["vmemmap"]))]
    except (LookupError, ValueError, TypeError, AttributeError, RecursionError, struct.error,
            zlib.error) as error:
        raise StateFileError(f"corrupt: cannot decode the payload ({_describe(error)})") from None
    if sections:
        raise StateFileError(f"corrupt: unknown sections {sorted(sections)}")
    return StateFile(version, machine, service, vmemmap, len(data))


def _sections(payload: memoryview) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    offset = 0
    while offset < len(payload):
        (name_len,) = SECTION_HEAD.unpack_from(payload, offset)
        offset += SECTION_HEAD.size
        name = bytes(payload[offset:offset + name_len]).decode("ascii")
        offset += name_len
        (data_len,) = SECTION_LENGTH.unpack_from(payload, offset)
        offset += SECTION_LENGTH.size
        if offset + data_len > len(payload):
            raise ValueError(f"section {name!r} overruns the payload")
        out[name] = zlib.decompress(payload[offset:offset + data_len])
        offset += data_len
    return out


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# -- restoring -----------------------------------------------------------------------------


def restore(state: StateFile) -> Hypervisor:
    """The machine a decoded state file holds, audited; StateFileError if it is not sound.

    A file of a removed profile (profiles.REMOVED_PROFILES) restores as its replacement when
    the machine uses nothing the replacement lacks, with a line in `state.notes` saying so."""
    try:
        config_map = _map_removed_profile(state)
        config = SimConfig.from_mapping(config_map)
    except (KeyError, ValueError, TypeError) as error:
        raise StateFileError(f"bad configuration in the file: {_describe(error)}") from None
    try:
        hv = Hypervisor.boot(config)
        _apply(hv, state)
    except (PkvmError, AssertionError, LookupError, ValueError, TypeError, AttributeError,
            RecursionError) as error:  # whatever a well-checksummed but wrong file may cause
        raise StateFileError(f"inconsistent machine state: {_describe(error)}") from None
    try:
        hv.audit()
    except AssertionError as error:
        raise StateFileError(f"the restored machine fails audit(): {_describe(error)}") from None
    return hv


def _map_removed_profile(state: StateFile) -> dict[str, Any]:
    """The file's configuration, with a removed profile replaced by the one it maps to.

    v6.12+guest-share maps to v6.12 (same reservation, same 4-byte vmemmap): the machine
    restores exactly unless it holds guest shares or memcache pages, which v6.12 cannot
    have; such a file is refused, naming why."""
    config_map: dict[str, Any] = dict(state.machine["config"])
    name = config_map.get("profile")
    if not isinstance(name, str) or name not in REMOVED_PROFILES:
        return config_map
    replacement, why = REMOVED_PROFILES[name]
    m = state.machine
    guest_state = bool(m.get("guest_shared")) or any(
        decode_value(vm.get("memcache")) or decode_value(vm.get("hyp_memcache"))
        for vm in m.get("vms", [])
    )
    if guest_state:
        raise StateFileError(f"{why}; this file holds guest shares or memcache pages, which"
                             f" {replacement} cannot have: it cannot be restored")
    config_map["profile"] = replacement
    note = f"{why}; restored as {replacement} (nothing in the file needs more)"
    if note not in state.notes:
        state.notes.append(note)
    return config_map


def _apply(hv: Hypervisor, state: StateFile) -> None:
    """Overwrite a freshly booted machine's mutable state with the file's."""
    m = state.machine
    # VM pools first: hyp_pool_init needs their PGD ranges' entries zero, as at boot.
    vms = [_rebuild_vm(hv, vm_state) for vm_state in m["vms"]]
    _load_vmemmap(hv, m["vmemmap"], state.vmemmap)
    contents = hv.physmem._contents
    contents.clear()  # in place: every pool and table holds this very dict
    for pfn, value in m["physmem"]:
        contents[pfn] = decode_value(value)
    pools = {pool.name: pool for pool in (hv.hyp_pool, *hv.host_pools)}
    if set(pools) != set(m["pools"]):
        raise ValueError(f"pools {sorted(m['pools'])} in the file, {sorted(pools)} at boot")
    for name, pool in pools.items():
        _load_pool(pool, m["pools"][name])
    for vm, vm_state in zip(vms, m["vms"], strict=True):
        if vm.pool is not None:
            _load_pool(vm.pool, vm_state["pool"])
    _load_host_stage2(hv, m["host_stage2"])
    hm = hv.host_memory
    hm._free = [[start, end] for start, end in m["host_memory"]["free"]]
    hm.allocations = {}
    for base, nr_pages, owner in m["host_memory"]["allocations"]:
        hm.allocations[base] = HostAllocation(base, nr_pages, owner)
    hm.reindex()
    hm.free_pages = sum(end - start for start, end in hm._free)
    hv._vms = {vm.handle: vm for vm in vms}
    hv._owners = {pfn: (handle, PoolKind(kind)) for pfn, handle, kind in m["owners"]}
    hv._hyp_shared = {pfn: handle for pfn, handle in m["hyp_shared"]}
    hv._vms_created = int(m["vms_created"])
    hv.rebuild_slabs()
    _load_optional_state(hv, m)


def _load_optional_state(hv: Hypervisor, m: dict[str, Any]) -> None:
    """The parts `_optional_state` saves. A file without one (written before the model had
    it) leaves the part as a fresh boot has it; a file with one this machine lacks is
    refused."""
    stage1 = getattr(hv, "hyp_stage1", None)
    if "hyp_stage1" in m:
        if stage1 is None:
            raise ValueError("the file has hyp stage-1 tables, this machine has none")
        if stage1.va_layout is not None and m["hyp_stage1"].get("va") != "linear":
            # Written before EL2's boot was modelled (v6.1/v6.12): its tables are keyed by
            # PA and nothing was charged at boot. Restore that machine as it was.
            stage1 = hv.hyp_stage1 = _legacy_stage1(hv)
        stage1._tables.clear()  # in place, as everywhere: nothing else need know
        stage1._tables.update({(level, index): pfn
                               for level, index, pfn in m["hyp_stage1"]["tables"]})
        stage1.mapped.clear()
        stage1.mapped.update(m["hyp_stage1"]["mapped"])
    guest_shared = getattr(hv, "_guest_shared", None)
    if "guest_shared" in m:
        if guest_shared is None:
            raise ValueError("the file has guest share counts, this machine has none")
        guest_shared.clear()
        guest_shared.update({pfn: count for pfn, count in m["guest_shared"]})
        # Files from before guest shares kept the host state in the vmemmap (as v6.14
        # does) marked those pages SHARED_OWNED in the host stage-2: make them OWNED there.
        marked = [pfn for pfn in sorted(guest_shared)
                  if hv.host_stage2.host_state(pfn) is PageState.SHARED_OWNED]
        if marked:
            hv.host_stage2.set_page_state(marked, STATE_OWNED)
    if "kernel_shared" in m:
        hv._kernel_shared.clear()
        hv._kernel_shared.update({pfn: count for pfn, count in m["kernel_shared"]})
        hv._task_fp_pfn = m.get("task_fp_pfn")


def _load_vmemmap(hv: Hypervisor, segments: list[dict[str, Any]], blobs: list[bytes]) -> None:
    live = hv.vmemmap.segments
    if [(s["base_pfn"], s["nr_pages"]) for s in segments] != [(s.base_pfn, s.nr_pages)
                                                              for s in live]:
        raise ValueError("the file's vmemmap segments differ from the configuration's")
    for seg, blob in zip(live, blobs, strict=True):
        loaded = array(seg.entries.typecode)
        if len(blob) != seg.nr_pages * loaded.itemsize:
            raise ValueError(f"vmemmap segment at pfn {seg.base_pfn:#x} has {len(blob)} bytes")
        loaded.frombytes(blob)
        if sys.byteorder != "little":
            loaded.byteswap()
        seg.entries[:] = loaded  # in place: the pools index this very array


def _load_pool(pool: HypPool, state: dict[str, Any]) -> None:
    geometry = (pool.base_pfn, pool.nr_pages, pool.reserved_pages, pool.max_order)
    saved = (state["base_pfn"], state["nr_pages"], state["reserved_pages"], state["max_order"])
    if geometry != saved:
        raise ValueError(f"pool {pool.name} is {saved} in the file, {geometry} at boot")
    lists = state["free_lists"]
    if len(lists) != pool.max_order:
        raise ValueError(f"pool {pool.name}: {len(lists)} free lists for max_order"
                         f" {pool.max_order}")
    # The file holds each list's live order; ghosts (lazily removed entries) are not state.
    pool._lists = [deque(heads) for heads in lists]
    pool._ghosts = [{} for _ in lists]
    pool._nr_free = [len(heads) for heads in lists]
    pool._admitted = set(state["admitted"])
    pool.alloc_failures = int(state["alloc_failures"])


def _load_host_stage2(hv: Hypervisor, state: dict[str, Any]) -> None:
    hs2 = hv.host_stage2
    if list(state["pgd_pfns"]) != hs2.pgt.pgd_pfns:
        raise ValueError("the host stage-2 PGD differs from the one this configuration boots")
    counters = state["counters"]
    known = {f.name for f in fields(hs2.counters)}
    if set(counters) != known:
        raise ValueError(f"host stage-2 counters {sorted(counters)}, expected {sorted(known)}")
    for name, value in counters.items():
        setattr(hs2.counters, name, int(value))
    hs2.mm.allocated = int(state["tables_allocated"])
    hs2.mm.freed = int(state["tables_freed"])


def _legacy_stage1(hv: Hypervisor) -> HypStage1:
    """EL2's stage-1 as files written before the boot model had it: hyp VA = PA, the
    carve-out mapped at boot, no boot table charged to the hyp pool (such files also say
    hyp_s1_early_used_pages 0)."""
    if hv.hyp_pool.reserved_pages:
        raise ValueError("a file from before the boot model must have no early pages")
    lay = hv.carveout
    return HypStage1(hv.page_shift, hv.hyp_pool, [(lay.base_pfn, lay.base_pfn + lay.nr_pages)])


def _rebuild_vm(hv: Hypervisor, state: dict[str, Any]) -> GuestVm:
    """A GuestVm from its saved fields; its pool is initialised over the PGD range as at
    creation (the vmemmap and free lists are then overwritten with the file's)."""
    values = {name: decode_value(value) for name, value in state.items()
              if name not in ("pool", "pgd_pfns", "tables_allocated")}
    vm = GuestVm(**values, pool=None)
    if "ran" not in state:  # files from before VMs had two steps: a VM at EL2 had run
        vm.ran = state["pool"] is not None
    pool_state = state["pool"]
    if pool_state is None:
        return vm
    vm.pool = HypPool(hv.vmemmap, hv.physmem, vm.pgd_base_pfn, vm.pgd_pages, 0,
                      page_shift=hv.page_shift, max_order_cap=hv.max_order,
                      max_order_formula="v5.17", name=f"vm/{vm.handle}")
    vm.mm = GuestMmOps(vm, hv.physmem, hv.vmemmap.layout.refcount_max)
    vm.mm.allocated = int(state["tables_allocated"])
    vm.pgt = Stage2PageTable(hv.geometry, hv.config.ia_bits, hv.physmem, vm.mm,
                             list(state["pgd_pfns"]),
                             on_refcount_limit=hv.host_stage2.count_refcount_limit)
    return vm


# -- files ---------------------------------------------------------------------------------


def save(path: str | os.PathLike[str], hv: Hypervisor,
         service: Mapping[str, Any] | None = None) -> int:
    """Write the state file atomically (temporary file, fsync, rename, fsync of the
    directory); returns its size in bytes. The old file stays intact until the rename."""
    return write_snapshot(path, snapshot(hv, service))


def write_snapshot(path: str | os.PathLike[str], snap: Snapshot) -> int:
    data = pack(snap)
    write_atomically(Path(path), data)
    return len(data)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike[str]) -> StateFile:
    """Read and check a state file (never writes to it)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise StateFileError(f"cannot read: {error.strerror or error}") from None
    return decode(data)


__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Snapshot",
    "StateFile",
    "StateFileError",
    "capture",
    "decode",
    "encode",
    "load",
    "restore",
    "pack",
    "save",
    "snapshot",
    "write_snapshot",
]
