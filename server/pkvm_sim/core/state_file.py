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
    12      4     flags (u32), 0: a reader refuses any bit it does not know
    16      8     payload length in bytes (u64)
    24      32    SHA-256 of the payload
    56      ...   payload: sections, each
                    u8 name length, name (ASCII), u64 data length, zlib-compressed data

Sections of version 1: "machine" (JSON, below), "service" (JSON, the service's), and
"vmemmap/<i>" (segment i's packed `struct hyp_page` entries, raw little-endian items of the
layout's width). A reader refuses a file whose magic, version, flags, length or checksum is
wrong before it decodes anything, so a refusal never depends on what the payload says; `load`
reads the header first, so a huge foreign file is refused without being read whole.

How a restore works, and why it is merge-safe: `restore` boots a fresh machine from the
file's configuration (so every attribute derived from the configuration is computed by the
same code as at boot), then overwrites the mutable state with the file's: vmemmap entries
in place, page contents, free lists, host allocations, VMs, owner records, counters. Then
`audit()` must pass. `tests/core/test_state_file.py` deep-compares a restored machine with
the original object by object, so mutable state that a later change adds to a core class but
forgets here fails that test; add it here and bump FORMAT_VERSION (docs/state-file.md).
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from .config import SimConfig
from .errors import PkvmError
from .guest import GuestVm
from .hypervisor import Hypervisor
from .profiles import REMOVED_PROFILES
from .state_values import (
    STREAMS,
    IntsIn,
    SparseBytes,
    decode_value,
    encode_value,
    pack_ints,
    unpack_ints,
)

MAGIC = b"PKVMSTAT"
FORMAT_VERSION = 2  # the version this pkvm-sim writes
READ_VERSIONS = (1, 2)  # the versions it reads
HEADER = struct.Struct("<8sIIQ32s")  # magic, version, flags, payload length, sha256
KNOWN_FLAGS = 0  # versions 1 and 2 define no flag: any set bit is a file this reader cannot trust
TEMPORARY_INFIX = ".tmp-"  # a save writes `.<name>.tmp-<pid>` first, then renames it
SECTION_HEAD = struct.Struct("<B")
SECTION_LENGTH = struct.Struct("<Q")
COMPRESS_LEVEL = 1  # zlib level 1: a 64 GiB machine's vmemmap shrinks ~100x in well under 1 s
FILE_MODE = 0o600  # the file holds the VMs' tokens: readable by its owner only
# Version 2 stores a vmemmap segment as its non-zero chunks of this many bytes (a machine's
# entries are mostly zero: host pages, the tails of free blocks), so zlib and SHA-256 see a
# few hundred KiB instead of the whole array (4 MiB for 4 GiB of RAM, 64 MiB for 64 GiB).
VMEMMAP_CHUNK_BYTES = 1024
VMEMMAP_HEAD = struct.Struct("<QQQ")  # raw bytes, chunk bytes, number of chunks stored

class StateFileError(Exception):
    """A state file that cannot be read or restored; str() is one line for the user."""


@dataclass
class StateFile:
    """A decoded state file: checked, not yet restored."""

    version: int
    machine: dict[str, Any]
    service: dict[str, Any]
    # Each segment's raw little-endian entries: bytes (version 1) or the stored chunks
    # (version 2, read in place).
    vmemmap: list[bytes | SparseBytes] = field(repr=False)
    size_bytes: int = 0
    # Version 2: the integer streams by name (state_values.STREAMS); empty for version 1.
    ints: dict[str, list[int]] = field(default_factory=dict, repr=False)
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
    vmemmap: Sequence[bytes | SparseBytes] = field(repr=False)
    ints: dict[str, list[int]] = field(default_factory=dict, repr=False)


def snapshot(hv: Hypervisor, service: Mapping[str, Any] | None = None) -> Snapshot:
    with cyclic_collection_paused():
        machine, ints = hv.state()
        return Snapshot({"config": config_to_json(hv.config), **machine},
                        dict(service or {}), hv.vmemmap_blobs(), ints)


@contextmanager
def cyclic_collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the block, then as it was.

    A snapshot or a restore creates tens of thousands of containers (lists, tuples, the
    restored objects) that stay alive until it ends. Each young collection their allocation
    sets off scans them for nothing, and now and then a full one scans the whole process:
    a 256-VM restore (bench/bench_compiled.py "state", pure core) ran about 40 collections,
    4-5 ms, and 17 ms when one was full; paused, it runs one young collection when the
    collector resumes, about 2 ms. A snapshot runs under the service's lock, where a full
    collection would stall every tenant. Reference counting still frees what dies
    meanwhile. Threads that pause it at once leave it enabled if it was when the first of
    them began."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def pack(snap: Snapshot) -> bytes:
    """The bytes of a state file (of FORMAT_VERSION) holding `snap`."""
    try:
        ints = [(f"ints/{name}", pack_ints(snap.ints[name])) for name in STREAMS]
    except OverflowError as error:  # a negative or huge number in a page or a list
        raise TypeError(f"the state file cannot hold it: {error}") from None
    sections: list[tuple[str, bytes]] = [
        ("machine", _json_bytes(snap.machine)),
        ("service", _json_bytes(snap.service)),
        *ints,
    ]
    sections += [(f"vmemmap/{i}", sparse_vmemmap(_raw(blob)))
                 for i, blob in enumerate(snap.vmemmap)]
    payload = b"".join(_section(name, data) for name, data in sections)
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), digest) + payload


