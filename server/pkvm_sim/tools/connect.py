"""How a CLI tool reaches a running server: through the SDK, with its TLS, client token and
deadline settings, so a tool works against any server a program can reach.

    parser = argparse.ArgumentParser()
    add_connection_arguments(parser)          # --tls, --ca-file, --cert-file, --key-file,
    args = parser.parse_args()                # --client-token-file
    with connect(args.target, args, timeout=args.timeout) as hv:
        hv.stats()
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pkvm_client import Hypervisor


def add_connection_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The SDK's connection options; `prefix` goes before each name, for a parser whose own
    options could clash (the Locust file's are --pkvm-tls, --pkvm-ca-file...)."""
    group = parser.add_argument_group("connection (as the SDK's Hypervisor)")
    group.add_argument(f"--{prefix}tls", action="store_true",
                       help="connect with TLS (implied by --ca-file or --cert-file)")
    group.add_argument(f"--{prefix}ca-file", type=Path, metavar="PEM",
                       help="CA bundle to trust (default: the system's)")
    group.add_argument(f"--{prefix}cert-file", type=Path, metavar="PEM",
                       help="client certificate chain for mutual TLS (with --key-file)")
    group.add_argument(f"--{prefix}key-file", type=Path, metavar="PEM",
                       help="client private key for mutual TLS (with --cert-file)")
    group.add_argument(f"--{prefix}client-token-file", type=Path, metavar="FILE",
                       help="the client token of a server started with --client-token-file")


@dataclass(frozen=True)
class Connection:
    """The SDK's connection settings, read from the connection arguments: the keywords of
    both `Hypervisor` and `AsyncHypervisor` (so a synchronous tool and the asyncio load tool
    reach the same servers)."""

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    client_token: str | None = None

    def sdk_keywords(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    def describe(self) -> dict[str, bool]:
        """What a report may say about the connection: which credentials, never their bytes."""
        pem = (self.root_certificates, self.certificate_chain, self.private_key)
        return {"tls": self.tls or any(part is not None for part in pem),
                "client_certificate": self.certificate_chain is not None,
                "client_token": self.client_token is not None}


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def connection_from_args(args: argparse.Namespace, prefix: str = "") -> Connection:
    """The settings the connection arguments (added with the same `prefix`) ask for. OSError
    when a PEM or token file cannot be read, ValueError for a key without a certificate (or
    the reverse)."""
    dest = prefix.replace("-", "_")

    def given(name: str) -> Any:
        return getattr(args, dest + name)

    cert_file, key_file = given("cert_file"), given("key_file")
    if (key_file is None) != (cert_file is None):
        raise ValueError(f"--{prefix}cert-file and --{prefix}key-file go together (mutual TLS)")
    token_file: Path | None = given("client_token_file")
    token = token_file.read_text().strip() if token_file is not None else None
    return Connection(tls=bool(given("tls")), root_certificates=_read(given("ca_file")),
                      certificate_chain=_read(cert_file), private_key=_read(key_file),
                      client_token=token or None)


def connect(target: str, args: argparse.Namespace, *, timeout: float | None) -> Hypervisor:
    """A Hypervisor for `target` with the connection arguments' settings; `timeout` is every
    call's deadline. Raises as `connection_from_args`."""
    from pkvm_client import Hypervisor

    return Hypervisor(target, timeout=timeout, **connection_from_args(args).sdk_keywords())
