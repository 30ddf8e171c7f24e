"""Authenticate before parsing: the `pijax.v1.Inference` handlers over raw request bytes.

gRPC would parse each request message before any servicer code runs, so a caller without
credentials could make the server decode anything it sends, and an undecodable message (invalid
UTF-8 in a string field, a truncated field, random bytes) ended as UNKNOWN with a traceback in
the log. Here every method is registered with no deserializer: its handler first authenticates
the call from its metadata (UNAUTHENTICATED otherwise, before a byte of the message is read),
then parses the message itself; a message that does not parse is answered INVALID_ARGUMENT,
counted in `pijax:rpc_malformed_messages` by method, and logged at most once a minute as one
line with a counter (never a traceback, never the bytes).

The message size is bounded before this by the server's `max_receive_message_length`.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from pijax.serving.proto.pijax.v1 import inference_pb2 as pb
from pijax.serving.validation import RequestError

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"]


class RateLimitedLog:
    """One warning line per `interval_s` at most, with how many events it stands for."""

    def __init__(self, what: str, interval_s: float = 60.0, clock=time.monotonic):
        self.what = what
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending = 0
        self._last: float | None = None
        self.total = 0
        self.lines = 0

    def note(self, detail: str) -> None:
        with self._lock:
            self.total += 1
            self._pending += 1
            now = self._clock()
            if self._last is not None and now - self._last < self.interval_s:
                return
            n, self._pending, self._last = self._pending, 0, now
            self.lines += 1
        log.warning(
            "%d %s since the last report (total %d; latest: %s)", n, self.what, self.total, detail
        )


def guarded_handler(servicer, metrics) -> grpc.GenericRpcHandler:
    """The service's handlers: authenticate (metadata only), parse, then call the servicer."""
    malformed_log = RateLimitedLog("undecodable request messages")
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        fn = getattr(servicer, method.name)
        make = _streaming if method.server_streaming else _unary
        handler = make(method.name, request_cls, fn, servicer, metrics, malformed_log)
        wrap = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = wrap(
            handler,
            request_deserializer=None,  # raw bytes: we parse after authenticating
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)


def _admit(name, request_cls, raw: bytes, context, servicer, metrics, malformed_log):
    """The parsed request, or a `RequestError` (UNAUTHENTICATED before parsing)."""
    servicer.authenticate(context)
    try:
        return request_cls.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        metrics.count_malformed(name)
        malformed_log.note(f"{name}, {len(raw)} bytes")
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request message could not be parsed as {request_cls.DESCRIPTOR.full_name} "
            "(invalid UTF-8 in a string field, a truncated field, or not protobuf)",
        ) from None


def _unary(name, request_cls, fn, servicer, metrics, malformed_log):
    async def handler(raw, context):
        try:
            request = _admit(name, request_cls, raw, context, servicer, metrics, malformed_log)
        except RequestError as e:
            metrics.count_rpc(name, e.code.name)
            await context.abort(e.code, e.message)
        return await fn(request, context)

    return handler


def _streaming(name, request_cls, fn, servicer, metrics, malformed_log):
    async def handler(raw, context):
        try:
            request = _admit(name, request_cls, raw, context, servicer, metrics, malformed_log)
        except RequestError as e:
            metrics.count_rpc(name, e.code.name)
            await context.abort(e.code, e.message)
        async for item in fn(request, context):
            yield item

    return handler
