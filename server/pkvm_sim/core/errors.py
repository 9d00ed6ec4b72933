"""Errors of the simulation core.

Every refusal is a `PkvmError` carrying the kernel errno it models, a machine-readable
`reason` (UPPER_SNAKE_CASE, stable: the service puts it in google.rpc.ErrorInfo) and
`would_panic` for what the real hypervisor treats as BUG_ON / hyp_panic. Raising one
guarantees the simulated state is exactly what it was before the call.

    PkvmError
     ├── OutOfMemory          -ENOMEM  (pool empty, order too big for the pool)
     ├── InvalidArgument      -EINVAL  (malformed request: bad order, misaligned address)
     ├── PermissionDenied     -EPERM   (page-state machine refusal, foreign page)
     ├── Busy                 -EBUSY   (pinned page, loaded vCPU)
     ├── AlreadyExists        -EEXIST
     ├── NotFound             -ENOENT  (unknown VM handle)
     ├── OutOfRange           -ERANGE  (address beyond the IPA space, pfn outside memory)
     ├── FailedPrecondition   (a request the state does not allow, e.g. sharing without
     │                          a vmemmap covering all memory)
     └── WouldPanic           kernel BUG: refcount overflow, put of a free page, a page
                              outside the pool, an uncovered vmemmap entry
"""

from __future__ import annotations

from typing import ClassVar


class PkvmError(Exception):
    """Base of every refusal from the core.

    The three class attributes are ClassVars: per class, overridden by subclasses in any
    module (mypyc would otherwise make them per-instance defaults that subclasses compiled
    elsewhere do not see)."""

    errno_name: ClassVar[str] = ""
    default_reason: ClassVar[str] = "ERROR"
    would_panic: ClassVar[bool] = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message})"


class OutOfMemory(PkvmError):
    errno_name = "ENOMEM"
    default_reason = "OUT_OF_MEMORY"


class InvalidArgument(PkvmError):
    errno_name = "EINVAL"
    default_reason = "INVALID_ARGUMENT"


class PermissionDenied(PkvmError):
    errno_name = "EPERM"
    default_reason = "PERMISSION_DENIED"


class Busy(PkvmError):
    errno_name = "EBUSY"
    default_reason = "BUSY"


class AlreadyExists(PkvmError):
    errno_name = "EEXIST"
    default_reason = "ALREADY_EXISTS"


class NotFound(PkvmError):
    errno_name = "ENOENT"
    default_reason = "NOT_FOUND"


class OutOfRange(PkvmError):
    errno_name = "ERANGE"
    default_reason = "OUT_OF_RANGE"


class FailedPrecondition(PkvmError):
    default_reason = "FAILED_PRECONDITION"


class WouldPanic(PkvmError):
    """What the real hypervisor would BUG on; here it is refused and nothing changes."""

    default_reason = "WOULD_PANIC"
    would_panic = True
