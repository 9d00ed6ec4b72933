"""The CLI tools that talk to a server go through the SDK: `draw`, `healthcheck` and `load`
reach a mutual-TLS server with the SDK's TLS options (`load` also with a client token), and
fail cleanly without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pkvm_client import Hypervisor
from pkvm_sim.cli import main
from pkvm_sim.service.server import RunningService

from tests.service.test_security import pki, serve

__all__ = ["pki"]  # the fixture, used by name below


@pytest.fixture(scope="module")
def mtls_service(pki: Path) -> RunningService:
    service = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                    tls_client_ca=str(pki / "ca.pem"))
    yield service  # type: ignore[misc]
    service.stop(0)


def tls_args(pki: Path) -> list[str]:
    return ["--ca-file", str(pki / "ca.pem"), "--cert-file", str(pki / "client.pem"),
            "--key-file", str(pki / "client.key")]


def test_draw_reaches_a_mutual_tls_server(mtls_service: RunningService, pki: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "machine.svg"
    assert main(["draw", "--target", mtls_service.target, "--out", str(out),
                 *tls_args(pki)]) == 0
    assert "pool hyp:" in out.read_text()


def test_draw_without_tls_options_fails_cleanly(mtls_service: RunningService, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "machine.png"
    assert main(["draw", "--target", mtls_service.target, "--out", str(out),
                 "--timeout", "2"]) == 1
    assert "draw: error:" in capsys.readouterr().err
    assert not out.exists()


def test_draw_reports_an_unreadable_ca_file(mtls_service: RunningService, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["draw", "--target", mtls_service.target, "--out", str(tmp_path / "x.png"),
                 "--ca-file", str(tmp_path / "missing.pem")]) == 2
    assert "missing.pem" in capsys.readouterr().err


def test_healthcheck_through_tls(mtls_service: RunningService, pki: Path) -> None:
    assert main(["healthcheck", "--target", mtls_service.target, *tls_args(pki)]) == 0
    assert main(["healthcheck", "--target", mtls_service.target, "--timeout", "2"]) == 1


def test_memory_map_agrees_with_stats(mtls_service: RunningService, pki: Path) -> None:
    """Independent figures: the free blocks the map lists add up to the free pages that
    GetStats reports for the same pool."""
    with Hypervisor(mtls_service.target, root_certificates=(pki / "ca.pem").read_bytes(),
                    private_key=(pki / "client.key").read_bytes(),
                    certificate_chain=(pki / "client.pem").read_bytes()) as hv, \
            hv.create_vm(slice_pages=64) as vm:
        vm.alloc_pages(order=3)
        memory_map = hv.memory_map(["hyp"])
        stats = hv.stats()
    (pool,) = memory_map.pools
    assert pool.name == "hyp"
    assert sum(1 << order for order in pool.free_block_orders) == stats.pool("hyp").free_pages
    assert list(pool.free_block_pfns) == sorted(pool.free_block_pfns)
    assert memory_map.memblocks and memory_map.page_size == 4096


CLIENT_TOKEN = "load-client-token"


@pytest.fixture(scope="module")
def guarded_mtls_service(pki: Path, tmp_path_factory: pytest.TempPathFactory
                         ) -> RunningService:
    """Mutual TLS and a client token, both: `load` must present all of them."""
    token_file = tmp_path_factory.mktemp("token") / "client-token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    service = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                    tls_client_ca=str(pki / "ca.pem"), client_token_file=str(token_file))
    yield service  # type: ignore[misc]
    service.stop(0)


def load_args(target: str, tmp_path: Path) -> list[str]:
    return ["load", "--target", target, "--vms", "2", "--total", "40", "--workload", "churn",
            "--progress", "none", "--connect-timeout", "10", "--json", str(tmp_path / "r.json")]


def test_load_reaches_a_mutual_tls_server_with_a_client_token(
        guarded_mtls_service: RunningService, pki: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    code = main([*load_args(guarded_mtls_service.target, tmp_path), *tls_args(pki),
                 "--client-token-file", str(token_file)])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0, report
    assert report["leak_check"]["vms_created"] == 2 == report["leak_check"]["vms_destroyed"]
    assert report["connection"] == {"tls": True, "client_certificate": True,
                                    "client_token": True}
    assert CLIENT_TOKEN not in (tmp_path / "r.json").read_text()


def test_load_without_the_client_token_creates_no_vm(
        guarded_mtls_service: RunningService, pki: Path, tmp_path: Path) -> None:
    """TLS alone reaches the server (Reserve and GetStats are not guarded), but CreateVM asks
    for the client token: no VM is made, the run fails (exit 1) and says why."""
    code = main([*load_args(guarded_mtls_service.target, tmp_path), *tls_args(pki)])
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and report["vms_started"] == 0
    assert any("UNAUTHENTICATED" in reason for reason in report["reasons"]), report


def test_load_without_tls_cannot_reach_a_tls_server(
        guarded_mtls_service: RunningService, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    assert main([*load_args(guarded_mtls_service.target, tmp_path), "--client-token-file",
                 str(token_file), "--connect-timeout", "1"]) == 2
    assert guarded_mtls_service.target in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_load_names_an_unreadable_token_file(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-token"
    assert main([*load_args("127.0.0.1:1", tmp_path), "--client-token-file",
                 str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
