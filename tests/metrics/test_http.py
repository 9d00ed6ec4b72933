"""The /metrics server: read timeout and connection limit, over real sockets."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
from pkvm_sim.metrics.http import MetricsHTTPServer, start_metrics_server
from prometheus_client import CollectorRegistry, Counter


@pytest.fixture
def server() -> Iterator[MetricsHTTPServer]:
    registry = CollectorRegistry()
    Counter("probe", "A probe.", registry=registry).inc()
    running = start_metrics_server(registry, "127.0.0.1", 0, read_timeout_s=0.5,
                                   max_connections=2)
    yield running
    running.shutdown()
    running.server_close()


def get(server: MetricsHTTPServer) -> bytes:
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    body: bytes = urllib.request.urlopen(url, timeout=5).read()
    return body


def idle_connection(server: MetricsHTTPServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.server_port), timeout=60)


def test_serves_the_registry(server: MetricsHTTPServer) -> None:
    assert b"probe_total 1.0" in get(server)


def test_an_idle_connection_is_closed_after_the_read_timeout(server: MetricsHTTPServer) -> None:
    conn = idle_connection(server)
    started = time.monotonic()
    assert conn.recv(1024) == b""  # the server closed it (EOF) without a request
    assert time.monotonic() - started >= 0.4  # not before the read timeout
    conn.close()


def test_connections_over_the_limit_get_503_and_the_slots_come_back(
    server: MetricsHTTPServer,
) -> None:
    held = [idle_connection(server) for _ in range(2)]
    time.sleep(0.1)  # both accepted and holding a slot
    extra = idle_connection(server)
    answer = extra.recv(1024)
    assert answer.startswith(b"HTTP/1.1 503")
    assert server.refused_connections == 1
    extra.close()
    for conn in held:
        conn.close()
    deadline = time.monotonic() + 5
    while True:  # the held slots are freed once their handlers end
        try:
            assert b"probe_total" in get(server)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        start_metrics_server(CollectorRegistry(), "127.0.0.1", 0, max_connections=0)
