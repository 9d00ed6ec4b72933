"""The SDK's public surface: pinned, documented, and in step with the protocol.

Like httpx's tests/test_exported_members.py: changing what `pkvm_client` exports means
changing EXPORTS here too, on purpose.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pkvm_client
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2

EXPORTS = {
    # connections, VMs, streams
    "Hypervisor", "VM", "BatchStream",
    "AsyncHypervisor", "AsyncVM", "AsyncVMCreation", "AsyncBatchStream",
    # batches
    "Batch", "BatchResult", "MAX_BATCH_OPS",
    # results and enums
    "VmInfo", "Fault", "ShareResult", "GuestMapping", "Stats", "PoolStats", "VmemmapStats",
    "HostStage2Stats", "PageInfo", "Reservation", "CarveoutRegion", "SavedState",
    "MemoryMap", "MemoryRegion", "PoolMap",
    "Pool", "PageState", "FaultOutcome",
    # errors
    "PkvmError", "OutOfMemoryError", "InvalidArgumentError", "OutOfRangeError", "NotFoundError",
    "AlreadyExistsError", "PermissionDeniedError", "AuthenticationError",
    "FailedPreconditionError", "BusyError", "WouldPanicError", "TransportError",
}

# Each result dataclass and the protocol message it is read from: same field names.
MESSAGE_OF_RESULT = {
    "VmInfo": pb2.VM,
    "Fault": pb2.Fault,
    "ShareResult": pb2.HostShareResponse,
    "GuestMapping": pb2.GuestMapResponse,
    "Stats": pb2.GetStatsResponse,
    "PoolStats": pb2.PoolStats,
    "VmemmapStats": pb2.VmemmapStats,
    "HostStage2Stats": pb2.HostStage2Stats,
    "PageInfo": pb2.GetPageInfoResponse,
    "Reservation": pb2.ReserveResponse,
    "CarveoutRegion": pb2.CarveoutRegion,
    "SavedState": pb2.SaveStateResponse,
    "MemoryMap": pb2.GetMemoryMapResponse,
    "MemoryRegion": pb2.MemoryRegion,
    "PoolMap": pb2.PoolMap,
}
PROTO_ENUM_OF = {"Pool": "PoolKind", "PageState": "PageState", "FaultOutcome": "FaultOutcome"}


def test_all_is_pinned() -> None:
    assert set(pkvm_client.__all__) == EXPORTS
    assert len(pkvm_client.__all__) == len(EXPORTS)  # no duplicates


def test_all_is_exactly_what_the_package_offers() -> None:
    public = {name for name in dir(pkvm_client) if not name.startswith("_")}
    assert public == set(pkvm_client.__all__)
    for name in pkvm_client.__all__:
        assert getattr(pkvm_client, name) is not None


def test_sdk_does_not_import_the_simulator() -> None:
    code = "import sys, pkvm_client; assert not any(m.startswith('pkvm_sim') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _public_members(cls: type) -> Iterator[tuple[str, Any]]:
    """Methods and properties that `cls` or an SDK base class defines (not those of object,
    Exception, IntEnum...), without dunders and private names."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pkvm_client"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or not (
                inspect.isfunction(member) or isinstance(member, (property, classmethod))
            ):
                continue
            yield f"{cls.__name__}.{name}", member


def _undocumented() -> list[str]:
    missing = []
    for name in pkvm_client.__all__:
        obj = getattr(pkvm_client, name)
        if not isinstance(obj, type):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        for qualname, member in _public_members(obj):
            function = member.fget if isinstance(member, property) else member
            if isinstance(function, classmethod):
                function = function.__func__
            if not (inspect.getdoc(function) or "").strip():
                missing.append(qualname)
    return sorted(set(missing))


def test_every_public_class_and_method_has_a_docstring() -> None:
    assert _undocumented() == []


