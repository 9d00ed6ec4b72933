"""One walk over the proto's descriptor: every RPC of HypervisorService has its operation
record (service/operations.py) and a handler on the servicer, its entry in the SDK's call
table with the SDK methods it names present on the sync and the asyncio client, its entry in
the docs, and, where batchable, its BatchOp (and the reverse: every BatchOp is an RPC's).

`GetMemoryMap` once shipped without an SDK method and nothing noticed: this test is what
notices now (`test_the_walk_would_have_caught_a_missing_sdk_method` proves it)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pkvm_client
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm.v1 import hypervisor_pb2_grpc as pb2_grpc
from pkvm_client import _calls
from pkvm_sim.core.config import SimConfig
from pkvm_sim.core.hypervisor import Hypervisor
from pkvm_sim.service import operations
from pkvm_sim.service.servicer import HypervisorServicer

ROOT = Path(__file__).resolve().parents[2]
SERVICE = pb2.DESCRIPTOR.services_by_name["HypervisorService"]
RPCS = [method.name for method in SERVICE.methods]
UNARY = [m.name for m in SERVICE.methods if not (m.client_streaming or m.server_streaming)]
STREAMING = [m.name for m in SERVICE.methods if m.client_streaming or m.server_streaming]
# The SDK classes that make calls, and their asyncio twins.
TWIN = {"Hypervisor": "AsyncHypervisor", "VM": "AsyncVM"}
# How the docs name a client's methods: `hv.stats`, `vm.alloc_pages`.
DOC_PREFIX = {"Hypervisor": "hv", "VM": "vm"}


def snake(name: str) -> str:
    """AllocPages -> alloc_pages, MapMMIO -> map_mmio."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def section(path: Path, heading: str) -> str:
    """The text of the `## heading...` section of a markdown file."""
    text = path.read_text()
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def sdk_methods(rpc: str) -> tuple[str, ...]:
    if rpc in _calls.STREAMS:
        return _calls.STREAMS[rpc]
    (call,) = [c for c in _calls.CALLS if c.rpc == rpc]
    return call.methods


def missing(rpc: str, calls: tuple[_calls.Call[object], ...] = _calls.CALLS) -> list[str]:
    """What RPC `rpc` lacks, as readable complaints (empty: nothing)."""
    problems = []
    is_unary = rpc in UNARY
    if is_unary and rpc not in operations.BY_RPC:
        problems.append("no operation record in service/operations.py")
    entries = [call for call in calls if call.rpc == rpc]
    names = _calls.STREAMS.get(rpc, ()) if not is_unary else \
        (entries[0].methods if len(entries) == 1 else ())
    if not names:
        problems.append("no entry in the SDK's call table (client/pkvm_client/_calls.py)")
    for qualified in names:
        owner, method = qualified.split(".")
        for cls_name in (owner, TWIN[owner]):
            member = getattr(getattr(pkvm_client, cls_name), method, None)
            if member is None:
                problems.append(f"no SDK method {cls_name}.{method}")
            elif not (inspect.getdoc(member) or "").strip():
                problems.append(f"SDK method {cls_name}.{method} has no docstring")
    protocol = section(ROOT / "docs/service.md", "Protocol")
    if rpc not in protocol:
        problems.append("not named in docs/service.md's Protocol section")
    sdk_doc = (ROOT / "docs/sdk.md").read_text()
    for qualified in names:
        owner, method = qualified.split(".")
        if f"{DOC_PREFIX[owner]}.{method}" not in sdk_doc:
            problems.append(f"{DOC_PREFIX[owner]}.{method} not in docs/sdk.md")
    return problems


@pytest.mark.parametrize("rpc", RPCS)
def test_every_rpc_has_its_record_sdk_methods_and_docs(rpc: str) -> None:
    assert missing(rpc) == []


def test_records_and_calls_name_only_real_rpcs() -> None:
    assert sorted(operations.BY_RPC) == sorted(UNARY)
    assert len(operations.OPERATIONS) == len(UNARY)  # no RPC twice
    assert sorted(call.rpc for call in _calls.CALLS) == sorted(UNARY)
    assert sorted(_calls.STREAMS) == sorted(STREAMING) == ["Execute"]


def test_every_rpc_is_served() -> None:
    """The servicer's handler is ours, not the generated base class's UNIMPLEMENTED."""
    config = SimConfig()
    servicer = HypervisorServicer(Hypervisor.boot(config), config)
    base = pb2_grpc.HypervisorServiceServicer
    for rpc in RPCS:
        handler = getattr(servicer, rpc)
        assert getattr(handler, "__func__", handler) is not getattr(base, rpc), rpc


@pytest.mark.parametrize(
    "op", [v for v in pb2.BatchOp.values() if v != pb2.BATCH_OP_UNSPECIFIED],
    ids=lambda v: pb2.BatchOp.Name(v))
def test_every_batch_op_is_a_batchable_rpc(op: int) -> None:
    """BATCH_OP_X is the batch form of the RPC whose snake-case name is x; the SDK's Batch
    builds it under the same name."""
    name = pb2.BatchOp.Name(op).removeprefix("BATCH_OP_").lower()
    (rpc,) = [r for r in UNARY if snake(r) == name]
    record = operations.BY_RPC[rpc]
    assert record.batch_op == op
    assert record.counted == name
    assert callable(getattr(pkvm_client.Batch, name, None)), f"Batch.{name}"


def test_batchable_records_have_a_batch_op() -> None:
    batch_ops = set(pb2.BatchOp.values())
    for record in operations.OPERATIONS:
        if record.batch_op is not None:
            assert record.batch_op in batch_ops
            assert pb2.BatchOp.Name(record.batch_op) == f"BATCH_OP_{snake(record.rpc).upper()}"


def test_the_walk_would_have_caught_a_missing_sdk_method() -> None:
    """Without GetMemoryMap's call-table entry (as it once shipped), the walk complains."""
    without = tuple(call for call in _calls.CALLS if call.rpc != "GetMemoryMap")
    assert missing("GetMemoryMap", without) == [
        "no entry in the SDK's call table (client/pkvm_client/_calls.py)"]
    assert missing("GetMemoryMap") == []
