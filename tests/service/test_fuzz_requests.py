"""Malformed requests of every kind, generated from the protocol's own descriptors.

The standard: no request, however malformed, may crash the server, leak a page or corrupt a
free list. So every unary RPC gets arbitrary values in every field (huge, zero, negative
where the type allows, NaN/inf doubles, unknown enum values, odd strings), on behalf of a
real VM, a forged token or no token at all. Every answer must be OK or a deliberate
refusal (never INTERNAL/UNKNOWN), and at the end, with every VM destroyed, the machine must
pass its audit and equal its state right after boot.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.server import RunningService, ServerSettings, start

from tests.service.fixtures import bearer

DELIBERATE = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED,
}
UNARY_RPCS = [m for m in pb2.DESCRIPTOR.services_by_name["HypervisorService"].methods
              if not m.client_streaming and not m.server_streaming]
U64 = 2**64 - 1


class Machine:
    def __init__(self) -> None:
        self.hv = Hypervisor.boot(SimConfig())
        self.boot_dump = self.hv.canonical_dump()
        self.service: RunningService = start(
            SimConfig(), ServerSettings(listen="127.0.0.1:0", metrics_listen=None, workers=4),
            hypervisor=self.hv)
        self.channel = grpc.insecure_channel(self.service.target)
        self.stub = pb2_grpc.HypervisorServiceStub(self.channel)
        created = self.stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=64))
        self.vm = created.vm
        self.md = bearer(created.token)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    m = Machine()
    yield m
    m.channel.close()
    m.service.stop(0)


def interesting_ints(m: Machine, lo: int, hi: int) -> st.SearchStrategy[int]:
    near = [m.vm.handle, m.vm.slice_base_pfn, m.vm.slice_base_pfn + 1,
            m.vm.slice_base_pfn + m.vm.slice_nr_pages, 0x8000_0000, 0x0900_0000, 0x80000,
            0x1_7EA0_0000, 0x17EA06, 4096, 4095, 1, 0, 11, 12, -1, 2**31 - 1, 2**32 - 1,
            2**63, U64]
    return st.one_of(st.sampled_from([v for v in near if lo <= v <= hi]),
                     st.integers(lo, hi))


def field_value(m: Machine, field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_UINT64:
        return interesting_ints(m, 0, U64)
    if t == FieldDescriptor.TYPE_UINT32:
        return interesting_ints(m, 0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM):
        return interesting_ints(m, -(2**31), 2**31 - 1)
    if t == FieldDescriptor.TYPE_INT64:
        return interesting_ints(m, -(2**63), 2**63 - 1)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, -1.0, 1e300, math.inf, -math.inf, math.nan]),
                         st.floats())
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=300)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    raise AssertionError(f"no strategy for field {field.full_name} of type {t}")


@st.composite
def requests(draw: st.DrawFn, m: Machine) -> tuple[Any, Any, Any]:
    method = draw(st.sampled_from(UNARY_RPCS))
    request_class = getattr(pb2, method.input_type.name)
    request = request_class()
    for field in method.input_type.fields:
        if field.name == "handle" and method.name == "DestroyVM":
            # Any handle but the fixture VM's: the fuzz keeps using that one.
            request.handle = draw(interesting_ints(m, 0, U64).filter(lambda h: h != m.vm.handle))
        elif field.name == "handle" and draw(st.integers(0, 99)) < 85:
            request.handle = m.vm.handle  # mostly the real VM, so the core gets to see it
        elif draw(st.booleans()):
            if field.is_repeated:  # e.g. GetMemoryMap.pools
                values = draw(st.lists(field_value(m, field), max_size=20))
                getattr(request, field.name).extend(values)
            else:
                setattr(request, field.name, draw(field_value(m, field)))
    metadata = draw(st.one_of(
        st.just(m.md),
        st.sampled_from([(), bearer("forged"), (("authorization", "Bearer"),),
                         (("authorization", "Basic abc"),)]),
    ))
    return method, request, metadata


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.data())
def test_any_request_gets_a_deliberate_answer(machine: Machine, data: st.DataObject) -> None:
    method, request, metadata = data.draw(requests(machine))
    call = getattr(machine.stub, method.name)
    try:
        call(request, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        assert error.code() in DELIBERATE, (method.name, request, error.code(), error.details())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_batch_gets_per_operation_answers(machine: Machine, data: st.DataObject) -> None:
    """Execute with arbitrary op codes and arguments, runs of identical ops included: every
    operation is answered with a deliberate code (never INTERNAL = 13), in order."""
    n = data.draw(st.integers(1, 60))
    op = st.integers(-3, 12) | st.sampled_from([pb2.BATCH_OP_ALLOC_PAGES, pb2.BATCH_OP_PUT_PAGE])
    ops = data.draw(st.lists(op, min_size=n, max_size=n))
    arg = interesting_ints(machine, -(2**63), 2**63 - 1)
    arg0 = data.draw(st.lists(arg, max_size=n))
    arg1 = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, -1]) | arg, max_size=n))
    request = pb2.ExecuteRequest(handle=machine.vm.handle, ops=ops, arg0=arg0, arg1=arg1,
                                 stop_on_error=data.draw(st.booleans()))
    [response] = machine.stub.Execute(iter([request]), metadata=machine.md, timeout=10)
    assert len(response.codes) == len(response.values) == n
    assert 13 not in response.codes, [(e.index, e.reason, e.message) for e in response.errors]
    assert response.completed == sum(code == 0 for code in response.codes)


def test_after_the_fuzz_the_machine_is_whole(machine: Machine) -> None:
    """Runs after the fuzz in this module (pytest keeps file order)."""
    hv = machine.hv
    with machine.service.servicer.lock:
        hv.audit()
        for vm in hv.vms():
            hv.destroy_vm(vm.handle)
        hv.audit()
        assert hv.canonical_dump() == machine.boot_dump
