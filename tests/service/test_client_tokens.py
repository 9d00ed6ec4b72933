"""The client token file (one client per line) and the per-client ledgers, without a server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from pkvm_sim.service.auth import ClientToken, client_of
from pkvm_sim.service.errors import ServiceError
from pkvm_sim.service.limits import Admission, ClientLedger, Limits


def tokens(tmp_path: Path, text: str) -> ClientToken:
    path = tmp_path / "clients"
    path.write_text(text)
    return ClientToken.from_file(path)


def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ServiceError) as caught:
        call()  # type: ignore[operator]
    return caught.value.code, caught.value.reason


def test_one_token_is_the_old_format(tmp_path: Path) -> None:
    guard = tokens(tmp_path, "  s3cret \n")
    assert guard.required and guard.check("s3cret", "CreateVM") == "client"
    assert refused(lambda: guard.check("s3cret2", "CreateVM")) == (
        grpc.StatusCode.UNAUTHENTICATED, "BAD_CLIENT_TOKEN")
    assert refused(lambda: guard.check(None, "CreateVM")) == (
        grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_each_line_is_a_client(tmp_path: Path) -> None:
    guard = tokens(tmp_path, "# the team\nalice a-1\n\nb-2\n  carol c-3\n")
    assert [guard.check(t, "CreateVM") for t in ("a-1", "b-2", "c-3")] == [
        "alice", "line-4", "carol"]


@pytest.mark.parametrize("text, message", [
    ("", "holds no token"), ("# only a comment\n", "holds no token"),
    ("alice a-1 extra\n", ":1: expected TOKEN or NAME TOKEN"),
    ("alice a-1\nalice a-2\n", ":2: client 'alice' or its token is given twice"),
    ("alice a-1\nbob a-1\n", ":2: client 'bob' or its token is given twice"),
    ("x" * 1025 + "\n", ":1: expected TOKEN"),
])
def test_bad_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokens(tmp_path, text)


def test_no_file_no_client_name() -> None:
    guard = ClientToken(None)
    assert not guard.required and guard.check(None, "CreateVM") is None
    assert client_of(None, "ipv4:127.0.0.1:4242") == "ipv4:127.0.0.1:4242"
    assert client_of("alice", "ipv4:127.0.0.1:4242") == "alice"


def test_vms_and_lease_seconds_per_client() -> None:
    ledger = ClientLedger(Limits(max_vms_per_client=2, max_lease_seconds_per_client=100))
    ledger.check_create("a", 60)
    ledger.created(1, "a", 60)
    assert refused(lambda: ledger.check_create("a", 41)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "CLIENT_LEASE_EXCEEDED")
    ledger.check_create("a", 40)  # 60 + 40 = 100: at the cap, not over it
    ledger.created(2, "a", 40)
    assert refused(lambda: ledger.check_create("a", 0)) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_VMS_FOR_CLIENT")
    ledger.check_create("b", 100)
    ledger.forget(1)
    assert (ledger.vms_of("a"), ledger.lease_seconds_of("a")) == (1, 40)
    ledger.forget(2)
    ledger.forget(2)  # twice (a reaped VM destroyed again): nothing more
    assert (ledger.vms_of("a"), ledger.lease_seconds_of("a"), ledger.owner_of(2)) == (0, 0, None)


def test_streams_per_client() -> None:
    admission = Admission(Limits(max_streams_per_client=2, max_streams_per_vm=4))
    admission.open_stream(1, "a")
    admission.open_stream(2, "a")
    assert refused(lambda: admission.open_stream(3, "a")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_STREAMS_FOR_CLIENT")
    assert admission.streams == 2  # the refused stream was not counted
    admission.open_stream(3, "b")
    admission.open_stream(4, None)  # a restored VM: no client, no per-client count
    admission.close_stream(1, "a")
    admission.open_stream(1, "a")
