"""Credentials and TLS against the real server: the client token, bearer parsing, TLS and
mutual TLS with certificates made here by the openssl CLI, and tokens never logged."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_client import AsyncHypervisor, AuthenticationError, Hypervisor, PkvmError
from pkvm_sim.service.auth import bearer_token
from pkvm_sim.service.server import RunningService

from tests.service.attack_helpers import ENV
from tests.service.fixtures import bearer
from tests.service.tenants import OpenStream, Stub, refusal, serve

CLIENT_TOKEN = "s3cret-client-token"


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[RunningService]:
    token_file = tmp_path / "client-token"
    token_file.write_text(CLIENT_TOKEN + "\n")
    service = serve(client_token_file=str(token_file))
    yield service
    service.stop(0)


def test_bearer_scheme_is_case_insensitive() -> None:
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        assert bearer_token([("authorization", f"{scheme} tok")]) == "tok"
    assert bearer_token([("authorization", "Basic tok")]) == ""
    assert bearer_token([]) is None


def test_client_token_guards_create_and_host_wide_calls(guarded: RunningService) -> None:
    with grpc.insecure_channel(guarded.target) as channel:
        stub = Stub(channel)
        create = pb2.CreateVMRequest(nr_vcpus=1, slice_pages=8)
        mmio = pb2.MapMMIORequest(addr=0x1000_0000)
        fault = pb2.HostFaultRequest(addr=0x8000_0000)
        for call, request in ((stub.CreateVM, create), (stub.MapMMIO, mmio),
                              (stub.HostFault, fault)):
            assert refusal(lambda c=call, r=request: c(r)) == (
                grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
            assert refusal(lambda c=call, r=request: c(r, metadata=bearer("wrong"))) == (
                grpc.StatusCode.UNAUTHENTICATED, "BAD_CLIENT_TOKEN")
        lower = (("authorization", f"bearer {CLIENT_TOKEN}"),)
        vm = stub.CreateVM(create, metadata=lower)
        assert stub.MapMMIO(mmio, metadata=lower).fault.outcome
        assert stub.HostFault(fault, metadata=lower).fault.outcome
        assert stub.GetStats(pb2.GetStatsRequest()).nr_vms == 1  # read-only: open
        # VM calls keep their per-VM token; the client token is not a VM's.
        md = bearer(vm.token)
        stub.AllocPages(pb2.AllocPagesRequest(handle=vm.vm.handle), metadata=md)
        assert refusal(lambda: stub.AllocPages(pb2.AllocPagesRequest(handle=vm.vm.handle),
                                               metadata=lower))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        # Host-wide ops in a batch would bypass the client token: refused per operation.
        stream = OpenStream(stub, md)
        response = stream.send(pb2.ExecuteRequest(
            handle=vm.vm.handle, ops=[pb2.BATCH_OP_MAP_MMIO, pb2.BATCH_OP_GET_PAGE],
            arg0=[0x1000_0000, 0]))
        assert response.codes[0] == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert response.errors[0].reason == "CLIENT_TOKEN_REQUIRED"
        stream.close()


def test_sdk_sends_the_client_token(guarded: RunningService) -> None:
    with Hypervisor(guarded.target, client_token=CLIENT_TOKEN) as hv, hv.create_vm() as vm:
        vm.put_page(vm.alloc_pages())
        assert hv.map_mmio(0x1000_0000).outcome
    with Hypervisor(guarded.target) as hv, pytest.raises(AuthenticationError):
        hv.create_vm()

    async def twin() -> None:
        async with AsyncHypervisor(guarded.target, client_token=CLIENT_TOKEN) as hv:
            vm = await hv.create_vm()
            await vm.put_page(await vm.alloc_pages())
            await vm.destroy()

    asyncio.run(twin())


def test_tokens_are_never_logged(guarded: RunningService,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with Hypervisor(guarded.target, client_token=CLIENT_TOKEN) as hv:
        vm = hv.create_vm(name="logged")
        token = vm._md[0][1].split()[1]
        vm.destroy()
        with pytest.raises(AuthenticationError):
            Hypervisor(guarded.target, client_token="guess-" + CLIENT_TOKEN).create_vm()
    text = caplog.text
    assert "created" in text and "destroyed" in text
    assert CLIENT_TOKEN not in text and token not in text


# -- TLS -------------------------------------------------------------------------------------

def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1, and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (scripts/install-system-packages installs it)")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=pkvm-sim test CA", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"))
    for name, extension in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pkvm-sim {name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.pem"))
    return d


def test_tls(pki: Path) -> None:
    service = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        with Hypervisor(service.target, root_certificates=ca) as hv, hv.create_vm() as vm:
            vm.put_page(vm.alloc_pages())
        with grpc.insecure_channel(service.target) as plain:  # plaintext is not served
            with pytest.raises(grpc.RpcError) as caught:
                Stub(plain).GetStats(pb2.GetStatsRequest(), timeout=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with Hypervisor(service.target, tls=True, timeout=3) as untrusting, \
                pytest.raises(PkvmError):  # the system's CAs do not trust the test CA
            untrusting.stats()

        async def twin() -> None:
            async with AsyncHypervisor(service.target, root_certificates=ca) as hv:
                assert (await hv.stats()).nr_vms == 0

        asyncio.run(twin())
    finally:
        service.stop(0)


def test_mutual_tls(pki: Path) -> None:
    service = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                    tls_client_ca=str(pki / "ca.pem"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        key, chain = (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        with Hypervisor(service.target, root_certificates=ca, private_key=key,
                        certificate_chain=chain) as hv, hv.create_vm() as vm:
            vm.put_page(vm.alloc_pages())
        with Hypervisor(service.target, root_certificates=ca, timeout=3) as anonymous, \
                pytest.raises(PkvmError):  # no client certificate: refused
            anonymous.stats()
    finally:
        service.stop(0)


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValueError, match="together"):
        serve(tls_cert="cert.pem")
    with pytest.raises(ValueError, match="needs"):
        serve(tls_client_ca="ca.pem")


def test_a_tls_key_that_does_not_match_its_certificate_is_named(pki: Path) -> None:
    """The real CLI: one line naming both files, exit 2 (gRPC alone says 'Failed to bind')."""
    result = subprocess.run(
        [sys.executable, "-m", "pkvm_sim.cli", "serve", "--listen", "127.0.0.1:0",
         "--metrics-listen", "off", "--tls-cert", str(pki / "server.pem"),
         "--tls-key", str(pki / "client.key")],
        capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 2 and result.stdout == "", result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "does not match" in lines[0] and str(pki / "client.key") in lines[0]
    assert str(pki / "server.pem") in lines[0]
