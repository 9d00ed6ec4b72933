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
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pkvm_client import Hypervisor


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (as the SDK's Hypervisor)")
    group.add_argument("--tls", action="store_true",
                       help="connect with TLS (implied by --ca-file or --cert-file)")
    group.add_argument("--ca-file", type=Path, metavar="PEM",
                       help="CA bundle to trust (default: the system's)")
    group.add_argument("--cert-file", type=Path, metavar="PEM",
                       help="client certificate chain for mutual TLS (with --key-file)")
    group.add_argument("--key-file", type=Path, metavar="PEM",
                       help="client private key for mutual TLS (with --cert-file)")
    group.add_argument("--client-token-file", type=Path, metavar="FILE",
                       help="the client token of a server started with --client-token-file")


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def connect(target: str, args: argparse.Namespace, *, timeout: float | None) -> Hypervisor:
    """A Hypervisor for `target` with the connection arguments' settings; `timeout` is every
    call's deadline. OSError when a PEM or token file cannot be read, ValueError for a key
    without a certificate (or the reverse)."""
    from pkvm_client import Hypervisor

    token_file: Path | None = args.client_token_file
    token = token_file.read_text().strip() if token_file is not None else None
    return Hypervisor(
        target, timeout=timeout, tls=args.tls, root_certificates=_read(args.ca_file),
        certificate_chain=_read(args.cert_file), private_key=_read(args.key_file),
        client_token=token or None,
    )
