"""Tables keyed by BatchOp: every operation has a function and a metrics name."""

from __future__ import annotations

from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service.batch import batch_functions
from pkvm_sim.service.counters import BATCH_OP_NAMES, OP_NAMES, ServiceCounters
from pkvm_sim.service.servicer import HypervisorServicer

OPERATIONS = [value for name, value in pb2.BatchOp.items() if value != pb2.BATCH_OP_UNSPECIFIED]


def test_every_batch_op_has_a_function_and_a_name() -> None:
    config = SimConfig()
    table = batch_functions(HypervisorServicer(Hypervisor.boot(config), config).machine)
    assert sorted(table) == sorted(OPERATIONS)
    assert sorted(BATCH_OP_NAMES) == sorted(OPERATIONS)
    for op in OPERATIONS:  # the metrics name is the enum's own name, lower case
        assert BATCH_OP_NAMES[op] == pb2.BatchOp.Name(op).removeprefix("BATCH_OP_").lower()


def test_operation_names_are_unique_and_counted_from_zero() -> None:
    assert len(set(OP_NAMES)) == len(OP_NAMES)
    assert ServiceCounters().operations_by_name() == dict.fromkeys(OP_NAMES, 0)


def test_not_in_profile_is_a_failed_precondition() -> None:
    import grpc
    from pkvm_sim.core.errors import InvalidArgument
    from pkvm_sim.service.errors import status_code_of

    error = InvalidArgument("v5.13 has no such pool", reason="NOT_IN_PROFILE")
    assert status_code_of(error) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_code_of(InvalidArgument("bad")) == grpc.StatusCode.INVALID_ARGUMENT
