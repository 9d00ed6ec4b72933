"""HostShare page by page over gRPC (proto fields 80-83) and the NOT_IN_PROFILE refusal.

The kernel shares one page per hypercall (__pkvm_host_share_hyp); the host's loop
(kvm_share_hyp) stops at the first failure and leaves the pages before it shared.
`page_by_page` asks for that outcome instead of the default all-or-nothing range.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.core.config import SimConfig

from tests.service.fixtures import RawVM, start_service
from tests.service.test_rpcs import refusal


def test_page_by_page_share_reports_which_pages_ended_shared(
        stub: pb2_grpc.HypervisorServiceStub, raw_vm: RawVM) -> None:
    base = raw_vm.vm.slice_base_pfn
    md = raw_vm.md
    stub.HostShare(pb2.HostShareRequest(handle=raw_vm.handle, pfn=base + 3), metadata=md)
    # All or nothing (default): page 3 is already shared, so nothing of [0, 6) is shared.
    code, reason, _meta = refusal(
        stub.HostShare, pb2.HostShareRequest(handle=raw_vm.handle, pfn=base, nr_pages=6),
        metadata=md)
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "HOST_PAGE_NOT_OWNED")
    # Page by page: pages 0, 1, 2 end shared, page 3 is refused, 4 and 5 are not tried.
    r = stub.HostShare(pb2.HostShareRequest(handle=raw_vm.handle, pfn=base, nr_pages=6,
                                            page_by_page=True), metadata=md)
    assert (r.pages_done, r.failed_pfn, r.failed_reason, r.failed_errno) == (
        3, base + 3, "HOST_PAGE_NOT_OWNED", "EPERM")
    for pfn, state in ((base + 2, pb2.PAGE_STATE_SHARED_OWNED),
                       (base + 4, pb2.PAGE_STATE_OWNED)):
        info = stub.GetPageInfo(pb2.GetPageInfoRequest(pfn=pfn))
        assert info.host_state == state
    whole = stub.HostShare(pb2.HostShareRequest(handle=raw_vm.handle, pfn=base + 4,
                                                nr_pages=2, page_by_page=True), metadata=md)
    assert whole.pages_done == 2 and not whole.HasField("failed_pfn")


@pytest.fixture
def v5_14_carveout() -> Iterator[pb2_grpc.HypervisorServiceStub]:
    config = SimConfig.from_mapping({"vmemmap_coverage": "carveout",
                                     "memblocks": ["0x80000000:256M"]})
    running = start_service(config)
    with grpc.insecure_channel(running.target) as channel:
        yield pb2_grpc.HypervisorServiceStub(channel)
    running.stop(0)


def test_an_operation_the_kernel_lacks_is_failed_precondition_not_in_profile(
        v5_14_carveout: pb2_grpc.HypervisorServiceStub) -> None:
    vm = RawVM(v5_14_carveout)
    code, reason, _meta = refusal(
        v5_14_carveout.HostShare,
        pb2.HostShareRequest(handle=vm.handle, pfn=vm.vm.slice_base_pfn), metadata=vm.md)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NOT_IN_PROFILE")
    vm.destroy()
