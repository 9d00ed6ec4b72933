"""Settings of the server, free of gRPC: what `knobs.py` describes and the service runs with.

`Limits` (what one tenant may take), `ServerSettings` (transport, security, tenancy),
`split_host_port` and the one boolean parser every configuration source goes through
(`parse_bool`, the core's, so SimConfig's faithful_bugs and the server knobs agree). The
offline tools and `knobs.py` import this module without loading gRPC; `service/` imports
these names from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pkvm_sim.core.config import parse_bool

__all__ = ["DEFAULT_LEASE_SECONDS", "DEFAULT_MAX_LEASE_SECONDS", "MAX_BATCH_OPS", "UNLIMITED",
           "Limits", "ServerSettings", "parse_bool", "split_host_port"]

MIB = 1 << 20
MAX_BATCH_OPS = 4096
UNLIMITED = 0
DEFAULT_LEASE_SECONDS = 600.0
DEFAULT_MAX_LEASE_SECONDS = 86_400.0


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT with a port in 0..65535 (0: any free port, reported once listening)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535 (0: any), not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Limits:
    max_vms: int = 1024
    quota_slice_pages: int = 262_144  # 1 GiB of 4 KiB pages: a quarter of the quick-start RAM
    quota_hyp_pages: int = 256  # a tenth of the quick-start hyp pool (2569 pages)
    # Host pages one VM's memcache may hold, topped up but not yet used (a guest map takes
    # a few): without it one VM with a 1-page slice could take every page of host RAM.
    quota_memcache_pages: int = 4096
    max_pages_per_op: int = 256
    max_streams: int = 256
    max_streams_per_vm: int = 4
    max_concurrent_rpcs: int = 1024
    stream_idle_seconds: float = 60.0  # 0: idle streams stay open
    # Transport bounds, enforced by gRPC's HTTP/2 layer before any handler (or credential
    # check) runs: a client that opens streams and sends no body costs at most this many
    # pending calls per connection, and at most max_connections connections are accepted.
    max_connections: int = 256
    max_streams_per_connection: int = 128
    # Per-client caps (0: none). A client is the name of its line of --client-token-file, or
    # else its connection (gRPC peer); a client's streams are those of the VMs it created.
    max_vms_per_client: int = 0
    max_streams_per_client: int = 0
    max_lease_seconds_per_client: float = 0.0  # lease seconds its live VMs hold in all

    def __post_init__(self) -> None:
        for name in ("max_vms", "quota_slice_pages", "quota_hyp_pages",
                     "quota_memcache_pages", "max_streams",
                     "max_streams_per_vm", "max_concurrent_rpcs", "max_connections",
                     "max_streams_per_connection", "max_vms_per_client",
                     "max_streams_per_client"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit)")
        total = self.max_lease_seconds_per_client
        if not math.isfinite(total) or total < 0:
            raise ValueError("max_lease_seconds_per_client must be finite and >= 0 "
                             "(0 = no limit)")
        if not 1 <= self.max_pages_per_op <= 4096:
            raise ValueError("max_pages_per_op must be in 1..4096 (MAX_PAGES_PER_CALL)")



@dataclass(frozen=True)
class ServerSettings:
    """Transport, security and tenancy settings (docs/service.md). The knobs a user sets
    are declared once in pkvm_sim/knobs.py, with these defaults."""

    listen: str = "127.0.0.1:50051"
    metrics_listen: str | None = "127.0.0.1:9100"  # None: no metrics endpoint
    metrics_per_vm: bool = False  # per-VM pool series: the series count then grows with VMs
    workers: int = 16  # unused by the asyncio server; kept so old configurations load
    grace_seconds: float = 10.0  # shutdown completes within this, whatever is running
    max_message_bytes: int = 4 * MIB  # a full 4096-op batch is about 60 KiB
    keepalive_time_ms: int = 60_000  # server pings an idle connection every minute
    keepalive_timeout_ms: int = 20_000  # and drops it if the ping is not answered
    min_client_ping_interval_ms: int = 10_000  # clients may ping this often
    max_connection_idle_ms: int = 0  # 0: never close idle connections (long-lived VMs)
    vm_lease_seconds: float = DEFAULT_LEASE_SECONDS  # 0: no leases, VMs live until destroyed
    max_vm_lease_seconds: float = DEFAULT_MAX_LEASE_SECONDS  # the longest lease a VM may ask
    lease_check_interval: float | None = None  # None: min(1 s, vm_lease_seconds / 4)
    limits: Limits = field(default_factory=Limits)
    chunk_seconds: float = 0.002  # the longest a batch holds the lock at once (plus one op)
    tls_cert: str | None = None  # PEM certificate chain: serve TLS (with tls_key)
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: require client certificates (mTLS)
    client_token_file: str | None = None  # CreateVM and host-wide calls need this token
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        split_host_port(self.listen)
        if self.metrics_listen is not None:
            split_host_port(self.metrics_listen)
        for name in ("grace_seconds", "chunk_seconds"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, not {value}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")

    def grpc_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.min_client_ping_interval_ms),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.so_reuseport", 0),  # a second server on a busy port fails loudly
        ]
        if self.max_connection_idle_ms:
            options.append(("grpc.max_connection_idle_ms", self.max_connection_idle_ms))
        if self.limits.max_streams_per_connection:
            options.append(("grpc.max_concurrent_streams",
                            self.limits.max_streams_per_connection))
        if self.limits.max_connections:
            options.append(("grpc.max_allowed_incoming_connections",
                            self.limits.max_connections))
        options.extend(self.extra_options)
        return options
