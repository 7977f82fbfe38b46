"""The authentication gate: a gRPC server interceptor that refuses calls without a known bearer token
with UNAUTHENTICATED before any handler runs (the standard health service is exempt). A caller that
keeps sending them gets its refusals late (``edge_server.tarpit``, keyed by its address)."""

from __future__ import annotations

import asyncio
import logging

import grpc

from edge_server.auth import Authenticator, authorization_of, remember_caller
from edge_server.calls import CallGate
from edge_server.errors import EdgeError
from edge_server.tarpit import Tarpit, caller_key

logger = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _denied(
    handler: grpc.RpcMethodHandler, message: str, tarpit: Tarpit | None = None, gate: CallGate | None = None
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only answers UNAUTHENTICATED (after the caller's
    tarpit slot, when ``tarpit`` is given). With a ``gate`` (``edge_server.calls``) the refusals waiting in the
    tarpit count among the address's open calls; one over its bound is answered at once (session 17: nothing
    bounded how many a stranger's address kept waiting, ~22 KB each)."""

    async def deny(request_iterator, context: grpc.aio.ServicerContext):
        key = caller_key(None, context.peer())
        call = None
        if gate is not None:
            try:
                call = gate.enter(key, method="denied")
            except EdgeError:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)  # at once: no wait, nothing held
            gate.started(call)  # refused already: no first message is awaited
        try:
            if tarpit is not None:
                # drained only while grpc's windows are its own (BDP probing on): with reads bounded (a fixed window,
                # ``CallGate.next_read_bytes``) an unread refusal holds at most its window, reserved at ``enter``,
                # while a pending read lets its client send all but the last byte of a message of the 8 MiB limit
                # (session 22: 40 tarpitted refusals without a token took 8 MiB each, RSS +266 MiB)
                drain = (asyncio.ensure_future(_drain(request_iterator))
                         if gate is None or gate.next_read_bytes <= 0 else None)
                try:
                    await tarpit.hold(key)
                finally:
                    if drain is not None:
                        drain.cancel()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        finally:
            if call is not None:
                gate.leave(call)

    # A request-streaming handler whatever the method's kind (on the wire a unary request is a stream of one
    # message): grpc then reads no message before the handler runs, and the refusal never reads one. A unary
    # handler's request is read and decoded first and kept by grpc's own frame while the answer waits in the
    # tarpit: 250 unary calls of 7 MiB from a stranger without a token took the server from 361 to 2006 MiB RSS
    # under --memory-mb 1024 (session 16, tests/test_attack16.py). Unread, a call holds at most what HTTP/2 flow
    # control lets its client send ahead.
    kw = {"request_deserializer": _never_decoded, "response_serializer": handler.response_serializer}
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kw)
    return grpc.stream_unary_rpc_method_handler(deny, **kw)


async def _drain(request_iterator) -> None:
    """Read and drop the refused call's messages while its answer waits (each is decoded to None)."""
    async for _ in request_iterator:
        pass


def _never_decoded(data: bytes) -> None:
    """The refusal's request deserializer: it reads no message, so this only runs if grpc reads one anyway."""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Let a call through only with ``authorization: Bearer <token>`` of a tenant in the tokens file."""

    def __init__(
        self, auth: Authenticator, metrics=None, tarpit: Tarpit | None = None, gate: CallGate | None = None
    ) -> None:
        self.auth = auth
        self.gate = gate
        """Bounds the refusals waiting in the tarpit per address (optional; ``edge_server.calls``)."""
        self.metrics = metrics
        """``edge_server.metrics.ServerMetrics`` to count refusals in (optional)."""
        self.tarpit = tarpit
        """Delays the refusals of an address that keeps sending bad tokens (optional)."""

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        value = authorization_of(handler_call_details.invocation_metadata)
        found = self.auth.identify(value)
        if found is not None:
            remember_caller(*found)  # the gate and the servicer read it: the token is hashed once per call
            return handler
        why = "missing bearer token" if value is None else "unknown or malformed bearer token"
        name = method.rsplit("/", 1)[-1]
        logger.info("%s: UNAUTHENTICATED: %s", name, why)
        if self.metrics is not None:
            self.metrics.rpc_error(name, "UNAUTHENTICATED")
        return _denied(handler, f"{why}: send 'authorization: Bearer <token>' call metadata", self.tarpit, self.gate)