def test_the_docstring_check_sees_methods() -> None:
    """The check above is not vacuous: it walks the methods users call."""
    classes = [getattr(pkvm_client, n) for n in pkvm_client.__all__]
    names = {q for cls in classes if isinstance(cls, type) for q, _ in _public_members(cls)}
    assert {"VM.alloc_pages", "VM.destroy", "AsyncVM.put_page", "AsyncHypervisor.wait_ready",
            "Batch.guest_map", "BatchStream.execute", "Stats.pool", "BatchResult.ok",
            "BatchResult.from_response", "Pool.of"} <= names
    assert len(names) > 60  # the sync and asyncio clients alone have more than 60


@pytest.mark.parametrize("result", sorted(MESSAGE_OF_RESULT))
def test_result_fields_are_the_protocol_fields(result: str) -> None:
    cls = getattr(pkvm_client, result)
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    message = MESSAGE_OF_RESULT[result].DESCRIPTOR
    assert [f.name for f in dataclasses.fields(cls)] == [f.name for f in message.fields]
    for field in message.fields:  # repeated fields are tuples, proto3 optionals may be None
        hint = cls.__annotations__[field.name]
        if field.is_repeated:
            assert hint.startswith("tuple["), (result, field.name)
        if field.has_presence and field.message_type is None:
            assert hint.endswith("| None"), (result, field.name)


@pytest.mark.parametrize("name", sorted(PROTO_ENUM_OF))
def test_enums_carry_the_protocol_values(name: str) -> None:
    sdk: type[enum.IntEnum] = getattr(pkvm_client, name)
    proto = pb2.DESCRIPTOR.enum_types_by_name[PROTO_ENUM_OF[name]]
    prefix = {"PoolKind": "POOL_KIND_"}.get(proto.name, f"{_snake(proto.name)}_")
    wire = {v.name.removeprefix(prefix): v.number for v in proto.values}
    if name == "Pool":  # UNSPECIFIED means HYP on the wire; the SDK never sends it
        del wire["UNSPECIFIED"]
    assert {member.name: member.value for member in sdk} == wire


def _snake(camel: str) -> str:
    return "".join(f"_{c}" if c.isupper() and i else c for i, c in enumerate(camel)).upper()


def test_pool_accepts_the_enum_or_its_name() -> None:
    assert pkvm_client.Pool.of("vm") is pkvm_client.Pool.VM
    assert pkvm_client.Pool.of(pkvm_client.Pool.HYP) is pkvm_client.Pool.HYP
    with pytest.raises(ValueError):
        pkvm_client.Pool.of("host")  # type: ignore[arg-type]


TWINS = [
    (pkvm_client.Hypervisor, pkvm_client.AsyncHypervisor),
    (pkvm_client.VM, pkvm_client.AsyncVM),
    (pkvm_client.BatchStream, pkvm_client.AsyncBatchStream),
]
NO_CALL = {"attach", "close"}  # make no RPC, so they take no deadline


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {name.split(".")[1]: inspect.signature(member) for name, member in _public_members(cls)
            if inspect.isfunction(member)}


@pytest.mark.parametrize(("sync", "aio"), TWINS, ids=lambda cls: cls.__name__)
def test_the_asyncio_twin_has_the_same_methods(sync: type, aio: type) -> None:
    """What the sync client offers, the asyncio one offers too, with the same parameters
    (AsyncHypervisor once lacked wait_ready)."""
    sync_methods, aio_methods = _methods(sync), _methods(aio)
    assert sorted(sync_methods) == sorted(aio_methods)
    for name, signature in sync_methods.items():
        assert list(signature.parameters) == list(aio_methods[name].parameters), name


@pytest.mark.parametrize("cls", [c for pair in TWINS for c in pair], ids=lambda c: c.__name__)
def test_every_call_takes_a_timeout(cls: type) -> None:
    for name, signature in _methods(cls).items():
        if name in NO_CALL:
            continue
        parameter = signature.parameters.get("timeout")
        assert parameter is not None, f"{cls.__name__}.{name} has no timeout="
        assert parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
