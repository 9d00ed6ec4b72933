"""Per-RPC metrics with the go-grpc-prometheus names, from a server interceptor.

Exported series (labels `grpc_type`, `grpc_service`, `grpc_method`, and `grpc_code` on
`handled`), as go-grpc-prometheus names them so that its dashboards and alerts apply:

    grpc_server_started_total           RPCs started on the server
    grpc_server_handled_total           RPCs completed, whatever their status code
    grpc_server_handling_seconds        a histogram of the time from start to the status

As in go-grpc-prometheus, the histogram has no `grpc_code` label: codes multiply its series.

The hot path costs one short lock and a few integer additions per RPC (no prometheus_client
object, no `.labels()` look-up: docs/performance.md measures those at 2 µs each). A scrape copies
the records in O(methods) under that lock and renders them outside it.

`ServerMetricsInterceptor` serves `grpc.server`, `AioServerMetricsInterceptor` serves
`grpc.aio.server`; both feed one `RpcStats`. `InstrumentedServer` does what the aio
interceptor does at registration time instead of on every call: the `add_*_to_server`
functions register through it and each method handler is wrapped once. grpc.aio runs an
interceptor chain (two more coroutines and a handler look-up) per call; the service uses
`InstrumentedServer` for that reason (docs/service.md, "Where a unary call spends its time").
A behaviour marked `counts_itself` feeds its `RpcStats` directly (`started`, then `ended` or
`finish`), which spares a unary call the wrapper's coroutine: every wrapper here leaves it as
it is. The service's unary handlers do so, on the event loop, the one thread that writes
their records: without the lock (`started_unlocked`, `ended_unlocked`).
"""

from __future__ import annotations

import bisect
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# Upper bounds in seconds. Prometheus' default buckets start at 5 ms; a unary call here takes
# about 0.4 ms (docs/performance.md), so finer buckets come first or p50 would read as 5 ms.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]  # generic in the type stubs only
else:
    Handler = grpc.RpcMethodHandler
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


@dataclass
class MethodRecord:
    """Counts of one method; mutated under `RpcStats._lock`, or by one thread only (the
    `_unlocked` methods of RpcStats say when)."""

    grpc_type: str  # "unary" | "client_stream" | "server_stream" | "bidi_stream"
    service: str
    method: str
    started: int = 0
    handled: dict[str, int] = field(default_factory=dict)  # code name -> count
    bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    seconds_sum: float = 0.0
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)  # (code, reason) -> n

    def copy(self) -> MethodRecord:
        """Each field read whole (under the GIL), in the reverse of the order a call updates
        them, so that a copy taken while its one writer runs without the lock still has
        started >= handled >= the histogram's count."""
        refusals, seconds_sum = dict(self.refusals), self.seconds_sum
        bucket_counts = list(self.bucket_counts)
        handled = dict(self.handled)
        return MethodRecord(self.grpc_type, self.service, self.method, self.started, handled,
                            bucket_counts, seconds_sum, refusals)


