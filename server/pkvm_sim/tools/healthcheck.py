"""`pkvm-sim healthcheck`: exit 0 when a pkvm-sim service answers SERVING, for the image's
HEALTHCHECK.

    pkvm-sim healthcheck                       # every port the container's processes listen on
    pkvm-sim healthcheck --pid 1234            # the ports of one process
    pkvm-sim healthcheck --target host:50051   # one address
    pkvm-sim healthcheck --target host:50051 --ca-file ca.pem   # a TLS server

Without --target it follows the port the server really uses, whatever `--listen`, config file
or environment chose: it reads the listening TCP sockets of the processes it can see
(/proc/PID/fd against /proc/net/tcp and tcp6) and asks the standard grpc.health.v1 service on
each, through the SDK (`Hypervisor.serving`, with the TLS options of tools/connect.py). The
metrics port, which speaks HTTP/1.1, fails that check quickly. Exit status: 0 when
one says SERVING, 1 otherwise (nothing listening, NOT_SERVING, no answer).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from .connect import add_connection_arguments, connect

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
TCP_LISTEN = "0A"  # the st column of /proc/net/tcp for a listening socket
_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="HOST:PORT", help="check this address only")
    parser.add_argument("--pid", type=int, help="check the ports this process listens on")
    parser.add_argument(
        "--timeout", type=float, default=3.0, metavar="S", help="per-address timeout (3)"
    )
    add_connection_arguments(parser)


def socket_inodes(pids: Iterable[str]) -> set[str]:
    """Inodes of the sockets the given processes hold open (unreadable ones are skipped)."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # gone, or another user's
        inodes.update(m.group(1) for link in links if (m := _SOCKET_LINK.fullmatch(link)))
    return inodes


def listening_addresses(table: str, inodes: set[str]) -> list[str]:
    """The `host:port` targets of listening sockets in a /proc/net/tcp{,6} table whose inode
    is in `inodes`; wildcard addresses become loopback."""
    targets = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != TCP_LISTEN or fields[9] not in inodes:
            continue
        hex_address, hex_port = fields[1].split(":")
        raw = bytes.fromhex(hex_address)
        # The kernel prints each 32-bit word of the address in host (little-endian) order.
        address = ipaddress.ip_address(
            b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        )
        port = int(hex_port, 16)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_unspecified:
            address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
        host = f"[{address}]" if address.version == 6 else str(address)
        targets.append(f"{host}:{port}")
    return targets


def discover_targets(pid: int | None) -> list[str]:
    pids = [str(pid)] if pid is not None else [p.name for p in Path("/proc").iterdir()
                                                if p.name.isdigit()]
    inodes = socket_inodes(pids)
    targets: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            targets += listening_addresses(Path(table).read_text(), inodes)
        except OSError:
            continue  # no IPv6 in this namespace
    return sorted(set(targets))


def is_serving(target: str, args: argparse.Namespace, timeout: float) -> bool:
    with connect(target, args, timeout=timeout) as hv:
        return hv.serving()


def run(args: argparse.Namespace) -> int:
    targets = [args.target] if args.target else discover_targets(args.pid)
    try:
        for target in targets:
            if is_serving(target, args, args.timeout):
                print(f"SERVING on {target}")
                return EXIT_HEALTHY
    except (OSError, ValueError) as error:  # an unreadable PEM or token file
        print(f"healthcheck: error: {error}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"not serving (checked: {', '.join(targets) or 'no listening port'})", file=sys.stderr)
    return EXIT_UNHEALTHY
