"""tests/prometheus_harness.py against a tiny exporter: the real Prometheus scrapes it and
answers PromQL with the exported value."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.prometheus_harness import (
    PrometheusError,
    PrometheusHandle,
    free_loopback_port,
    running_prometheus,
)


@pytest.fixture
def exporter() -> Iterator[tuple[str, Gauge]]:
    registry = CollectorRegistry()
    gauge = Gauge("harness_probe_pages", "A gauge with a known value.", ["pool"], registry=registry)
    gauge.labels(pool="hyp").set(42.5)
    port = free_loopback_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}", gauge
    finally:
        server.shutdown()
        thread.join(timeout=5)


def test_prometheus_scrapes_the_exported_value(exporter: tuple[str, Gauge], tmp_path: Path) -> None:
    target, gauge = exporter
    with running_prometheus([target], tmp_path) as prom:
        prom.wait_for_target_up(timeout=30)
        [sample] = prom.wait_for_query('harness_probe_pages{pool="hyp"}', timeout=15)
        assert sample.value == 42.5
        assert sample.labels == {
            "__name__": "harness_probe_pages",
            "pool": "hyp",
            "job": "pkvm-sim",
            "instance": target,
        }

        # Scraping goes on: a new value arrives within a few scrape intervals.
        gauge.labels(pool="hyp").set(7)
        [sample] = prom.wait_for_query(
            "harness_probe_pages", timeout=15, predicate=lambda s: bool(s) and s[0].value == 7
        )
        assert prom.query("sum(harness_probe_pages) * 2")[0].value == 14
        assert prom.query("scalar(harness_probe_pages)")[0].labels == {}

    assert prom.process.poll() is not None, "prometheus still runs after the with block"
    assert (tmp_path / "prometheus" / "prometheus.log").stat().st_size > 0


def test_query_errors_raise(exporter: tuple[str, Gauge], tmp_path: Path) -> None:
    target, _ = exporter
    with running_prometheus([target], tmp_path) as prom:
        with pytest.raises(PrometheusError, match="bad_data"):
            prom.query("sum(")
        with pytest.raises(PrometheusError, match="not an instant vector"):
            prom.query("harness_probe_pages[1m]")


def test_a_dead_target_is_reported_not_waited_for_forever(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_loopback_port()}"
    with running_prometheus([dead], tmp_path, job_name="dead") as prom:
        with pytest.raises(TimeoutError, match="connection refused"):
            # Prometheus applies new targets on a 5 s tick, so allow for that before the scrape.
            prom.wait_for_target_up(timeout=12)
        handle: PrometheusHandle = prom
        [up] = handle.wait_for_query('up{job="dead"}', timeout=10)
        assert up.value == 0
