"""The /metrics server over real sockets: the request deadline, the connection limit that
idle connections cannot exhaust, and one render per interval for any number of scrapers."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from pkvm_sim.metrics.http import MetricsHTTPServer, start_metrics_server
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tests.waiting import wait_for


@pytest.fixture
def server() -> Iterator[MetricsHTTPServer]:
    registry = CollectorRegistry()
    Counter("probe", "A probe.", registry=registry).inc()
    running = start_metrics_server(registry, "127.0.0.1", 0, read_timeout_s=0.5,
                                   max_connections=2)
    yield running
    running.shutdown()
    running.server_close()


def get(server: MetricsHTTPServer, timeout: float = 30) -> bytes:
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    body: bytes = urllib.request.urlopen(url, timeout=timeout).read()
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




def closed_by_server(conn: socket.socket) -> bool:
    try:
        return conn.recv(1024) == b""
    except OSError:  # reset
        return True


def test_idle_connections_make_room_for_a_real_scrape(server: MetricsHTTPServer) -> None:
    held = [idle_connection(server) for _ in range(2)]
    assert wait_for(lambda: len(server._open) == 2)  # both accepted, holding the 2 slots
    assert b"probe_total" in get(server)  # evicts the oldest idle one instead of a 503
    assert closed_by_server(held[0])
    assert server.evicted_connections >= 1 and server.refused_connections == 0
    for conn in held:
        conn.close()


class Blocking(Collector):
    """A collector whose collect() waits until released: scrapes stay busy rendering."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

    def collect(self) -> Iterable[Metric]:
        self.started.set()
        self.release.wait(30)
        yield GaugeMetricFamily("slow", "A slow figure.", value=1)


def test_a_503_only_when_every_connection_is_past_its_request() -> None:
    registry = CollectorRegistry()
    blocking = Blocking()
    registry.register(blocking)
    server = start_metrics_server(registry, "127.0.0.1", 0, max_connections=2)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(lambda: urllib.request.urlopen(url, timeout=30).read())
                    for _ in range(2)]
            assert blocking.started.wait(30)
            assert wait_for(lambda: not any(c.reading for c in list(server._open.values()))
                            and len(server._open) == 2)
            extra = socket.create_connection(("127.0.0.1", server.server_port), timeout=30)
            assert extra.recv(1024).startswith(b"HTTP/1.1 503")
            extra.close()
            assert server.refused_connections == 1
            blocking.release.set()
            assert all(b"slow 1.0" in scrape.result() for scrape in busy)
    finally:
        blocking.release.set()
        server.shutdown()
        server.server_close()


def test_the_request_deadline_covers_the_whole_request(server: MetricsHTTPServer) -> None:
    """One byte every 0.2 s never trips a 0.5 s per-read timeout; the deadline for the whole
    request (0.5 s) closes the connection long before its 60 bytes are sent."""
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris-test\r\n\r\n"
    conn = idle_connection(server)
    conn.settimeout(0.05)
    cut = False
    for i in range(len(request)):
        try:
            conn.sendall(request[i:i + 1])
            if conn.recv(1024) == b"":
                cut = True
                break
        except TimeoutError:
            pass  # nothing from the server yet
        except OSError:
            cut = True
            break
        time.sleep(0.2)
    conn.close()
    assert cut and i < len(request) - 1


class Counting(Collector):
    """Counts its renders; the first one takes `first_render_s`."""

    def __init__(self, first_render_s: float) -> None:
        self.collects = 0
        self.first_render_s = first_render_s

    def collect(self) -> Iterable[Metric]:
        self.collects += 1
        if self.collects == 1:
            time.sleep(self.first_render_s)
        yield GaugeMetricFamily("counted", "Renders so far.", value=self.collects)


def test_scrapers_in_a_crowd_share_renders_and_each_gets_a_fresh_one() -> None:
    """A render of 0.3 s spaces the next by 3 s: the 40 scrapes that come meanwhile all
    share that next render (taken after they came), instead of rendering 40 times."""
    registry = CollectorRegistry()
    counting = Counting(first_render_s=0.3)
    registry.register(counting)
    server = start_metrics_server(registry, "127.0.0.1", 0, max_connections=64)
    try:
        assert b"counted 1.0" in get(server)
        with ThreadPoolExecutor(40) as pool:
            bodies = list(pool.map(lambda _: get(server, timeout=60), range(40)))
    finally:
        server.shutdown()
        server.server_close()
    assert counting.collects == 2 and server.cache.renders == 2
    assert all(b"counted 2.0" in body for body in bodies)


def test_bad_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        start_metrics_server(CollectorRegistry(), "127.0.0.1", 0, max_connections=0)
