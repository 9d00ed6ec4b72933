"""pkvm_sim.metrics: Prometheus exposition of the simulator and of its gRPC calls.

- collector.py: pkvm_* figures rendered from a snapshot taken at scrape time (snapshot.py);
- rpc.py: the go-grpc-prometheus grpc_server_* series, fed by a server interceptor;
- http.py: the /metrics endpoint: rendered once per interval, a deadline for each request,
  a connection limit that idle connections cannot exhaust;
- serve_metrics(): the one call the service makes to put it all together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector

from .collector import HypervisorCollector, SimInfo
from .http import MetricsHTTPServer, start_metrics_server
from .rpc import (
    AioServerMetricsInterceptor,
    InstrumentedServer,
    RpcStats,
    ServerMetricsInterceptor,
)
from .snapshot import MetricsSnapshot, locked_snapshot, take_snapshot

__all__ = [
    "AioServerMetricsInterceptor",
    "InstrumentedServer",
    "HypervisorCollector",
    "MetricsHTTPServer",
    "MetricsSnapshot",
    "RpcStats",
    "ServerMetricsInterceptor",
    "SimInfo",
    "build_registry",
    "locked_snapshot",
    "serve_metrics",
    "split_host_port",
    "start_metrics_server",
    "take_snapshot",
]


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, not {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_registry(
    snapshot: Callable[[], MetricsSnapshot],
    *,
    carveout_parts: Mapping[str, int],
    info: SimInfo | None = None,
    rpc_stats: RpcStats | None = None,
) -> CollectorRegistry:
    """A registry with the pkvm_* collector, the grpc_server_* series and process_*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HypervisorCollector(snapshot, carveout_parts=carveout_parts, info=info))
    if rpc_stats is not None:
        registry.register(rpc_stats)
    ProcessCollector(registry=registry)
    return registry


def serve_metrics(
    address: str,
    snapshot: Callable[[], MetricsSnapshot],
    *,
    carveout_parts: Mapping[str, int],
    info: SimInfo | None = None,
    rpc_stats: RpcStats | None = None,
) -> tuple[MetricsHTTPServer, str]:
    """Start the /metrics endpoint on `address` (HOST:PORT); returns it and where it listens."""
    registry = build_registry(
        snapshot, carveout_parts=carveout_parts, info=info, rpc_stats=rpc_stats
    )
    host, port = split_host_port(address)
    server = start_metrics_server(registry, host, port)
    return server, f"{host}:{server.server_port}"
