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

With client tokens configured (`--client-token-file`, one per line, each one client's),
CreateVM and the host-wide calls (MapMMIO, HostFault) need `authorization: Bearer <client
token>` (`ClientToken.check`), which names the client the per-client caps count against;
without, a client is its connection (`client_of`).

A successful VM check renews the VM's lease (service/leases.py): every call made on behalf of
a VM, unary or an Execute batch, goes through `check`, so no RPC can forget to renew.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from .errors import ServiceError
from .leases import LeaseTable

AUTH_METADATA_KEY = "authorization"
BEARER_SCHEME = "bearer"
MAX_TOKEN_BYTES = 1024  # longer authorization values are refused without hashing them
DEFAULT_CLIENT = "client"  # the client of a lone token
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
    """The tokens CreateVM and the host-wide calls need, when any is configured; each is
    one client's (its name is who the per-client caps count against)."""

    def __init__(self, token: str | None, *, named: Mapping[str, str] | None = None) -> None:
        """`token`: one token, client name "client"; `named`: client name -> token."""
        tokens = dict(named or {})
        if token:
            tokens.setdefault(DEFAULT_CLIENT, token)
        self._tokens = [(secret.encode(), name) for name, secret in tokens.items()]

    @classmethod
    def from_file(cls, path: str | Path | None) -> ClientToken:
        """Read the tokens: one per line, `TOKEN` or `NAME TOKEN` (the line's client; an
        unnamed line's client is "client" for a file of one token, else "line-N"). Blank
        lines and lines starting with '#' are skipped; a file with no token is an error, and
        so is a token or name given twice."""
        if path is None:
            return cls(None)
        lines = [(number, line.split()) for number, line in enumerate(
            Path(path).read_text(encoding="utf-8").splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]
        named: dict[str, str] = {}
        for number, words in lines:
            if len(words) > 2 or not all(1 <= len(w) <= MAX_TOKEN_BYTES for w in words):
                raise ValueError(f"{path}:{number}: expected TOKEN or NAME TOKEN, a token of "
                                 f"1..{MAX_TOKEN_BYTES} characters without whitespace")
            token = words[-1]
            name = words[0] if len(words) == 2 else (
                DEFAULT_CLIENT if len(lines) == 1 else f"line-{number}")
            if name in named or token in named.values():
                raise ValueError(f"{path}:{number}: client {name!r} or its token is given twice")
            named[name] = token
        if not named:
            raise ValueError(f"{path}: the client token file holds no token")
        return cls(None, named=named)

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    @property
    def names(self) -> frozenset[str]:
        """The clients the tokens name (a restored VM keeps a client named here)."""
        return frozenset(name for _secret, name in self._tokens)

    def check(self, token: str | None, what: str) -> str | None:
        """The name of the client whose token this is; None when no token is configured.
        Every configured token is compared (in constant time), whichever matches."""
        if not self._tokens:
            return None
        if token is None:
            raise missing_token(f"{what} (a client token is configured)")
        given = token.encode()
        client = None
        for secret, name in self._tokens:
            if hmac.compare_digest(given, secret):
                client = name
        if client is None:
            raise _unauthenticated("BAD_CLIENT_TOKEN", f"{what}: the client token is wrong")
        return client


def client_of(named: str | None, peer: str) -> str:
    """Who a call is, for the per-client caps: the client its token names, else its
    connection (the gRPC peer, such as ipv4:127.0.0.1:50412)."""
    return named if named is not None else peer
