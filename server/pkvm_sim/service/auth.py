"""VM tokens: CreateVM hands one out; every per-VM call must present it.

A call on behalf of VM `handle` carries gRPC metadata `authorization: Bearer <token>`. The
service checks, in this order: the handle names a live VM (else NOT_FOUND, so a stale handle
reads as what it is), then the token is present (else UNAUTHENTICATED, MISSING_TOKEN) and is
that VM's (else UNAUTHENTICATED, BAD_TOKEN). Tokens are compared in constant time.

A successful check renews the VM's lease (service/leases.py): every call made on behalf of
a VM, unary or an Execute batch, goes through `check`, so no RPC can forget to renew.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable

import grpc

from .errors import ServiceError
from .leases import LeaseTable

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

    def __init__(self, leases: LeaseTable | None = None) -> None:
        self._tokens: dict[int, str] = {}
        self.leases = leases if leases is not None else LeaseTable(default_seconds=0)

    def __contains__(self, handle: int) -> bool:
        return handle in self._tokens

    def issue(self, handle: int, lease_seconds: float = 0.0) -> str:
        """A new token for VM `handle`, and its lease (0 = none; see LeaseTable.validate)."""
        token = secrets.token_urlsafe(24)
        self._tokens[handle] = token
        self.leases.grant(handle, lease_seconds)
        return token

    def revoke(self, handle: int) -> None:
        """Forget VM `handle`'s token and lease (it was destroyed)."""
        self._tokens.pop(handle, None)
        self.leases.drop(handle)

    def check(self, handle: int, token: str | None) -> None:
        """Raise ServiceError unless `token` is VM `handle`'s; renew its lease if it is."""
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
        self.leases.renew(handle)
