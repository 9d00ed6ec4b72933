"""The /metrics HTTP endpoint: the registry, rendered at most once per interval, behind a
guarded server.

- Request deadline: a connection must deliver its whole request (request line and headers)
  within `read_timeout_s` of being accepted, or it is closed. A per-read timeout would not
  do: a client sending one byte every few seconds never trips it (slowloris).
- Connection limit: at most `max_connections` connections at once. When all are taken, a
  new connection evicts the oldest one still sending its request (a real scraper sends its
  request in one go; a connection still sending after a while is idle or slowloris), and
  only when every connection is past its request (rendering or sending the answer) is the
  new one answered `503` and closed. So idle or trickling connections can delay, but never
  lock out, a real scrape.
- Shared renders: a render (the simulator snapshot taken, every series formatted, gzip
  applied) serves every scrape that waited for it, and renders are spaced by ten times
  their duration, so rendering takes at most about a tenth of the time however many
  scrape. Every scrape still gets figures taken after it arrived (`RenderCache`).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

DEFAULT_READ_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 16
RENDER_DUTY_FACTOR = 10.0  # renders are spaced by ten times their duration
SWEEP_INTERVAL_S = 0.25  # how often connections past their request deadline are closed

_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 27\r\n"
    b"Connection: close\r\nRetry-After: 1\r\n\r\ntoo many /metrics requests\n"
)


class RenderCache:
    """The registry's exposition per (format, gzip), shared by the scrapes that wait for
    the same render. Every scrape gets a render that started after it came (never a stale
    copy), renders run one at a time, and the next one starts no sooner than
    `RENDER_DUTY_FACTOR` times the last one's duration after it: scrapes arriving meanwhile
    wait and share it. So rendering takes at most about a tenth of the time however many
    scrape, and a lone scraper waits at most that long."""

    def __init__(self, registry: Collector, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.clock = clock
        self.sleep = sleep
        self.renders = 0
        self._lock = threading.Lock()  # held while waiting for a render slot and rendering
        self._cached: dict[tuple[str, bool], tuple[float, bytes]] = {}  # (started, bytes)
        self._next_start = 0.0

    def body(self, accept: str | None, gzipped: bool) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        key = (content_type, gzipped)
        arrived = self.clock()
        with self._lock:
            hit = self._cached.get(key)
            if hit is not None and hit[0] >= arrived:
                return hit[1], content_type  # rendered after this scrape came: share it
            rest = self._next_start - self.clock()
            if rest > 0:
                self.sleep(rest)  # scrapes arriving meanwhile queue here and share
            started = self.clock()
            output = encoder(self.registry)
            if gzipped:
                output = gzip.compress(output)
            self.renders += 1
            done = self.clock()
            self._cached[key] = (started, output)
            self._next_start = done + RENDER_DUTY_FACTOR * (done - started)
            return output, content_type


@dataclass
class _Connection:
    sock: socket.socket
    accepted_at: float
    reading: bool = True  # still sending its request
    evicted: bool = False


class MetricsHandler(BaseHTTPRequestHandler):
    """GET (any path) answers the cached exposition; nothing is logged per request."""

    server: MetricsHTTPServer

    def parse_request(self) -> bool:
        complete = super().parse_request()
        if complete:
            self.server.request_read(self.connection)
        return complete

    def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
        gzipped = gzip_accepted(self.headers.get("Accept-Encoding") or "")
        body, content_type = self.server.cache.body(self.headers.get("Accept"), gzipped)
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Log nothing (a scrape every few seconds would flood the log)."""


class MetricsHTTPServer(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections` (see the module's docstring)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], cache: RenderCache, max_connections: int,
                 read_timeout_s: float) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.cache = cache
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.refused_connections = 0  # answered 503: every connection was past its request
        self.evicted_connections = 0  # closed to make room, or past their request deadline
        self._lock = threading.Lock()
        self._open: dict[socket.socket, _Connection] = {}
        self._closing = threading.Event()
        # The per-read (and per-write) timeout too: a client that stops reading its answer
        # cannot hold a slot for longer either.
        handler = type("GuardedMetricsHandler", (MetricsHandler,), {"timeout": read_timeout_s})
        super().__init__(address, handler)
        self._sweeper = threading.Thread(target=self._sweep, name="pkvm-metrics-sweep",
                                         daemon=True)
        self._sweeper.start()

    # -- connection slots ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            if len(self._open) >= self.max_connections and not self._evict_oldest_reader():
                self.refused_connections += 1
                refuse = True
            else:
                self._open[request] = _Connection(request, time.monotonic())
                refuse = False
        if refuse:
            with contextlib.suppress(OSError):
                request.sendall(_BUSY_RESPONSE)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def request_read(self, sock: socket.socket) -> None:
        with self._lock:
            connection = self._open.get(sock)
            if connection is not None:
                connection.reading = False

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)

    def _evict_oldest_reader(self) -> bool:
        """Close the oldest connection still sending its request (under the lock); False
        when every connection is past its request."""
        readers = [c for c in self._open.values() if c.reading]
        if not readers:
            return False
        self._evict(min(readers, key=lambda c: c.accepted_at))
        return True

    def _evict(self, connection: _Connection) -> None:
        """Its handler's next read ends at once; its slot is free from now on."""
        connection.evicted = True
        self._open.pop(connection.sock, None)
        self.evicted_connections += 1
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)

    def _sweep(self) -> None:
        """Close the connections that did not deliver their request within the deadline."""
        while not self._closing.wait(SWEEP_INTERVAL_S):
            deadline = time.monotonic() - self.read_timeout_s
            with self._lock:
                for connection in [c for c in self._open.values()
                                   if c.reading and c.accepted_at <= deadline]:
                    self._evict(connection)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


def start_metrics_server(
    registry: Collector,
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
    cache = RenderCache(registry)
    server = MetricsHTTPServer((host, port), cache, max_connections, read_timeout_s)
    thread = threading.Thread(target=server.serve_forever, name="pkvm-metrics", daemon=True)
    thread.start()
    return server
