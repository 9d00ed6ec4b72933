"""Build, start and stop the gRPC server: HypervisorService + health + reflection + metrics.

Server flavour: `grpc.aio`, the servicer and the core on one asyncio event loop that runs in
its own thread ("pkvm-loop"). An open Execute stream costs a coroutine, not a thread, so no
number of idle or slow streams can take the capacity other calls need, and a batch gives the
loop back between chunks. docs/service.md gives the measurements behind the choice.

`start()` returns once the server serves; `RunningService.stop(grace)` shuts down within
`grace` seconds whatever is running.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import (
    InstrumentedServer,
    RpcStats,
    SimInfo,
    locked_snapshot,
    serve_metrics,
)

from .auth import ClientToken
from .decoding import add_servicer
from .leases import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_LEASE_SECONDS,
    LeaseTable,
    Reaper,
    check_interval,
)
from .limits import Limits
from .servicer import SERVICE_NAME, HypervisorServicer

if TYPE_CHECKING:
    from .persist import StateKeeper

log = logging.getLogger(__name__)

MIB = 1 << 20
T = TypeVar("T")


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

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the PEM files, or None for plaintext."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        check_key_pair(self.tls_cert, self.tls_key)
        chain = Path(self.tls_cert).read_bytes()
        key = Path(self.tls_key).read_bytes()
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


def check_key_pair(cert_path: str, key_path: str) -> None:
    """ValueError naming the files when the key is not the certificate's (gRPC itself would
    only say that it failed to bind) or either file cannot be loaded as PEM."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=lambda: b"")
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"--tls-key {key_path} does not match the certificate in"
                             f" --tls-cert {cert_path}") from None
        raise ValueError(f"cannot load --tls-cert {cert_path} with --tls-key {key_path}:"
                         f" {error.reason or error}") from None


def split_host_port(address: str) -> tuple[str, int]:
    """HOST:PORT with a port in 0..65535 (0: any free port, reported once listening)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 1..65535 (0: any), not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def carveout_parts(config: SimConfig) -> dict[str, int]:
    """Bytes per carve-out region (pkvm_carveout_bytes{part})."""
    from pkvm_sim.core.reservation import compute_reservation, partition_carveout

    layout = partition_carveout(compute_reservation(config), config)
    return {region.name: region.size_bytes for region in layout.regions}


class EventLoopThread:
    """An asyncio event loop running in a daemon thread; `call` runs a coroutine on it."""

    def __init__(self, name: str = "pkvm-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


class RunningService:
    """A started server; `stop()` performs the graceful shutdown."""

    def __init__(
        self,
        runner: EventLoopThread,
        server: grpc.aio.Server,
        servicer: HypervisorServicer,
        health_servicer: Any,
        port: int,
        address: str,
        metrics_server: Any | None,
        metrics_address: str | None,
        reaper: Reaper | None = None,
    ) -> None:
        self.runner = runner
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.port = port
        self.address = address
        self.metrics_server = metrics_server
        self.metrics_address = metrics_address
        self.reaper = reaper
        self.tls = False
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
        """Health goes NOT_SERVING, new calls are refused (UNAVAILABLE), running batches
        stop at a chunk boundary, in-flight calls get `grace` seconds; then the lease reaper
        and the metrics endpoint stop. Returns within about `grace` seconds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = 0.0 if grace is None else grace
        try:
            self.runner.call(self._stop(grace), timeout=grace + 5.0)
        finally:
            if self.reaper is not None:
                self.reaper.stop()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            self.runner.close()
            log.info("stopped")

    async def _stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        self.servicer.begin_shutdown(grace)
        await self.server.stop(grace)
        self.servicer.fair.close()

    def wait(self) -> None:
        self._stopped.wait()


MetricsStarter = Callable[[ServerSettings, HypervisorServicer, SimConfig], tuple[Any, str] | None]


def start_metrics(
    settings: ServerSettings, servicer: HypervisorServicer, config: SimConfig,
    rpc_stats: RpcStats | None = None,
) -> tuple[Any, str] | None:
    """The Prometheus endpoint (pkvm_sim.metrics): (its HTTP server, HOST:PORT), or None when
    disabled. A scrape copies the figures under the simulator lock and renders outside it."""
    if not settings.metrics_listen:
        return None
    snapshot = locked_snapshot(servicer.lock, servicer.hypervisor, servicer.counters,
                               per_vm=settings.metrics_per_vm)
    return serve_metrics(settings.metrics_listen, snapshot, carveout_parts=carveout_parts(config),
                         info=SimInfo.of(config), rpc_stats=rpc_stats)


def start(
    config: SimConfig,
    settings: ServerSettings | None = None,
    *,
    hypervisor: Hypervisor | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    metrics_starter: MetricsStarter | None = None,
    state: StateKeeper | None = None,
) -> RunningService:
    """Boot the simulator (unless given one) and serve it; returns once ready to serve.
    `state`: the --state-file keeper; its restored tokens and leases apply before serving."""
    settings = settings or ServerSettings()
    leases = LeaseTable(settings.vm_lease_seconds, settings.max_vm_lease_seconds)
    interval = check_interval(settings.vm_lease_seconds, settings.lease_check_interval)
    client_token = ClientToken.from_file(settings.client_token_file)
    credentials = settings.server_credentials()
    hv = hypervisor if hypervisor is not None else Hypervisor.boot(config)
    servicer = HypervisorServicer(
        hv, config, leases, limits=settings.limits, client_token=client_token,
        chunk_seconds=settings.chunk_seconds,
    )
    if state is not None:
        state.attach(servicer)
    rpc_stats = RpcStats()  # the grpc_server_* series (observe)
    runner = EventLoopThread()
    try:
        server, health_servicer, port = runner.call(
            _serve(settings, servicer, credentials, interceptors, rpc_stats)
        )
    except BaseException:
        runner.close()
        raise
    metrics = (metrics_starter(settings, servicer, config) if metrics_starter is not None
               else start_metrics(settings, servicer, config, rpc_stats))
    metrics_server, metrics_address = metrics if metrics is not None else (None, None)
    # Leases disabled (vm_lease_seconds = 0): no VM gets one, so no reaper runs.
    reaper = Reaper(servicer.reap_expired, interval) if leases.enabled else None
    if reaper is not None:
        reaper.start()
    host, _ = split_host_port(settings.listen)
    service = RunningService(
        runner, server, servicer, health_servicer, port, f"{host}:{port}", metrics_server,
        metrics_address, reaper,
    )
    service.tls = credentials is not None
    return service


async def _serve(
    settings: ServerSettings,
    servicer: HypervisorServicer,
    credentials: grpc.ServerCredentials | None,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    rpc_stats: RpcStats,
) -> tuple[grpc.aio.Server, Any, int]:
    # No interceptor unless given: the grpc_server_* metrics wrap each handler once, when it
    # is registered (InstrumentedServer), instead of running an interceptor chain per call.
    server = grpc.aio.server(options=settings.grpc_options(),
                             interceptors=list(interceptors) or None)
    registry: Any = InstrumentedServer(server, rpc_stats)
    add_servicer(servicer, registry)  # undecodable bodies: INVALID_ARGUMENT (decoding.py)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registry)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), registry
    )
    if credentials is None:
        port = server.add_insecure_port(settings.listen)
    else:
        port = server.add_secure_port(settings.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {settings.listen}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port
