"""Interop: the Node.js client (@grpc/grpc-js + @grpc/proto-loader) drives the real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.service.server import RunningService

NODE_DIR = Path(__file__).resolve().parents[2] / "interop" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, check=True, timeout=180,
        )
    return NODE_DIR / "client.js"


def hyp_free_pages(service: RunningService) -> int:
    with grpc.insecure_channel(service.target) as channel:
        stats = pb2_grpc.HypervisorServiceStub(channel).GetStats(pb2.GetStatsRequest())
    return next(p for p in stats.pools if p.name == "hyp").free_pages


def test_node_client(node_client: Path, service: RunningService) -> None:
    before = hyp_free_pages(service)
    result = subprocess.run(
        ["node", str(node_client), service.target], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["refcounts"] == [2, 1, 0]
    assert summary["batch_codes"] == [0, 0] and summary["batch_completed"] == [2, 2]
    assert summary["bad_order_code"] == "INVALID_ARGUMENT"
    assert summary["no_token_code"] == "UNAUTHENTICATED"
    assert summary["pages_returned"] >= 16
    # While its VM lived, EL2's stage-1 tables for the donated pages came from the hyp pool;
    # after DestroyVM everything it took went back.
    assert summary["hyp_free_pages"] < before
    assert hyp_free_pages(service) == before