def encode(hv: Hypervisor, service: Mapping[str, Any] | None = None) -> bytes:
    """The whole machine (and the service's section) as the bytes of a state file."""
    return pack(snapshot(hv, service))


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


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    # The documents are trees built here (no container is reached twice): the encoder's
    # circular-reference bookkeeping, a third of its time, would find nothing. Same bytes.
    return json.dumps(document, separators=(",", ":"), check_circular=False).encode()


def sparse_vmemmap(blob: bytes) -> bytes:
    """A vmemmap segment's little-endian entries as version 2 stores them: VMEMMAP_HEAD
    (the raw length, VMEMMAP_CHUNK_BYTES, the number of chunks n), n u64 chunk indices in
    increasing order, then those chunks' bytes (the last chunk of the raw bytes may be
    shorter). The chunks not stored are zero."""
    chunk = VMEMMAP_CHUNK_BYTES
    zero = bytes(chunk)
    raw_bytes = len(blob)
    whole_bytes = raw_bytes - raw_bytes % chunk
    indices: list[int] = []
    for index, offset in enumerate(range(0, whole_bytes, chunk)):
        if not blob.startswith(zero, offset):  # memcmp in place, no copy
            indices.append(index)
    if blob.count(0, whole_bytes) != raw_bytes - whole_bytes:  # a short last chunk
        indices.append(whole_bytes // chunk)
    data = b"".join([blob[i * chunk:(i + 1) * chunk] for i in indices])
    return (VMEMMAP_HEAD.pack(raw_bytes, chunk, len(indices))
            + struct.pack(f"<{len(indices)}Q", *indices) + data)


def _raw(blob: bytes | SparseBytes) -> bytes:
    return blob if isinstance(blob, bytes) else blob.dense()


def dense_vmemmap(data: bytes) -> bytes:
    """The inverse of sparse_vmemmap; ValueError if the chunks do not fit the length."""
    return read_sparse_vmemmap(data).dense()


def read_sparse_vmemmap(data: bytes) -> SparseBytes:
    """A version-2 vmemmap section as the raw bytes it stands for, read in place (a restore
    takes them chunk by chunk, never as the raw segment); ValueError if the chunks do not
    fit the length."""
    raw_bytes, chunk, count = VMEMMAP_HEAD.unpack_from(data)
    indices_end = VMEMMAP_HEAD.size + 8 * count
    indices = list(struct.unpack_from(f"<{count}Q", data, VMEMMAP_HEAD.size))
    if not chunk or indices != sorted(set(indices)) or (
            indices and indices[-1] * chunk >= raw_bytes):
        raise ValueError("the vmemmap chunks are not increasing indices inside the segment")
    stored_bytes = sum(min(chunk, raw_bytes - index * chunk) for index in indices)
    if indices_end + stored_bytes != len(data):
        raise ValueError(f"the vmemmap chunks hold {stored_bytes} bytes, the section"
                         f" {len(data) - indices_end}")
    return SparseBytes(raw_bytes, chunk, indices, data, indices_end)


def _section(name: str, data: bytes) -> bytes:
    raw = name.encode("ascii")
    packed = zlib.compress(data, COMPRESS_LEVEL)
    return SECTION_HEAD.pack(len(raw)) + raw + SECTION_LENGTH.pack(len(packed)) + packed


# -- decoding ------------------------------------------------------------------------------


def decode(data: bytes) -> StateFile:
    """Check and unpack a state file's bytes; StateFileError (one line) if anything is off."""
    length, digest = check_header(data[:HEADER.size], len(data))
    payload = memoryview(data)[HEADER.size:]
    if hashlib.sha256(payload).digest() != digest:
        raise StateFileError("corrupt: the SHA-256 checksum of the payload does not match")
    version = HEADER.unpack_from(data)[1]
    try:
        sections = _sections(payload)
        machine = json.loads(sections.pop("machine"))
        service = json.loads(sections.pop("service"))
        blobs = [sections.pop(f"vmemmap/{i}") for i in range(len(machine["vmemmap"]))]
        ints: dict[str, list[int]] = {}
        vmemmap: list[bytes | SparseBytes] = list(blobs)
        if version >= 2:
            ints = {name: unpack_ints(sections.pop(f"ints/{name}")) for name in STREAMS}
            vmemmap = [read_sparse_vmemmap(blob) for blob in blobs]
    except (LookupError, ValueError, TypeError, AttributeError, RecursionError, struct.error,
            zlib.error, OverflowError, MemoryError) as error:
        raise StateFileError(f"corrupt: cannot decode the payload ({_describe(error)})") from None
    if sections:
        raise StateFileError(f"corrupt: unknown sections {sorted(sections)}")
    return StateFile(version, machine, service, vmemmap, len(data), ints=ints)


def check_header(head: bytes, file_bytes: int) -> tuple[int, bytes]:
    """Check the first HEADER.size bytes of a `file_bytes`-byte file: magic, version, flags,
    announced length. Returns (payload length, SHA-256 digest); StateFileError otherwise."""
    if not file_bytes:
        raise StateFileError("empty file: not a pkvm-sim state file")
    if len(head) < len(MAGIC) or head[:len(MAGIC)] != MAGIC:
        raise StateFileError("not a pkvm-sim state file (wrong magic)")
    if len(head) < HEADER.size:
        raise StateFileError(f"truncated: {file_bytes} bytes, shorter than the header")
    _magic, version, flags, length, digest = HEADER.unpack_from(head)
    if version not in READ_VERSIONS:
        newer = "a newer" if version > FORMAT_VERSION else "an older, unsupported"
        raise StateFileError(f"format version {version} is {newer} format; this pkvm-sim"
                             f" reads versions {READ_VERSIONS[0]} to {READ_VERSIONS[-1]}")
    if flags & ~KNOWN_FLAGS:
        raise StateFileError(f"unknown header flags {flags:#010x}: format version"
                             f" {version} defines none")
    payload_bytes = file_bytes - HEADER.size
    if payload_bytes != length:
        what = "truncated" if payload_bytes < length else "has trailing bytes"
        raise StateFileError(f"{what}: the header announces {length} payload bytes, the file"
                             f" has {payload_bytes}")
    return length, digest


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
    with cyclic_collection_paused():
        try:
            hv = Hypervisor.boot(config)
            _apply(hv, state)
        except (PkvmError, AssertionError, LookupError, ValueError, TypeError, AttributeError,
                RecursionError) as error:  # whatever a well-checksummed but wrong file causes
            raise StateFileError(f"inconsistent machine state: {_describe(error)}") from None
        try:
            hv.audit()
        except AssertionError as error:
            raise StateFileError(
                f"the restored machine fails audit(): {_describe(error)}") from None
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
    guest_state = _holds_guest_state(state)
    if guest_state:
        raise StateFileError(f"{why}; this file holds guest shares or memcache pages, which"
                             f" {replacement} cannot have: it cannot be restored")
    config_map["profile"] = replacement
    note = f"{why}; restored as {replacement} (nothing in the file needs more)"
    if note not in state.notes:
        state.notes.append(note)
    return config_map


def _holds_guest_state(state: StateFile) -> bool:
    """Whether the file holds guest shares or memcache pages (read, nothing restored)."""
    m = state.machine
    if state.version == 1:
        return bool(m.get("guest_shared")) or any(
            decode_value(vm.get("memcache")) or decode_value(vm.get("hyp_memcache"))
            for vm in m.get("vms", [])
        )
    streams = {name: IntsIn(name, state.ints[name]) for name in STREAMS}
    for vm_state in m["vms"]:
        vm = GuestVm.from_state(vm_state, streams["vms"])
        if vm.memcache or vm.hyp_memcache:
            return True
        if vm_state["pool"] is not None:  # its pool's free lists and admitted pages
            for _ in range(int(vm_state["pool"]["max_order"]) + 1):
                streams["vms"].take_list()
    for _ in range(3 + 2):  # the owners (3 lists), the pages hyp borrows (2), then...
        streams["records"].take_list()
    return bool(streams["records"].take_list())  # ... the pages guests share


def _streams(state: StateFile) -> dict[str, IntsIn] | None:
    """Fresh readers of a version-2 file's streams (None for version 1)."""
    if state.version == 1:
        return None
    return {name: IntsIn(name, state.ints[name]) for name in STREAMS}


def _apply(hv: Hypervisor, state: StateFile) -> None:
    """Overwrite a freshly booted machine's mutable state with the file's."""
    hv.restore_state(state.machine, state.vmemmap, _streams(state))


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
    tmp = path.with_name(f".{path.name}{TEMPORARY_INFIX}{os.getpid()}")
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
        with open(path, "rb") as file:
            file_bytes = os.fstat(file.fileno()).st_size
            head = file.read(HEADER.size)
            check_header(head, file_bytes)  # before reading a byte more
            data = head + file.read()
    except OSError as error:
        raise StateFileError(f"cannot read: {error.strerror or error}") from None
    return decode(data)


def temporary_files(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files a save of `path` left behind when its process died mid-write."""
    target = Path(path)
    return sorted(target.parent.glob(f".{glob.escape(target.name)}{TEMPORARY_INFIX}*"))


__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Snapshot",
    "StateFile",
    "StateFileError",
    "check_header",
    "decode",
    "decode_value",
    "encode",
    "encode_value",
    "load",
    "restore",
    "pack",
    "save",
    "snapshot",
    "temporary_files",
    "write_snapshot",
]
