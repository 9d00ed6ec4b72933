"""The /metrics HTTP endpoint: prometheus_client's handler behind a guarded server.

- Read timeout: a connection that sends nothing (or stalls mid-request) for
  `read_timeout_s` is closed, so half-open connections cannot pile up.
- Connection limit: at most `max_connections` requests are served at once; one more is
  answered `503` and closed at once instead of getting a thread.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

DEFAULT_READ_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 16

_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 27\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\ntoo many /metrics requests\n"
)


class MetricsHTTPServer(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections`; daemon threads."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[MetricsHandler], max_connections: int
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_connections = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused_connections += 1
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def start_metrics_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> MetricsHTTPServer:
    """Serve `registry` on host:port (0: any free port) from a daemon thread.

    Stop it with `shutdown()` then `server_close()`."""
    if read_timeout_s <= 0 or max_connections < 1:
        raise ValueError("the metrics read timeout and connection limit must be positive")
    base = MetricsHandler.factory(registry)
    handler = type("GuardedMetricsHandler", (base,), {"timeout": read_timeout_s})
    server = MetricsHTTPServer((host, port), handler, max_connections)
    thread = threading.Thread(target=server.serve_forever, name="pkvm-metrics", daemon=True)
    thread.start()
    return server
