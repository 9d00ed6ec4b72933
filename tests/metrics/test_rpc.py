"""The metrics interceptors on real servers of both flavours (sync and grpc.aio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from pkvm_sim.metrics.rpc import (
    LATENCY_BUCKETS_S,
    AioServerMetricsInterceptor,
    RpcStats,
    ServerMetricsInterceptor,
)
from prometheus_client.core import Metric

SERVICE = "test.Echo"


def identity(data: bytes) -> bytes:
    return data


def quota_status() -> grpc.Status:
    """A refusal as the service sends it: code plus a google.rpc.ErrorInfo reason."""
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="QUOTA_EXCEEDED", domain="pkvm.v1"))
    status: grpc.Status = rpc_status.to_status(status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED, message="quota", details=[detail]))
    return status


def samples(stats: RpcStats) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    family: Metric
    for family in stats.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def handled(stats: RpcStats) -> dict[tuple[str, str, str], float]:
    return {(lab["grpc_type"], lab["grpc_method"], lab["grpc_code"]): v
            for lab, v in samples(stats)["grpc_server_handled_total"]}


def sync_handlers() -> grpc.GenericRpcHandler:
    def ok(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no")
        raise AssertionError  # pragma: no cover

    def crash(request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("bug")

    def quota(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort_with_status(quota_status())
        raise AssertionError  # pragma: no cover

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Ok": grpc.unary_unary_rpc_method_handler(ok, identity, identity),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse, identity, identity),
        "Crash": grpc.unary_unary_rpc_method_handler(crash, identity, identity),
        "Quota": grpc.unary_unary_rpc_method_handler(quota, identity, identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity),
    })


def aio_handlers() -> grpc.GenericRpcHandler:
    async def ok(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    async def refuse(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no")
        raise AssertionError  # pragma: no cover

    async def crash(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise RuntimeError("bug")

    async def quota(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        status = quota_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError  # pragma: no cover

    async def stream(requests: AsyncIterator[bytes],
                     context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Ok": grpc.unary_unary_rpc_method_handler(ok, identity, identity),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse, identity, identity),
        "Crash": grpc.unary_unary_rpc_method_handler(crash, identity, identity),
        "Quota": grpc.unary_unary_rpc_method_handler(quota, identity, identity),
        "Stream": grpc.stream_stream_rpc_method_handler(stream, identity, identity),
    })


def drive(target: str) -> None:
    """Two OK calls, one refusal, one crash, one bidi stream of three messages."""
    with grpc.insecure_channel(target) as channel:
        ok = channel.unary_unary(f"/{SERVICE}/Ok", identity, identity)
        assert ok(b"a", timeout=5) == b"a" and ok(b"b", timeout=5) == b"b"
        for name, code in (("Refuse", grpc.StatusCode.RESOURCE_EXHAUSTED),
                           ("Crash", grpc.StatusCode.UNKNOWN),
                           ("Quota", grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary(f"/{SERVICE}/{name}", identity, identity)(b"x", timeout=5)
            assert error.value.code() == code
        stream = channel.stream_stream(f"/{SERVICE}/Stream", identity, identity)
        assert list(stream(iter([b"1", b"2", b"3"]), timeout=5)) == [b"1", b"2", b"3"]


def check(stats: RpcStats) -> None:
    assert handled(stats) == {
        ("unary", "Ok", "OK"): 2,
        ("unary", "Refuse", "RESOURCE_EXHAUSTED"): 1,
        ("unary", "Crash", "UNKNOWN"): 1,
        ("unary", "Quota", "RESOURCE_EXHAUSTED"): 1,
        ("bidi_stream", "Stream", "OK"): 1,
    }
    got = samples(stats)
    started = {lab["grpc_method"]: v for lab, v in got["grpc_server_started_total"]}
    assert started == {"Ok": 2, "Refuse": 1, "Crash": 1, "Quota": 1, "Stream": 1}
    # Only the refusal that carries an ErrorInfo has a reason.
    refusals = {(lab["grpc_method"], lab["reason"]): v
                for lab, v in got["pkvm_grpc_refusals_total"]}
    assert refusals == {("Quota", "QUOTA_EXCEEDED"): 1}
    assert {lab["grpc_service"] for lab, _ in got["grpc_server_started_total"]} == {SERVICE}
    ok_buckets = [v for lab, v in got["grpc_server_handling_seconds_bucket"]
                  if lab["grpc_method"] == "Ok"]
    assert len(ok_buckets) == len(LATENCY_BUCKETS_S) + 1 and ok_buckets[-1] == 2
    assert ok_buckets == sorted(ok_buckets)


def test_sync_server() -> None:
    stats = RpcStats()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         interceptors=[ServerMetricsInterceptor(stats)])
    server.add_generic_rpc_handlers((sync_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        drive(f"127.0.0.1:{port}")
    finally:
        server.stop(0)
    check(stats)


def test_aio_server() -> None:
    stats = RpcStats()

    async def main() -> None:
        server = grpc.aio.server(interceptors=[AioServerMetricsInterceptor(stats)])
        server.add_generic_rpc_handlers((aio_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, drive, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    asyncio.run(main())
    check(stats)


def test_aio_server_with_plain_functions() -> None:
    """A grpc.aio server may serve plain functions on a thread pool: they stay plain."""
    stats = RpcStats()

    async def main() -> None:
        pool = futures.ThreadPoolExecutor(max_workers=2)
        server = grpc.aio.server(migration_thread_pool=pool,
                                 interceptors=[AioServerMetricsInterceptor(stats)])
        server.add_generic_rpc_handlers((sync_handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await asyncio.get_running_loop().run_in_executor(None, drive, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)
            pool.shutdown()

    asyncio.run(main())
    check(stats)
