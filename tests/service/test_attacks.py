"""The service under attack, against the real `pkvm-sim serve` process: garbage request
bodies, HTTP/2 stream and connection floods without credentials, SaveState floods."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from pkvm.v1 import hypervisor_pb2 as pb2
from pkvm_sim.service.limits import Limits

from tests.service.attack_helpers import SETTINGS_MAX_CONCURRENT_STREAMS, RawH2, ServeProcess
from tests.service.tenants import Stub, serve
from tests.waiting import wait_for

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




GET_STATS = "/pkvm.v1.HypervisorService/GetStats"


def test_a_stream_flood_without_credentials_is_refused_by_http2() -> None:
    """HEADERS with no body, stream after stream, on one raw connection: the server announces
    its per-connection stream limit and resets every stream over it (REFUSED_STREAM), so
    the flood costs it a bounded amount of memory, and another client is served throughout."""
    limit = 128  # the default --max-streams-per-connection
    with ServeProcess() as server, grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        stub.GetStats(pb2.GetStatsRequest(), timeout=30)
        flood = RawH2(server.port)
        try:
            assert flood.settings_seen.wait(30)
            assert flood.server_settings.get(SETTINGS_MAX_CONCURRENT_STREAMS) == limit
            rss_before = server.rss_bytes()
            sent, codes = 0, []
            for _round in range(20):
                flood.open_streams(1000, GET_STATS, first_id=1 + 2 * sent)
                sent += 1000
                try:
                    stub.GetStats(pb2.GetStatsRequest(), timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            assert wait_for(lambda: len(flood.refused) >= sent - limit), len(flood.refused)
            grown = server.rss_bytes() - rss_before
        finally:
            flood.close()
    assert codes == [grpc.StatusCode.OK] * len(codes), codes
    assert grown < (64 << 20), grown  # 20,000 open streams would take hundreds of MiB


def test_connections_over_the_limit_are_closed() -> None:
    own_connection = (("grpc.use_local_subchannel_pool", 1),)  # one TCP connection each
    with ServeProcess("--max-connections", "4") as server:
        held = [grpc.insecure_channel(server.target, options=own_connection) for _ in range(4)]
        try:
            assert all(_stats_ok(channel) for channel in held)
            extra = RawH2(server.port)
            try:
                assert extra.closed.wait(30)  # closed without a word of HTTP/2
                assert not extra.settings_seen.is_set()
            finally:
                extra.close()
            held.pop().close()  # a slot frees up: another client gets in
            with grpc.insecure_channel(server.target, options=own_connection) as channel:
                assert wait_for(lambda: _stats_ok(channel))
        finally:
            for channel in held:
                channel.close()


def _stats_ok(channel: grpc.Channel) -> bool:
    try:
        Stub(channel).GetStats(pb2.GetStatsRequest(), timeout=5)
    except grpc.RpcError:
        return False
    return True


def test_a_save_state_flood_shares_saves_and_takes_no_call_slots(tmp_path: Path) -> None:
    """32 concurrent SaveState calls against --max-concurrent-rpcs 4: another client's calls
    are all served meanwhile, and the callers share a few saves instead of queueing 32."""
    callers = 32
    with ServeProcess("--state-file", str(tmp_path / "m.pkvm"), "--max-concurrent-rpcs", "4",
                      "--memblock", "0x80000000:4G") as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        for _ in range(8):
            stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=64), timeout=30)
        with ThreadPoolExecutor(callers) as pool:
            saves = [pool.submit(stub.SaveState, pb2.SaveStateRequest(), timeout=120)
                     for _ in range(callers)]
            codes = []
            while not all(save.done() for save in saves):
                try:
                    stub.GetStats(pb2.GetStatsRequest(), timeout=30)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
            results = [save.result() for save in saves]
    assert codes and set(codes) == {grpc.StatusCode.OK}, codes
    assert all(result.nr_vms == 8 for result in results)
    distinct_saves = {(result.seconds, result.size_bytes) for result in results}
    assert len(distinct_saves) <= callers // 4, len(distinct_saves)


class Slowloris:
    """`count` connections to /metrics, each trickling its request one byte at a time and
    reconnecting whenever the server closes it, until stopped."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"

    def __init__(self, port: int, count: int, byte_every_s: float) -> None:
        self.port = port
        self.byte_every_s = byte_every_s
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._trickle, daemon=True)
                        for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _trickle(self) -> None:
        while not self.stopped.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
                    for i in range(len(self.REQUEST)):
                        if self.stopped.wait(self.byte_every_s):
                            return
                        conn.sendall(self.REQUEST[i:i + 1])
            except OSError:
                continue  # closed by the server: come back

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(30)