class RpcStats:
    """The counters every interceptor feeds, and the collector that renders them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, MethodRecord] = {}

    def record_for(self, full_method: str, grpc_type: str) -> MethodRecord:
        """The record of `/package.Service/Method` (created on first use)."""
        record = self._records.get(full_method)
        if record is None:
            service, _, method = full_method.lstrip("/").rpartition("/")
            with self._lock:
                record = self._records.setdefault(
                    full_method, MethodRecord(grpc_type, service or "unknown", method)
                )
        return record

    def started(self, record: MethodRecord) -> float:
        with self._lock:
            return self.started_unlocked(record)

    def started_unlocked(self, record: MethodRecord) -> float:
        """`started` without the lock, for a record that one thread alone writes (a handler
        that counts itself, on its server's event loop); a scrape copies it whole anyway
        (MethodRecord.copy)."""
        record.started += 1
        return time.perf_counter()

    def handled(
        self, record: MethodRecord, code: grpc.StatusCode, start: float, reason: str | None = None
    ) -> None:
        self.ended(record, code.name, start, reason)

    def ended(self, record: MethodRecord, name: str, start: float,
              reason: str | None = None) -> None:
        """Count a call started at `start` (perf_counter) that ended with the status code
        named `name` ("OK", "NOT_FOUND"...), and a refusal's ErrorInfo reason if any."""
        with self._lock:
            self.ended_unlocked(record, name, start, reason)

    def ended_unlocked(self, record: MethodRecord, name: str, start: float,
                       reason: str | None = None) -> None:
        """`ended` without the lock, for a record that one thread alone writes (as
        `started_unlocked`). The order of the updates is the one MethodRecord.copy relies on."""
        seconds = time.perf_counter() - start
        record.handled[name] = record.handled.get(name, 0) + 1
        record.bucket_counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # le: <=
        record.seconds_sum += seconds
        if reason is not None:
            key = (name, reason)
            record.refusals[key] = record.refusals.get(key, 0) + 1

    def finish(self, record: MethodRecord, context: Any, start: float,
               error: BaseException | None = None) -> None:
        """Count a call that ended: its status code and, for a refusal, the reason."""
        code = _code_of(context, error)
        reason = None if code is grpc.StatusCode.OK else refusal_reason(context)
        self.handled(record, code, start, reason)

    def snapshot(self) -> list[MethodRecord]:
        with self._lock:
            return [record.copy() for _, record in sorted(self._records.items())]

    def collect(self) -> Iterable[Metric]:
        """The three go-grpc-prometheus families (prometheus_client Collector protocol)."""
        records = self.snapshot()  # rendered outside the lock
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        started = CounterMetricFamily(
            "grpc_server_started", "Total number of RPCs started on the server.", labels=labels
        )
        handled = CounterMetricFamily(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            labels=[*labels, "grpc_code"],
        )
        seconds = HistogramMetricFamily(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            labels=labels,
        )
        refusals = CounterMetricFamily(
            "pkvm_grpc_refusals",
            "Calls refused with a reason (the google.rpc.ErrorInfo detail): the simulator's "
            "expected answers, such as ENOMEM or QUOTA_EXCEEDED.",
            labels=["grpc_method", "grpc_code", "reason"],
        )
        for r in records:
            values = [r.grpc_type, r.service, r.method]
            started.add_metric(values, r.started)
            for (code, reason), count in sorted(r.refusals.items()):
                refusals.add_metric([r.method, code, reason], count)
            for code, count in sorted(r.handled.items()):
                handled.add_metric([*values, code], count)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), r.bucket_counts,
                                    strict=True):
                cumulative += count
                buckets.append((_bound_text(bound), cumulative))
            seconds.add_metric(values, buckets, r.seconds_sum)
        return [started, handled, seconds, refusals]


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def rpc_type(handler: Handler) -> str:
    if handler.request_streaming:
        return "bidi_stream" if handler.response_streaming else "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _code_of(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: the code set on the context (abort sets it too), else
    OK for a return, CANCELLED for a stream closed under it, UNKNOWN for an exception."""
    code = context.code()
    if isinstance(code, int):  # grpc.aio hands the C core's integer back
        code = _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    if isinstance(code, grpc.StatusCode) and (error is None or code is not grpc.StatusCode.OK):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, GeneratorExit | StopAsyncIteration):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def refusal_reason(context: Any) -> str | None:
    """The ErrorInfo reason a refusal carries in its trailing metadata, if any."""
    try:
        trailers = context.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a context without trailers: no reason
        return None
    for key, value in trailers:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason or None
    return None


_COUNTS_ITSELF = "__counts_rpcs_itself__"
Behaviour = TypeVar("Behaviour", bound=Callable[..., Any])


def counts_itself(behaviour: Behaviour) -> Behaviour:
    """Mark a method handler's behaviour that feeds the RpcStats of its server itself (the
    metrics wrappers then leave it alone, so that a call is counted once)."""
    setattr(behaviour, _COUNTS_ITSELF, True)
    return behaviour


def _counts_itself(handler: Handler) -> bool:
    return bool(getattr(_behavior(handler), _COUNTS_ITSELF, False))


def _rebuild(handler: Handler, behavior: Callable[..., Any]) -> Any:
    """`handler` with its behaviour replaced; serializers and streaming flags kept."""
    factory = {
        "unary": grpc.unary_unary_rpc_method_handler,
        "server_stream": grpc.unary_stream_rpc_method_handler,
        "client_stream": grpc.stream_unary_rpc_method_handler,
        "bidi_stream": grpc.stream_stream_rpc_method_handler,
    }[rpc_type(handler)]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: Handler) -> Callable[..., Any]:
    kind = rpc_type(handler)
    attr = {
        "unary": "unary_unary",
        "server_stream": "unary_stream",
        "client_stream": "stream_unary",
        "bidi_stream": "stream_stream",
    }[kind]
    behavior: Callable[..., Any] = getattr(handler, attr)
    return behavior


class WrappedHandlers:
    """Each method's wrapped handler, built once and reused while the server hands back the
    same handler object (generic handlers do): a call then costs one dict look-up."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, full_method: str, handler: Handler,
            wrap: Callable[[str, Handler], Handler]) -> Handler:
        cached = self._by_method.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(full_method, handler)
        self._by_method[full_method] = (handler, wrapped)  # a race only builds it twice
        return wrapped


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """For `grpc.server(..., interceptors=[...])`."""

    def __init__(self, stats: RpcStats) -> None:
        self._stats = stats
        self._wrapped = WrappedHandlers()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped.get(handler_call_details.method, handler, self._wrap)

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        if _counts_itself(handler):
            return handler
        return wrap_blocking(self._stats, full_method, handler)


