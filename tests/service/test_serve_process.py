"""`pkvm-sim serve` as a real process: ready line, health, reflection, graceful SIGTERM."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc

READY = re.compile(r"^pkvm-sim listening on (\S+):(\d+) \(metrics on (\S+):(\d+)\)$")


@pytest.fixture
def server_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "127.0.0.1:0", "--grace-seconds", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()  # blocks until ready (or exit)
    match = READY.match(line)
    stderr = process.stderr.read() if match is None and process.stderr else ""
    assert match, f"bad ready line {line!r}; stderr: {stderr}"
    yield process, f"127.0.0.1:{match.group(2)}"
    if process.poll() is None:
        process.kill()
        process.wait()


def test_serve_health_reflection_and_graceful_sigterm(
    server_process: tuple[subprocess.Popen[str], str],
) -> None:
    process, target = server_process
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pkvm.v1.HypervisorService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING

    services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "pkvm.v1.HypervisorService" in services
    assert "grpc.health.v1.Health" in services

    stub = pb2_grpc.HypervisorServiceStub(channel)
    created = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=16), timeout=5)
    md = (("authorization", f"Bearer {created.token}"),)

    # an Execute stream that stays open across the SIGTERM: the in-flight call
    requests: queue.SimpleQueue[pb2.ExecuteRequest | None] = queue.SimpleQueue()
    stream = stub.Execute(iter(requests.get, None), metadata=md)
    batch = pb2.ExecuteRequest(handle=created.vm.handle, ops=[pb2.BATCH_OP_ALLOC_PAGES])
    requests.put(batch)
    assert next(stream).completed == 1

    statuses: list[int] = []
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))

    def watcher() -> None:
        try:
            for update in watch:
                statuses.append(update.status)
        except grpc.RpcError:
            pass

    watch_thread = threading.Thread(target=watcher, daemon=True)
    watch_thread.start()
    deadline = time.monotonic() + 5
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.02)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING]

    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while health_pb2.HealthCheckResponse.NOT_SERVING not in statuses:
        assert time.monotonic() < deadline, f"health never went NOT_SERVING: {statuses}"
        time.sleep(0.02)

    # the in-flight stream still works during the grace period, then finishes cleanly
    requests.put(batch)
    assert next(stream).completed == 1
    requests.put(None)
    assert list(stream) == []
    watch.cancel()

    assert process.wait(timeout=15) == 0
    channel.close()


def test_serve_bad_config_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--page-size", "3K",
         "--listen", "127.0.0.1:0", "--metrics-listen", "off"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "pkvm-sim serve:" in result.stderr


def test_a_burst_of_stop_signals_still_stops_the_server(
    server_process: tuple[subprocess.Popen[str], str],
) -> None:
    """SIGTERM and SIGINT arriving together (a supervisor and `make` both forwarding one)
    end the server cleanly: the signal handler takes no lock that the main thread may hold."""
    process, _target = server_process
    for _ in range(50):
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 0
