"""Registration of the EdgeService with request decoding the server controls.

The generated ``add_EdgeServiceServicer_to_server`` hands grpc the messages' ``FromString`` as request
deserializers; bytes that do not parse then fail inside grpc, which answers UNKNOWN (unary calls) or
INTERNAL (streams) and logs an error: a client's mistake reported as the server's. Here every
deserializer catches the parse error and returns an :class:`Undecodable` marker instead; the wrappers
answer it with INVALID_ARGUMENT (unary calls) or raise :class:`~edge_server.errors.InvalidArgument`
from the request stream, where the servicer's error handling answers it like any bad message.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc

from edge_server.errors import InvalidArgument
from protos.coinfer.v1 import coinfer_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "coinfer.v1.EdgeService"

__all__ = ["SERVICE", "Undecodable", "add_edge_service", "lenient_deserializer"]


class Undecodable:
    """A request message whose bytes did not parse (what the deserializer returns instead of raising)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def lenient_deserializer(cls) -> Callable[[bytes], object]:
    """``cls.FromString`` that returns :class:`Undecodable` instead of raising on bad bytes."""
    name = cls.DESCRIPTOR.name

    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError, RecursionError on absurd nesting, ...
            return Undecodable(f"undecodable {name} ({len(data)} bytes): {type(e).__name__}")

    return deserialize


async def _checked(it: AsyncIterator) -> AsyncIterator:
    async for msg in it:
        if isinstance(msg, Undecodable):
            raise InvalidArgument(msg.message)
        yield msg


def _unary(method, abort=None):
    async def handler(request, context: grpc.aio.ServicerContext):
        if isinstance(request, Undecodable):
            if abort is not None:  # the servicer's error boundary (metrics, log line, tarpit); raises
                await abort(context, InvalidArgument(request.message), method.__name__)
            else:
                logger.info("%s: INVALID_ARGUMENT: %s", method.__name__, request.message)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def _stream_unary(method, abort=None):
    async def handler(request_iterator, context: grpc.aio.ServicerContext):
        return await method(_checked(request_iterator), context)

    return handler


def _stream_stream(method, abort=None):
    async def handler(request_iterator, context: grpc.aio.ServicerContext):
        async for msg in method(_checked(request_iterator), context):
            yield msg

    return handler


def add_edge_service(servicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (an ``EdgeServiceServicer``) on ``server`` with lenient request decoding.
    An undecodable unary request is answered through ``servicer.abort(context, exc, method)`` when the
    servicer has one (``EdgeServicer``: the one error boundary), else with INVALID_ARGUMENT here."""
    uu, su, ss = (
        grpc.unary_unary_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
        grpc.stream_stream_rpc_method_handler,
    )
    table = {
        "Hello": (uu, _unary, pb.HelloRequest, pb.HelloResponse),
        "ProfileGraph": (uu, _unary, pb.ProfileGraphRequest, pb.ProfileGraphResponse),
        "QueryWeights": (uu, _unary, pb.QueryWeightsRequest, pb.QueryWeightsResponse),
        "Stats": (uu, _unary, pb.StatsRequest, pb.StatsResponse),
        "UploadWeights": (su, _stream_unary, pb.UploadWeightsRequest, pb.UploadWeightsResponse),
        "Session": (ss, _stream_stream, pb.SessionRequest, pb.SessionResponse),
    }
    handlers = {
        name: make(
            wrap(getattr(servicer, name), getattr(servicer, "abort", None)),
            request_deserializer=lenient_deserializer(req),
            response_serializer=resp.SerializeToString,
        )
        for name, (make, wrap, req, resp) in table.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
