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
import gc
import logging
import ssl
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore[import-untyped]
from grpc_reflection.v1alpha import reflection  # type: ignore[import-untyped]

from pkvm_sim.core import preempt
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.metrics import (
    InstrumentedServer,
    RpcStats,
    SimInfo,
    locked_snapshot,
    serve_metrics,
)
from pkvm_sim.settings import ServerSettings as ServerSettings  # re-exported: its old home
from pkvm_sim.settings import split_host_port as split_host_port

from .auth import ClientToken
from .decoding import add_servicer
from .fairness import let_other_threads_run
from .leases import LeaseTable, Reaper, check_interval
from .servicer import SERVICE_NAME, HypervisorServicer

if TYPE_CHECKING:
    from .persist import StateKeeper

log = logging.getLogger(__name__)

MIB = 1 << 20
T = TypeVar("T")


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files, or None for plaintext."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    check_key_pair(settings.tls_cert, settings.tls_key)
    chain = Path(settings.tls_cert).read_bytes()
    key = Path(settings.tls_key).read_bytes()
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
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
    credentials = server_credentials(settings)
    hv = hypervisor if hypervisor is not None else Hypervisor.boot(config)
    servicer = HypervisorServicer(
        hv, config, leases, limits=settings.limits, client_token=client_token,
        chunk_seconds=settings.chunk_seconds,
    )
    if state is not None:
        state.attach(servicer)
    rpc_stats = servicer.rpc_stats  # the grpc_server_* series (observe)
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
    tune_gc()
    preempt.set_hook(let_other_threads_run)  # long core walks offer the GIL (core/preempt.py)
    return service


# Python's default first-generation threshold (700 new container objects) runs a young
# collection every few hundred operations of a batch (each alloc records a new owner
# tuple); with this one the owner records of a batch are mostly freed again (put) before
# any collection sees them. The middle generation is collected every 2 young collections
# instead of 10, so that one collection walks at most about 30k objects (about 1 ms of
# CPU; 10 would let it walk 100k, several ms: a pause every call in flight would see).
GC_YOUNG_THRESHOLD = 10_000
GC_MIDDLE_THRESHOLD = 2


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long-running server: move everything
    alive now (the booted simulator, modules, the gRPC machinery: all long-lived) to the
    permanent generation, so that full collections stop walking it again and again, and
    collect the young generation less often. Memory is still freed by reference counting
    as before; only cycles wait longer. Once per process (a server runs alone in its
    process; a test process starting many servers pays the full collection once)."""
    if gc.get_threshold()[0] >= GC_YOUNG_THRESHOLD:  # tuned already
        return
    gc.collect()
    gc.freeze()
    old = gc.get_threshold()[2]
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_MIDDLE_THRESHOLD, old)


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
