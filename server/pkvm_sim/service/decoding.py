"""Registering HypervisorService with request parsers that never raise.

gRPC's own handling of a request body that is not the method's protobuf message answers
UNKNOWN and logs a traceback per call, so one client sending garbage in a loop writes
gigabytes of log. Here each method's parser returns an `Undecodable` instead of raising; the
handler answers INVALID_ARGUMENT (reason `UNDECODABLE_REQUEST`) without touching anything
(`HypervisorServicer.unary_handler`), and one log line at most every `LOG_INTERVAL_SECONDS`
says how many such requests came. An Execute stream reads its batches itself and ends with
the same status (`HypervisorServicer._serve_stream`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from pkvm.v1 import hypervisor_pb2 as pb2

from .errors import ServiceError

if TYPE_CHECKING:
    from .servicer import HypervisorServicer

log = logging.getLogger(__name__)

LOG_INTERVAL_SECONDS = 60.0
REASON = "UNDECODABLE_REQUEST"
SERVICE = pb2.DESCRIPTOR.services_by_name["HypervisorService"]


class Undecodable:
    """A request body that is not a `type_name` message (what the handler gets instead)."""

    def __init__(self, type_name: str, size_bytes: int) -> None:
        self.type_name = type_name
        self.size_bytes = size_bytes

    def refusal(self) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, REASON,
                            f"the request body ({self.size_bytes} bytes) is not a valid"
                            f" {self.type_name} message")


class RateLimitedLog:
    """At most one warning per `interval` seconds, counting the events in between."""

    def __init__(self, interval: float = LOG_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()  # parsers run on gRPC's threads as well as the loop
        self._next = 0.0
        self._unlogged = 0

    def event(self, type_name: str, size_bytes: int) -> None:
        with self._lock:
            self._unlogged += 1
            now = self.clock()
            if now < self._next:
                return
            count, self._unlogged, self._next = self._unlogged, 0, now + self.interval
        log.warning("%d undecodable request(s) refused with INVALID_ARGUMENT (last: %d bytes"
                    " for %s); next report in %g s at the earliest", count, size_bytes,
                    type_name, self.interval)


UNDECODABLE_LOG = RateLimitedLog()


def tolerant_parser(message_class: type[Message]) -> Callable[[bytes], Any]:
    type_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError):  # RuntimeError: recursion too deep
            UNDECODABLE_LOG.event(type_name, len(data))
            return Undecodable(type_name, len(data))

    return parse


def add_servicer(servicer: HypervisorServicer, server: grpc.aio.Server) -> None:
    """What the generated add_HypervisorServiceServicer_to_server does, with tolerant
    parsers: one handler per method of the service descriptor."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        parse = tolerant_parser(GetMessageClass(method.input_type))
        serialize = GetMessageClass(method.output_type).SerializeToString
        behaviour = getattr(servicer, method.name)
        if method.client_streaming or method.server_streaming:
            if not (method.client_streaming and method.server_streaming):
                raise NotImplementedError(f"{method.name}: only bidi streams are served")
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request_deserializer=parse, response_serializer=serialize)
        else:
            # The servicer's unary handler answers an Undecodable itself
            # (HypervisorServicer.unary_handler).
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
