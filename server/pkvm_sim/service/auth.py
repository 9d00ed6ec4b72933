"""Credentials: per-VM tokens, and the optional client token for host-wide calls.

A call on behalf of VM `handle` carries gRPC metadata `authorization: Bearer <token>` (the
scheme is case-insensitive, RFC 6750). The service checks, in this order: the handle names
a live VM (else NOT_FOUND, so a stale handle reads as what it is), then the token is present
(else UNAUTHENTICATED, MISSING_TOKEN) and is that VM's (else UNAUTHENTICATED, BAD_TOKEN).

An Execute stream is authenticated when it starts, from its metadata alone: the token names
its VM (`TokenRegistry.handle_of`), so a stream without a valid token is refused before it
can hold anything. Tokens are looked up by their SHA-256 digest and then compared with
`hmac.compare_digest`, so neither step's timing depends on how much of a guess is right.
Tokens are never logged.

With a client token configured (`--client-token-file`), CreateVM and the host-wide calls
(MapMMIO, HostFault) need `authorization: Bearer <client token>` (`ClientToken.check`).

A successful VM check renews the VM's lease (service/leases.py): every call made on behalf of
a VM, unary or an Execute batch, goes through `check`, so no RPC can forget to renew.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from pathlib import Path

import grpc

from .errors import ServiceError
from .leases import LeaseTable

AUTH_METADATA_KEY = "authorization"
BEARER_SCHEME = "bearer"
MAX_TOKEN_BYTES = 1024  # longer authorization values are refused without hashing them
REMEMBERED_REVOKED = 4096  # tokens of destroyed VMs still answered NOT_FOUND, not BAD_TOKEN


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token of a call's invocation metadata: None when there is no
    `authorization` entry, "" when it is not a Bearer credential."""
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if value.startswith("Bearer ") and len(value) <= _MAX_BEARER_VALUE \
                    and " " not in value[7:]:
                return value[7:]  # the SDK's form, checked without splitting
            scheme, _, credential = value.strip().partition(" ")
            if scheme.lower() != BEARER_SCHEME or len(credential) > MAX_TOKEN_BYTES:
                return ""
            return credential.strip()
    return None


_MAX_BEARER_VALUE = len("Bearer ") + MAX_TOKEN_BYTES


def _same(token: str, expected: str) -> bool:
    """Constant-time comparison (the expected token is ASCII: secrets.token_urlsafe)."""
    if token.isascii():
        return hmac.compare_digest(token, expected)
    return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _unauthenticated(reason: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def missing_token(what: str) -> ServiceError:
    return _unauthenticated("MISSING_TOKEN",
                            f"{what} need metadata 'authorization: Bearer <token>'")


class TokenRegistry:
    """handle -> token of every live VM (and digest -> handle, for streams). Writes happen
    under the service lock together with the VM's creation or destruction."""

    def __init__(self, leases: LeaseTable | None = None) -> None:
        self._tokens: dict[int, str] = {}
        self._handles: dict[bytes, int] = {}
        self._revoked: dict[bytes, int] = {}  # digest -> handle of recently destroyed VMs
        self.leases = leases if leases is not None else LeaseTable(default_seconds=0)

    def __contains__(self, handle: int) -> bool:
        return handle in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def issue(self, handle: int, lease_seconds: float = 0.0) -> str:
        """A new token for VM `handle`, and its lease (0 = none; see LeaseTable.validate)."""
        token = secrets.token_urlsafe(24)
        self._tokens[handle] = token
        self._handles[_digest(token)] = handle
        self.leases.grant(handle, lease_seconds)
        return token

    def tokens(self) -> list[tuple[int, str]]:
        """(handle, token) of every live VM, in issue order (a state file's service part)."""
        return list(self._tokens.items())

    def adopt(self, handle: int, token: str) -> None:
        """Take back a token saved in a state file (service/persist.py); no lease."""
        self._tokens[handle] = token
        self._handles[_digest(token)] = handle

    def revoke(self, handle: int) -> None:
        """Forget VM `handle`'s token and lease (it was destroyed)."""
        token = self._tokens.pop(handle, None)
        if token is not None:
            digest = _digest(token)
            self._handles.pop(digest, None)
            self._revoked[digest] = handle
            if len(self._revoked) > REMEMBERED_REVOKED:
                del self._revoked[next(iter(self._revoked))]  # the oldest
        self.leases.drop(handle)

    def check(self, handle: int, token: str | None) -> None:
        """Raise ServiceError unless `token` is VM `handle`'s; renew its lease if it is."""
        expected = self._tokens.get(handle)
        if expected is None:
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND", f"no VM with handle {handle:#x}"
            )
        if token is None:
            raise missing_token("per-VM calls")
        if not _same(token, expected):
            raise _unauthenticated("BAD_TOKEN", f"the token is not VM {handle:#x}'s")
        self.leases.renew(handle)

    def holds(self, handle: int, token: str | None) -> bool:
        """Whether `token` is still VM `handle`'s (the VM was not destroyed, and its handle
        not given to a new VM, since the token was checked)."""
        expected = self._tokens.get(handle)
        return expected is not None and token is not None and _same(token, expected)

    def handle_of(self, token: str | None) -> int:
        """The VM whose token this is (an Execute stream's VM, known at stream start)."""
        if token is None:
            raise missing_token("Execute streams")
        digest = _digest(token)
        handle = self._handles.get(digest) if token else None
        if handle is None and digest in self._revoked:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND",
                               f"VM {self._revoked[digest]:#x} was destroyed")
        expected = self._tokens.get(handle) if handle is not None else None
        if handle is None or expected is None or not hmac.compare_digest(
            token.encode(), expected.encode()
        ):
            raise _unauthenticated("BAD_TOKEN", "the token is no live VM's")
        return handle


class ClientToken:
    """The token CreateVM and the host-wide calls need, when one is configured."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None

    @classmethod
    def from_file(cls, path: str | Path | None) -> ClientToken:
        """Read the token (surrounding whitespace stripped); an empty file is an error."""
        if path is None:
            return cls(None)
        token = Path(path).read_text(encoding="utf-8").strip()
        if not token or len(token) > MAX_TOKEN_BYTES or any(c.isspace() for c in token):
            raise ValueError(f"{path}: the client token must be 1..{MAX_TOKEN_BYTES} "
                             "characters without whitespace")
        return cls(token)

    @property
    def required(self) -> bool:
        return self._token is not None

    def check(self, token: str | None, what: str) -> None:
        if self._token is None:
            return
        if token is None:
            raise missing_token(f"{what} (a client token is configured)")
        if not hmac.compare_digest(token.encode(), self._token):
            raise _unauthenticated("BAD_CLIENT_TOKEN", f"{what}: the client token is wrong")
