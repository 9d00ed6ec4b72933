"""VM tokens: CreateVM hands one out; every per-VM call must present it.

A call on behalf of VM `handle` carries gRPC metadata `authorization: Bearer <token>`. The
service checks, in this order: the handle names a live VM (else NOT_FOUND, so a stale handle
reads as what it is), then the token is present (else UNAUTHENTICATED, MISSING_TOKEN) and is
that VM's (else UNAUTHENTICATED, BAD_TOKEN). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable

import grpc

from .errors import ServiceError

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "Bearer "


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The bearer token of a call's invocation metadata, or None."""
    for key, value in metadata:
        if key == AUTH_METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            return value[len(BEARER_PREFIX):] if value.startswith(BEARER_PREFIX) else ""
    return None


class TokenRegistry:
    """handle -> token of every live VM. Reads are lock-free (one dict lookup); writes happen
    under the service lock together with the VM's creation or destruction."""

    def __init__(self) -> None:
        self._tokens: dict[int, str] = {}

    def issue(self, handle: int) -> str:
        token = secrets.token_urlsafe(24)
        self._tokens[handle] = token
        return token

    def revoke(self, handle: int) -> None:
        self._tokens.pop(handle, None)

    def check(self, handle: int, token: str | None) -> None:
        """Raise ServiceError unless `token` is VM `handle`'s."""
        expected = self._tokens.get(handle)
        if expected is None:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND", f"no VM with handle {handle:#x}"
            )
        if token is None:
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN",
                "per-VM calls need metadata 'authorization: Bearer <token>'",
            )
        if not hmac.compare_digest(token.encode(), expected.encode()):
            raise ServiceError(
                grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN",
                f"the token is not VM {handle:#x}'s",
            )
