"""Struct sizes from a kernel image's own BTF (the `.BTF` section of an arm64 Image).

Debian's arm64 vmlinuz is a plain, uncompressed Image; its BTF (type information the kernel
carries for BPF) includes the EL2 structs, so the image itself says how big `struct hyp_page`
is in the kernel that was booted:

    python -m pkvm_sim.tools.kernel_btf IMAGE hyp_page pkvm_hyp_vm pkvm_hyp_vcpu

The section is found by its header (magic 0xeB9F, version 1, a 24-byte header, then the type
and string sections, types first); only the types' sizes and names are decoded. No bpftool is
needed (`bpftool btf dump file` on the extracted blob agrees).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["btf_blob", "struct_sizes"]

_MAGIC = b"\x9f\xeb\x01"  # 0xeB9F little-endian, then version 1
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type/str off and len
_TYPE = struct.Struct("<III")  # name_off, info, size_or_type
_MIN_TYPES_BYTES = 1 << 20  # a kernel's type section is megabytes; shorter hits are noise

_KIND_STRUCT = 4
# Bytes that follow the 12-byte common part of a type, by kind: (fixed, per vlen item).
_TRAILER: dict[int, tuple[int, int]] = {
    1: (4, 0),  # INT
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    17: (4, 0),  # DECL_TAG
    19: (0, 12),  # ENUM64
}


def btf_blob(image: bytes) -> memoryview:
    """The BTF section of a kernel image; ValueError when there is none."""
    start = 0
    while (start := image.find(_MAGIC, start)) >= 0:
        if start + _HEADER.size <= len(image):
            _m, _v, _f, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
                image, start)
            end = start + hdr_len + str_off + str_len
            if (hdr_len == _HEADER.size and type_off == 0 and type_len >= _MIN_TYPES_BYTES
                    and str_off == type_len and end <= len(image)):
                return memoryview(image)[start:end]
        start += 1
    raise ValueError("no BTF section in this image")


def _types(blob: memoryview) -> Iterator[tuple[int, int, int]]:
    """(kind, name offset, size) of every type, in id order."""
    _m, _v, _f, hdr_len, type_off, type_len, _so, _sl = _HEADER.unpack_from(blob)
    offset = hdr_len + type_off
    end = offset + type_len
    while offset < end:
        name_off, info, size = _TYPE.unpack_from(blob, offset)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        fixed, per_item = _TRAILER.get(kind, (0, 0))
        offset += _TYPE.size + fixed + per_item * vlen
        yield kind, name_off, size


def struct_sizes(image: bytes, names: Sequence[str]) -> dict[str, int]:
    """sizeof(struct NAME) for each of `names` found in the image's BTF."""
    blob = btf_blob(image)
    _m, _v, _f, hdr_len, _to, _tl, str_off, _sl = _HEADER.unpack_from(blob)
    strings = bytes(blob[hdr_len + str_off:])
    wanted = {name.encode() for name in names}
    sizes: dict[str, int] = {}
    for kind, name_off, size in _types(blob):
        if kind != _KIND_STRUCT:
            continue
        name = strings[name_off:strings.index(b"\0", name_off)]
        if name in wanted:
            sizes.setdefault(name.decode(), size)  # the first definition (no duplicates)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m pkvm_sim.tools.kernel_btf IMAGE STRUCT...", file=sys.stderr)
        return 2
    try:
        sizes = struct_sizes(Path(args[0]).read_bytes(), args[1:])
    except (OSError, ValueError) as error:
        print(f"kernel_btf: {error}", file=sys.stderr)
        return 1
    for name in args[1:]:
        print(f"struct {name}: {sizes.get(name, 'not in BTF')}")
    return 0 if len(sizes) == len(set(args[1:])) else 1


if __name__ == "__main__":
    sys.exit(main())
