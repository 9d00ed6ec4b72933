"""The service under attack, against the real `pkvm-sim serve` process: garbage request
bodies, HTTP/2 stream and connection floods without credentials, SaveState floods."""

from __future__ import annotations

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2

from tests.service.attack_helpers import ServeProcess
from tests.service.tenants import Stub

GARBAGE = b"\xff\xff\xff\xff"  # field 31, wire type 7: no protobuf message parses this


def reason_of(error: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def test_undecodable_bodies_get_invalid_argument_and_are_logged_once() -> None:
    calls = 300
    with ServeProcess() as server, grpc.insecure_channel(server.target) as channel:
        seen: dict[str, set[tuple[grpc.StatusCode, str]]] = {}
        for method in ("GetStats", "CreateVM", "HostShare"):
            raw = channel.unary_unary(f"/pkvm.v1.HypervisorService/{method}")
            for _ in range(calls // 3):
                with pytest.raises(grpc.RpcError) as caught:
                    raw(GARBAGE, timeout=30)
                seen.setdefault(method, set()).add(
                    (caught.value.code(), reason_of(caught.value)))
        execute = channel.stream_stream("/pkvm.v1.HypervisorService/Execute")
        vm = Stub(channel).CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=4),
                                  timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            list(execute(iter([GARBAGE]), timeout=30,
                         metadata=(("authorization", f"Bearer {vm.token}"),)))
        seen["Execute"] = {(caught.value.code(), reason_of(caught.value))}
        assert Stub(channel).GetStats(pb2.GetStatsRequest(), timeout=30).nr_vms == 1
        assert server.stop() == 0
    expected = {(grpc.StatusCode.INVALID_ARGUMENT, "UNDECODABLE_REQUEST")}
    assert all(codes == expected for codes in seen.values()), seen
    log = server.stderr
    assert "Traceback" not in log, log[-3000:]
    reports = [line for line in log.splitlines() if "undecodable" in line]
    assert len(reports) == 1, reports  # at most one line a minute
