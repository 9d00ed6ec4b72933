"""JSON values of a state file's "machine" section (docs/state-file.md), shared by the core
objects that write their own state (`state()`) and read it back (`restore()`).

Page contents and VM fields: scalars as themselves, a tuple as an array, {"l": [...]} a list,
{"s": [...]} a set (sorted), {"d": [[key, value], ...]} a dict. A table page (a dict
{index: pte tuple}) and a memcache link (a tuple of scalars) take fast paths that give the
very same JSON as the general rule (json writes a tuple as an array), so files stay
byte-identical while a save costs one list per table page, not one object per entry.
"""

from __future__ import annotations

from typing import Any


def encode_value(value: Any) -> Any:
    """A page content or VM field as JSON values (the rule above)."""
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
    """The inverse of encode_value: an array is a tuple again."""
    if isinstance(value, list):
        return tuple(decode_value(v) for v in value)
    if isinstance(value, dict):
        if "l" in value:
            return [decode_value(v) for v in value["l"]]
        if "s" in value:
            return {decode_value(v) for v in value["s"]}
        return {decode_value(k): decode_value(v) for k, v in value["d"]}
    return value


def _flat_scalars(values: tuple[Any, ...]) -> bool:
    return all(v is None or isinstance(v, bool | int | str | float) for v in values)


def encode_page(content: Any) -> Any:
    """A page's content: a table page's entries are (int index, pte tuple of ints) pairs
    kept as they are (the tuples become arrays in JSON); anything else by the general rule."""
    if isinstance(content, dict):
        entries = [[index, pte] for index, pte in content.items()]
        if all(type(index) is int and type(pte) is tuple and _flat_scalars(pte)
               for index, pte in entries):
            return {"d": entries}
    return encode_value(content)


def decode_page(value: Any) -> Any:
    """The inverse of encode_page: a table page's entries back as {index: pte tuple}."""
    if isinstance(value, dict) and "d" in value:
        entries = value["d"]
        if all(type(index) is int and type(pte) is list and _flat_scalars(tuple(pte))
               for index, pte in entries):
            return {index: tuple(pte) for index, pte in entries}
    return decode_value(value)
