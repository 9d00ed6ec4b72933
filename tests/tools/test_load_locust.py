"""deploy/locust/locustfile.py against the real service: a headless run, and a master with
two workers, all as local processes (what `--master` / `--worker` do across machines)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkvm_client import Hypervisor

from tests.service.attack_helpers import ServeProcess
from tests.service.test_security import pki
from tests.tools.load_helpers import server_process

__all__ = ["pki"]  # the fixture, used by name below

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "deploy" / "locust" / "locustfile.py"
LOCUST = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
# Only looked up, never imported here: importing locust monkey-patches this process with
# gevent, under which the in-process gRPC server of the fixture would stall.
if importlib.util.find_spec("locust") is None:
    pytest.fail("locust is not installed (it is in the [load] extra, part of [test])")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    """The server in its own process, as Locust would meet it."""
    with server_process() as (address, _pid):
        yield address


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Long enough for every user to make each of its calls on a machine at a load average of 12
# (at 5 s, two runs there ended with no call but create/destroy, or with no figures at all).
RUN_TIME = "20s"


def run_args(target: str, users: int, workload: str) -> list[str]:
    return ["--headless", "-u", str(users), "-r", str(users), "-t", RUN_TIME, "--stop-timeout",
            "30", "--host", target, "--pkvm-workload", workload, "--json",
            "--loglevel", "WARNING"]


def by_name(stdout: str) -> dict[str, Any]:
    return {row["name"]: row for row in json.loads(stdout)}


def assert_clean_run(stats: dict[str, Any], users: int, ops: set[str]) -> None:
    assert ops <= set(stats), sorted(stats)
    failures = {name: row["num_failures"] for name, row in stats.items() if row["num_failures"]}
    assert not failures, failures
    # Every VM a user created (mixed recycles its VM now and then) is destroyed and checked;
    # a worker may send its last figures before its users' final checks, so the counts can
    # trail: that every VM is gone is checked on the server (assert_no_vm_left).
    created = stats["create_vm"]["num_requests"]
    assert created >= users
    assert 0 < stats["leak_check"]["num_requests"] <= stats["destroy_vm"]["num_requests"] \
        <= created
    assert all(row["num_requests"] > 0 for name, row in stats.items() if name in ops)


def assert_no_vm_left(target: str) -> None:
    with Hypervisor(target) as hv:
        assert hv.stats().nr_vms == 0


def test_headless_run_reports_every_call(target: str) -> None:
    proc = subprocess.run([*LOCUST, *run_args(target, 4, "mixed")], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Refusals the file counts as fine (and any it reports) print no traceback: gevent's
    # pool printed one per refusal raised in its thread.
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    stats = by_name(proc.stdout)
    assert_clean_run(stats, 4, {"alloc", "put", "share", "guest_map", "mmio"})
    # Expected refusals are successes of their own row, named after the refusal.
    assert all(row["num_failures"] == 0 for name, row in stats.items() if "[" in name)
    assert_no_vm_left(target)


def test_master_with_two_workers(target: str, tmp_path: Path) -> None:
    port = free_port()
    # Workers write to files, never to pipes nobody reads while they run: a full pipe would
    # block a worker on its own output, and it would never leave.
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]
    workers = [subprocess.Popen([*LOCUST, "--worker", "--master-host", "127.0.0.1",
                                 "--master-port", str(port), "--loglevel", "WARNING"],
                                stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                                cwd=REPO) for log in logs]
    try:
        master = subprocess.run(
            [*LOCUST, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
             str(port), "--expect-workers", "2", "--expect-workers-max-wait", "120",
             *run_args(target, 4, "churn")],
            capture_output=True, text=True, timeout=300, cwd=REPO)
        for worker in workers:  # a worker leaves once the master has said quit
            worker.wait(timeout=120)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert master.returncode == 0, master.stderr[-3000:]
    assert all(worker.returncode == 0 for worker in workers), \
        [log.read_text()[-2000:] for log in logs]
    stats = by_name(master.stdout)
    assert_clean_run(stats, 4, {"alloc", "put", "get"})  # 2 users on each worker
    assert_no_vm_left(target)


def test_a_tls_server_with_a_client_token(pki: Path, tmp_path: Path) -> None:
    """The --pkvm- connection options (`pkvm-sim load`'s): mutual TLS and a client token."""
    token = tmp_path / "token"
    token.write_text("locust-token\n")
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
           "--tls-client-ca", str(pki / "ca.pem")]
    with ServeProcess(*tls, "--client-token-file", str(token)) as server:
        proc = subprocess.run(
            [*LOCUST, *run_args(server.target, 2, "churn"), "--pkvm-ca-file",
             str(pki / "ca.pem"), "--pkvm-cert-file", str(pki / "client.pem"),
             "--pkvm-key-file", str(pki / "client.key"), "--pkvm-client-token-file", str(token)],
            capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert_clean_run(by_name(proc.stdout), 2, {"alloc", "put"})
        with Hypervisor(server.target, root_certificates=(pki / "ca.pem").read_bytes(),
                        certificate_chain=(pki / "client.pem").read_bytes(),
                        private_key=(pki / "client.key").read_bytes()) as hv:
            assert hv.stats().nr_vms == 0
