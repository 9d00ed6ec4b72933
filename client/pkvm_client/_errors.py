"""Typed exceptions of the SDK, and the one table that maps gRPC statuses to them.

Catch the narrowest class you can act on::

    PkvmError                        any refusal or failure of a call
     ├── OutOfMemoryError            RESOURCE_EXHAUSTED: the pool or host RAM is exhausted
     ├── InvalidArgumentError        INVALID_ARGUMENT: malformed request (bad order, address...)
     │    └── OutOfRangeError        OUT_OF_RANGE: pfn or address beyond what exists
     ├── NotFoundError               NOT_FOUND: unknown or destroyed VM handle
     ├── AlreadyExistsError          ALREADY_EXISTS
     ├── PermissionDeniedError       PERMISSION_DENIED: another VM's page, state-machine refusal
     │    └── AuthenticationError    UNAUTHENTICATED: missing or wrong VM token
     ├── FailedPreconditionError     FAILED_PRECONDITION: the state does not allow it
     │    ├── BusyError              reason BUSY (-EBUSY): e.g. unsharing a pinned page
     │    └── WouldPanicError        the real hypervisor would panic (BUG_ON); refused here
     └── TransportError              the call did not reach a verdict: UNAVAILABLE,
                                     DEADLINE_EXCEEDED, CANCELLED, INTERNAL...

Every refusal left the simulator unchanged. Each exception carries the gRPC `code`, the
machine-readable `reason` (google.rpc.ErrorInfo, domain pkvm.v1), the kernel `errno` name
when there is one and `would_panic`. A refused operation of an Execute batch gets the same
class, `reason` and `errno` as the unary call would (the server reports all three per
operation), so one `except BusyError:` serves both. An operation not run because an earlier
one was refused (`stop_on_error`) is a TransportError with code ABORTED.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

DOMAIN = "pkvm.v1"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class PkvmError(Exception):
    """Base of every error the SDK raises for a call."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        errno: str = "",
        would_panic: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.errno = errno
        self.would_panic = would_panic

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.reason!r}: {self.message!r})"


class OutOfMemoryError(PkvmError):
    """RESOURCE_EXHAUSTED (-ENOMEM)."""


class InvalidArgumentError(PkvmError):
    """INVALID_ARGUMENT (-EINVAL)."""


class OutOfRangeError(InvalidArgumentError):
    """OUT_OF_RANGE (-ERANGE)."""


class NotFoundError(PkvmError):
    """NOT_FOUND (-ENOENT): unknown VM handle."""


class AlreadyExistsError(PkvmError):
    """ALREADY_EXISTS (-EEXIST)."""


class PermissionDeniedError(PkvmError):
    """PERMISSION_DENIED (-EPERM): not this VM's page, or a page-state refusal."""


class AuthenticationError(PermissionDeniedError):
    """UNAUTHENTICATED: the call's VM token is missing or wrong."""


class FailedPreconditionError(PkvmError):
    """FAILED_PRECONDITION: the current state does not allow the operation."""


class BusyError(FailedPreconditionError):
    """-EBUSY: e.g. the page is pinned by EL2."""


class WouldPanicError(FailedPreconditionError):
    """The real hypervisor would BUG/panic here; the simulator refused and changed nothing."""


class TransportError(PkvmError):
    """The call reached no verdict (server unavailable, deadline, cancelled, internal)."""


# The SDK's one mapping table: gRPC status code -> exception class.
ERROR_OF_CODE: dict[grpc.StatusCode, type[PkvmError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: OutOfMemoryError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def error_class(
    code: grpc.StatusCode, reason: str, errno: str, would_panic: bool
) -> type[PkvmError]:
    """The exception class for a status; FAILED_PRECONDITION is refined by the ErrorInfo."""
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        if would_panic:
            return WouldPanicError
        if reason == "BUSY" or errno == "EBUSY":
            return BusyError
    return ERROR_OF_CODE.get(code, TransportError)


def make_error(
    code: grpc.StatusCode | int, message: str, reason: str = "", errno: str = "",
    would_panic: bool = False,
) -> PkvmError:
    """The typed exception for a refusal (unary status or batch operation alike)."""
    if isinstance(code, int):
        code = _CODE_OF_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    cls = error_class(code, reason, errno, would_panic)
    return cls(message, code=code, reason=reason, errno=errno, would_panic=would_panic)


def _error_info(trailing: Iterable[tuple[str, Any]] | None) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing or ():
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def from_rpc_error(error: grpc.RpcError) -> PkvmError:
    """Translate a failed call (sync or asyncio) into the typed exception."""
    call: Any = error  # a grpc.Call (sync) or an AioRpcError
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    info = _error_info(call.trailing_metadata())
    if info is None or info.domain != DOMAIN:
        return make_error(code, message)
    return make_error(
        code, message, info.reason, info.metadata.get("errno", ""),
        info.metadata.get("would_panic") == "true",
    )