def test_slowloris_connections_do_not_lock_scrapers_out() -> None:
    with ServeProcess(metrics=True) as server:
        assert server.metrics_port is not None
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        attack = Slowloris(server.metrics_port, count=32, byte_every_s=0.5)  # 16 slots
        try:
            time.sleep(1.0)  # every slot is held by a trickling connection
            statuses = []
            for _ in range(40):
                try:
                    with urllib.request.urlopen(url, timeout=30) as answer:
                        statuses.append(answer.status)
                        assert b"pkvm_vms" in answer.read()
                except urllib.error.HTTPError as error:
                    statuses.append(error.code)
                time.sleep(0.05)
        finally:
            attack.stop()
    assert statuses == [200] * len(statuses), statuses


def test_a_get_stats_flood_with_1000_vms_shares_snapshots() -> None:
    """Each GetStats with 1000 VMs is a snapshot of 1002 pools under the lock. 16 clients
    asking at once share snapshots instead of taking one each; every answer still comes
    from a snapshot taken after its call (it sees the VM created just before)."""
    service = serve(Limits(max_vms=2000))
    try:
        with grpc.insecure_channel(service.target) as channel:
            stub = Stub(channel)
            for _ in range(1000):
                stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=1), timeout=30)
            stats = service.servicer._stats
            runs_before = stats.runs

            def client(_: int) -> list[int]:
                return [stub.GetStats(pb2.GetStatsRequest(), timeout=60).nr_vms
                        for _ in range(10)]

            with ThreadPoolExecutor(16) as pool:
                answers = [n for seen in pool.map(client, range(16)) for n in seen]
            calls, runs = len(answers), stats.runs - runs_before
            stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=1), timeout=30)
            assert stub.GetStats(pb2.GetStatsRequest(), timeout=60).nr_vms == 1001
    finally:
        service.stop(0)
    assert set(answers) == {1000}
    assert runs <= calls // 4, (runs, calls)


def test_topup_memcache_is_bounded_per_vm() -> None:
    """One VM with a 1-page slice used to take every page of host RAM by top-ups. A top-up
    now fills the memcache up to its argument, as the kernel's does (repeating it adds
    nothing), and the memcache quota bounds that size, in unary calls and in batches alike."""
    with ServeProcess("--quota-memcache-pages", "100") as server, \
            grpc.insecure_channel(server.target) as channel:
        stub = Stub(channel)
        vm = stub.CreateVM(pb2.CreateVMRequest(nr_vcpus=1, slice_pages=1), timeout=30)
        md = (("authorization", f"Bearer {vm.token}"),)
        handle = vm.vm.handle
        sizes = [stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=handle, nr_pages=100),
                                    metadata=md, timeout=30).memcache_pages
                 for _ in range(3)]
        assert sizes == [100, 100, 100]
        with pytest.raises(grpc.RpcError) as caught:
            stub.TopupMemcache(pb2.TopupMemcacheRequest(handle=handle, nr_pages=101),
                               metadata=md, timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(caught.value) == "QUOTA_EXCEEDED"
        batch = pb2.ExecuteRequest(handle=handle, ops=[pb2.BATCH_OP_TOPUP_MEMCACHE] * 4,
                                   arg0=[256] * 4)
        answer = next(iter(stub.Execute(iter([batch]), metadata=md, timeout=30)))
        assert answer.completed == 0
        assert [e.reason for e in answer.errors] == ["QUOTA_EXCEEDED"] * 4