class StatusRecorder:
    """Stands in for a context that cannot tell its status (the one a grpc.aio server gives
    a plain function has no `code()`): notes the code and trailers the handler sets."""

    __slots__ = ("_context", "_code", "_trailers")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None
        self._trailers: tuple[tuple[str, str | bytes], ...] = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailers

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._trailers = tuple(metadata)
        self._context.set_trailing_metadata(metadata)

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
              ) -> Any:
        self._code = code
        if trailing_metadata:
            self._trailers = tuple(trailing_metadata)
        return self._context.abort(code, details, trailing_metadata)

    def abort_with_status(self, status: grpc.Status) -> Any:
        return self.abort(status.code, status.details, status.trailing_metadata)


def _status_aware(context: Any) -> Any:
    return context if hasattr(context, "code") else StatusRecorder(context)


def wrap_blocking(stats: RpcStats, full_method: str, handler: Handler) -> Handler:
    """`handler` counted, for behaviours that run on a thread: plain functions and
    generators (the sync server's, and a grpc.aio server's non-async ones)."""
    record = stats.record_for(full_method, rpc_type(handler))
    behavior = _behavior(handler)
    if handler.response_streaming:
        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            context = _status_aware(context)
            start = stats.started(record)
            try:
                yield from behavior(request, context)
            except BaseException as error:
                stats.finish(record, context, start, error)
                raise
            stats.finish(record, context, start)
        return _rebuild(handler, streaming)  # type: ignore[no-any-return]

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        context = _status_aware(context)
        start = stats.started(record)
        try:
            response = behavior(request, context)
        except BaseException as error:
            stats.finish(record, context, start, error)
            raise
        stats.finish(record, context, start)
        return response
    return _rebuild(handler, unary)  # type: ignore[no-any-return]


class AioServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    """For `grpc.aio.server(interceptors=[...])`."""

    def __init__(self, stats: RpcStats) -> None:
        self._stats = stats
        self._wrapped = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._wrapped.get(handler_call_details.method, handler, self._wrap)

    def wrapped(self, full_method: str, handler: Handler) -> Handler:
        """`handler` wrapped by the metrics (built once per method and handler)."""
        return self._wrapped.get(full_method, handler, self._wrap)

    def _wrap(self, full_method: str, handler: Handler) -> Handler:
        if _counts_itself(handler):
            return handler
        behavior = _behavior(handler)
        stats = self._stats
        if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
            # A plain function stays one, so that the server still runs it on its thread pool.
            return wrap_blocking(stats, full_method, handler)
        record = stats.record_for(full_method, rpc_type(handler))
        if inspect.isasyncgenfunction(behavior):
            async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]
                                ) -> AsyncIterator[Any]:
                start = stats.started(record)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as error:
                    stats.finish(record, context, start, error)
                    raise
                stats.finish(record, context, start)
            return _rebuild(handler, streaming)  # type: ignore[no-any-return]

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = stats.started(record)
            try:
                result = await behavior(request, context)
            except BaseException as error:
                stats.finish(record, context, start, error)
                raise
            stats.finish(record, context, start)
            return result
        return _rebuild(handler, call)  # type: ignore[no-any-return]


class _InstrumentedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose method handlers come back wrapped (once per method)."""

    def __init__(self, inner: grpc.GenericRpcHandler,
                 interceptor: AioServerMetricsInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._interceptor.wrapped(handler_call_details.method, handler)


class InstrumentedServer:
    """A `grpc.aio.Server` as the generated `add_*_to_server` functions see it: the handlers
    they register are wrapped by RpcStats once, here, rather than by an interceptor on every
    call. Pass it where those functions take the server; use the real server for the rest."""

    def __init__(self, server: grpc.aio.Server, stats: RpcStats) -> None:
        self._server = server
        self._interceptor = AioServerMetricsInterceptor(stats)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_InstrumentedGenericHandler(h, self._interceptor) for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, Handler]) -> None:
        wrapped = {method: self._interceptor.wrapped(f"/{service}/{method}", handler)
                   for method, handler in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)
