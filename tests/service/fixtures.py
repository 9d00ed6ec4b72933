"""Shared fixtures: the real service, in-process, on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.core.config import SimConfig
from pkvm_sim.service.limits import Limits
from pkvm_sim.service.server import RunningService, ServerSettings, start

# The default limits, except that one VM may drain the hyp pool (tests of exhaustion do);
# tests/service/test_tenancy.py covers the quotas themselves.
TEST_SETTINGS = ServerSettings(
    listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", limits=Limits(quota_hyp_pages=0)
)


def start_service(
    config: SimConfig | None = None, settings: ServerSettings = TEST_SETTINGS
) -> RunningService:
    """Boot the real Hypervisor and serve it on a free loopback port."""
    return start(config or SimConfig(), settings)


@pytest.fixture(scope="module")
def service() -> Iterator[RunningService]:
    running = start_service()
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def channel(service: RunningService) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(service.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb2_grpc.HypervisorServiceStub:
    return pb2_grpc.HypervisorServiceStub(channel)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class RawVM:
    """A VM created with the raw stub, for protocol-level tests."""

    def __init__(self, stub: pb2_grpc.HypervisorServiceStub, slice_pages: int = 64) -> None:
        response = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=slice_pages))
        self.stub = stub
        self.vm = response.vm
        self.handle = response.vm.handle
        self.token = response.token
        self.md = bearer(response.token)

    def destroy(self) -> None:
        self.stub.DestroyVM(pb2.DestroyVMRequest(handle=self.handle), metadata=self.md)


@pytest.fixture
def raw_vm(stub: pb2_grpc.HypervisorServiceStub) -> Iterator[RawVM]:
    vm = RawVM(stub)
    yield vm
    try:
        vm.destroy()
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND  # the test destroyed it
