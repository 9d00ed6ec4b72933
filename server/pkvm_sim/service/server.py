"""Build, start and stop the gRPC server: HypervisorService + health + reflection + metrics.

Server flavour: `grpc.server` with a ThreadPoolExecutor. On these 2-vCPU machines it serves
about twice the unary calls of `grpc.aio` (PERFORMANCE.md), and the core is serialised behind
one lock anyway. Every open Execute stream holds one worker thread while it is open, so
`workers` bounds the number of concurrent streams (unary calls queue for a free worker).
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import (
    RpcStats,
    ServerMetricsInterceptor,
    SimInfo,
    locked_snapshot,
    serve_metrics,
)

from .leases import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_LEASE_SECONDS,
    LeaseTable,
    Reaper,
    check_interval,
)
from .servicer import SERVICE_NAME, HypervisorServicer

MIB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """Transport settings, chosen deliberately (see docs/service.md)."""

    listen: str = "0.0.0.0:50051"
    metrics_listen: str | None = "0.0.0.0:9100"  # None: no metrics endpoint
    metrics_per_vm: bool = False  # per-VM pool series: the series count then grows with VMs
    workers: int = 16  # PERFORMANCE.md: 16 beats 4 and 64 for unary throughput
    grace_seconds: float = 10.0  # in-flight calls get this long after SIGTERM
    max_message_bytes: int = 4 * MIB  # a full 4096-op batch is about 60 KiB
    keepalive_time_ms: int = 60_000  # server pings an idle connection every minute
    keepalive_timeout_ms: int = 20_000  # and drops it if the ping is not answered
    min_client_ping_interval_ms: int = 10_000  # clients may ping this often
    max_connection_idle_ms: int = 0  # 0: never close idle connections (long-lived VMs)
    vm_lease_seconds: float = DEFAULT_LEASE_SECONDS  # 0: no leases, VMs live until destroyed
    max_vm_lease_seconds: float = DEFAULT_MAX_LEASE_SECONDS  # the longest lease a VM may ask
    lease_check_interval: float | None = None  # None: min(1 s, vm_lease_seconds / 4)
    extra_options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

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
        options.extend(self.extra_options)
        return options


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def carveout_parts(config: SimConfig) -> dict[str, int]:
    """Bytes per carve-out region (pkvm_carveout_bytes{part})."""
    from pkvm_sim.core.reservation import compute_reservation, partition_carveout

    layout = partition_carveout(compute_reservation(config), config)
    return {region.name: region.size_bytes for region in layout.regions}


class RunningService:
    """A started server; `stop()` performs the graceful shutdown."""

    def __init__(
        self,
        server: grpc.Server,
        servicer: HypervisorServicer,
        health_servicer: health.HealthServicer,
        port: int,
        address: str,
        metrics_server: Any | None,
        metrics_address: str | None,
        reaper: Reaper | None = None,
    ) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.port = port
        self.address = address
        self.metrics_server = metrics_server
        self.metrics_address = metrics_address
        self.reaper = reaper
        self._stopped = threading.Event()

    @property
    def target(self) -> str:
        """A client target for this server (loopback when listening on every address)."""
        host, _ = split_host_port(self.address)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else int(self.metrics_server.server_port)

    def stop(self, grace: float | None = 0.0) -> None:
        """Health goes NOT_SERVING, new calls are refused, in-flight calls get `grace`
        seconds to finish, then the lease reaper and the metrics endpoint stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self.reaper is not None:
            self.reaper.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start(
    config: SimConfig,
    settings: ServerSettings | None = None,
    *,
    hypervisor: Hypervisor | None = None,
) -> RunningService:
    """Boot the simulator (unless given one) and serve it; returns once ready to serve."""
    settings = settings or ServerSettings()
    leases = LeaseTable(settings.vm_lease_seconds, settings.max_vm_lease_seconds)
    interval = check_interval(settings.vm_lease_seconds, settings.lease_check_interval)
    hv = hypervisor if hypervisor is not None else Hypervisor.boot(config)
    servicer = HypervisorServicer(hv, config, leases)

    rpc_stats = RpcStats()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="pkvm-rpc"),
        options=settings.grpc_options(),
        interceptors=[ServerMetricsInterceptor(rpc_stats)],
    )
    pb2_grpc.add_HypervisorServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")

    metrics_server = None
    metrics_address = None
    if settings.metrics_listen:
        metrics_server, metrics_address = serve_metrics(
            settings.metrics_listen,
            locked_snapshot(servicer.lock, hv, servicer.counters, per_vm=settings.metrics_per_vm),
            carveout_parts=carveout_parts(config), info=SimInfo.of(config), rpc_stats=rpc_stats,
        )

    server.start()
    # Leases disabled (vm_lease_seconds = 0): no VM gets one, so no reaper runs.
    reaper = Reaper(servicer.reap_expired, interval) if leases.enabled else None
    if reaper is not None:
        reaper.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host, _ = split_host_port(settings.listen)
    return RunningService(
        server, servicer, health_servicer, port, f"{host}:{port}", metrics_server,
        metrics_address, reaper,
    )
