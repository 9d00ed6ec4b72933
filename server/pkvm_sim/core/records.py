"""ValueRecord: the equality, hash and repr of a frozen dataclass, for slotted classes.

The read-only records the core builds by the thousand (a fault's result, a pool's
statistics, a host allocation) are plain slotted classes with `Final` fields rather than
frozen dataclasses: a frozen dataclass's generated __init__ sets each field through
object.__setattr__, microseconds per record in the compiled core, where a plain __init__
compiles to stores. Deriving from ValueRecord gives them back what the dataclass gave.
"""

from __future__ import annotations

from typing import ClassVar


class ValueRecord:
    """Compares (with records of its own class only), hashes and prints by the values of
    `_FIELDS`, which a subclass names, in order; its `__slots__` are the same names."""

    __slots__ = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self._FIELDS])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ValueRecord) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}"
                           for name, value in zip(self._FIELDS, self._values(), strict=True))
        return f"{type(self).__name__}({fields})"
