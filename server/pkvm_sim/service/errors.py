"""PkvmError -> gRPC status (docs/service.md, Errors): the server's one mapping table.

Every refusal leaves the service as a status code plus a `google.rpc.ErrorInfo` detail
(domain `pkvm.v1`) whose reason is the core's machine-readable `reason` and whose metadata
carries `errno` and `would_panic`. The SDK maps the code (and, for FAILED_PRECONDITION, the
reason) back to typed exceptions with its own single table.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status  # type: ignore[import-untyped]

from pkvm_sim.core import errors as core_errors

DOMAIN = "pkvm.v1"

# The core's error classes in lookup order (subclasses first if any are added later).
STATUS_OF_ERROR: tuple[tuple[type[core_errors.PkvmError], grpc.StatusCode], ...] = (
    (core_errors.OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (core_errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (core_errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (core_errors.Busy, grpc.StatusCode.FAILED_PRECONDITION),
    (core_errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (core_errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (core_errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (core_errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (core_errors.WouldPanic, grpc.StatusCode.FAILED_PRECONDITION),
)


# Reasons whose status differs from their class's: a configuration the running profile does
# not model is a precondition of the machine, not a bad argument.
STATUS_OF_REASON: dict[str, grpc.StatusCode] = {
    "NOT_IN_PROFILE": grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code_of(error: core_errors.PkvmError) -> grpc.StatusCode:
    by_reason = STATUS_OF_REASON.get(error.reason)
    if by_reason is not None:
        return by_reason
    for cls, code in STATUS_OF_ERROR:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.FAILED_PRECONDITION


class ServiceError(Exception):
    """A refusal decided by the service layer itself (auth, malformed request, batch size)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def describe(error: BaseException) -> tuple[grpc.StatusCode, str, str, str, bool]:
    """(code, reason, message, errno, would_panic) of a refusal."""
    if isinstance(error, core_errors.PkvmError):
        return (
            status_code_of(error), error.reason, error.message, error.errno_name,
            error.would_panic,
        )
    if isinstance(error, ServiceError):
        return error.code, error.reason, error.message, "", False
    raise TypeError(f"not a refusal: {error!r}")


def to_status(error: BaseException) -> grpc.Status:
    """The rich status (code, message, ErrorInfo detail) for a refusal."""
    code, reason, message, errno_name, would_panic = describe(error)
    info = error_details_pb2.ErrorInfo(
        reason=reason,
        domain=DOMAIN,
        metadata={"errno": errno_name, "would_panic": "true" if would_panic else "false"},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    if would_panic:
        message = f"the real hypervisor would panic: {message}"
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=[detail]
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> NoReturn:
    """End the call with the refusal's rich status (raises)."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returned")  # pragma: no cover
