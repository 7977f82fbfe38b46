"""Registration of the EdgeService with request decoding the server controls.

The generated ``add_EdgeServiceServicer_to_server`` hands grpc the messages' ``FromString`` as request
deserializers; bytes that do not parse then fail inside grpc, which answers UNKNOWN (unary calls) or
INTERNAL (streams) and logs an error: a client's mistake reported as the server's. Here every
deserializer catches the parse error and returns an :class:`Undecodable` marker instead; the wrappers
answer it with INVALID_ARGUMENT (unary calls) or raise :class:`~edge_server.errors.InvalidArgument`
from the request stream, where the servicer's error handling answers it like any bad message.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from edge_server.errors import EdgeError, InvalidArgument, ResourceExhausted
from edge_server.idle_windows import IDLE_WINDOW_S
from protos.coinfer.v1 import coinfer_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE = "coinfer.v1.EdgeService"

__all__ = ["HEALTH_SERVICE", "SERVICE", "Refusal", "Undecodable", "add_edge_service", "add_health_service",
           "health_gate", "lenient_deserializer"]

HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_READS = 2
"""Health calls reading their request at once, server-wide (:func:`health_gate`)."""
HEALTH_FIRST_MESSAGE_S = 5.0
"""A health call's request (a service name of at most 256 characters) within this many seconds, else ended."""
HEALTH_CALLS_PER_HOST = 16
"""Health calls open at once from one peer host (``Watch`` streams included: at most 8 of them, the servicer's)."""
HEALTH_CALLS = 256
"""Health calls open at once over all hosts."""
HEALTH_STRANGER_CONTENDED_S = 0.05
"""Seconds a tokenless caller's health call keeps a reading slot without its request while another caller waits
(a tenant's: 0.25): an honest probe's request comes with its headers and is in grpc's buffers by the time its slot
comes; at 0.25 s the two slots went round 20 hosts' silent calls and 1 s probes timed out 13 of 20 (break26 F2)."""


class Undecodable:
    """A request message whose bytes did not parse (what the deserializer returns instead of raising)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


_RECEIVED: contextvars.ContextVar[int] = contextvars.ContextVar("coinfer_received_bytes", default=0)
"""The size on the wire (bytes) of the last message decoded in this task: grpc calls a method's request deserializer
in the task that reads (the handler's), so the wire handler knows a request's size without serializing it again."""


_GATED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("coinfer_gated_call", default=None)
"""(gate, call) of the call this task handles (set by the gated wrappers): an error answer drops the call's held
request before it is given (:meth:`Refusal.answer`), so the budget never shows a refused call's request after its
answer, nor while the answer waits in the tarpit."""


def hold_next_reads() -> None:
    """Reserve the current gated stream's next-read bytes now (``CallGate.hold_next_reads``; idempotent, nothing
    without a gate): a Session calls it before its session opens, so a tenant at its share of the memory budget is
    refused RESOURCE_EXHAUSTED at open, not answered "opened" then failed at its second read (review23 F6).
    Raises ResourceExhausted."""
    gated = _GATED.get()
    if gated is not None:
        gated[0].hold_next_reads(gated[1])


def lenient_deserializer(cls) -> Callable[[bytes], object]:
    """``cls.FromString`` that returns :class:`Undecodable` instead of raising on bad bytes (and records the
    message's size for the call gate's hold, ``_RECEIVED``)."""
    name = cls.DESCRIPTOR.name

    def deserialize(data: bytes):
        _RECEIVED.set(len(data))
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError, RecursionError on absurd nesting, ...
            return Undecodable(f"undecodable {name} ({len(data)} bytes): {type(e).__name__}")

    return deserialize


async def _checked(it: AsyncIterator, call=None, gate=None, session: bool = False) -> AsyncIterator:
    """``it``'s messages, an undecodable one raised as InvalidArgument. In the call gate, the first message is read
    in one of the caller's reading slots (:meth:`edge_server.calls.CallGate.reading`), held until the handler asks
    for the second (the first processed; the gate's ``leave`` gives it back at the latest): a stream's first message
    (a Session's OpenSession with its slice, an UploadHeader) is as big as a unary request, and session 18's bound
    skipped it (48 Session calls of 4 MiB OpenSessions took +268-332 MiB against +36 MiB for as many Hellos,
    review18 F5); given back once decoded, the decoded OpenSessions waited for the validation slot, as many."""
    if call is not None and call.waiting:
        try:
            await gate.reading(call)
            msg = await anext(it, _END)
            gate.started(call)  # the first message came: the gate's deadline and count of waiting calls end
            gate.server_read_done(call)  # received and decoded: the server-wide slot goes back, the key's stays
            if msg is _END:
                return
            if session:
                call.revocable = False  # an opened Session is ended by its session's own path on revocation
            if isinstance(msg, Undecodable):
                raise InvalidArgument(msg.message)
            try:  # held in the memory budget until the handler asks for the second message (CallGate.hold_request)
                gate.hold_request(call, _RECEIVED.get())
            except ResourceExhausted:
                msg = None  # dropped before the refusal is answered
                raise
            box = [msg]
            msg = None
            yield box.pop()  # this frame keeps no reference while the handler holds it (nor after it dropped it)
        finally:
            gate.read_done(call)
            gate.drop_request(call)
    if call is not None:  # the handler asks for a second message: a read past the first may take in up to the
        gate.hold_next_reads(call)  # message limit before it is whole, held in the budget from now (session 22)
    async for msg in it:
        if isinstance(msg, Undecodable):
            raise InvalidArgument(msg.message)
        yield msg


_END = object()


class Refusal(BaseException):
    """A call's error answer still to give, raised by a unary servicer method's error boundary
    (``edge_server.servicer.rpc_boundary``, which already logged and counted it) for the wire handler to give
    once it dropped the call's request: an answer that waits in the tarpit holds no request (session 16: 250
    failing unary calls of 7 MiB held 3 GiB while they waited). Holds the status, its details (already cut) and
    the tarpit slot to wait for (``tarpit`` None: answer at once)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, tarpit=None, key: str = "") -> None:
        super().__init__(method)
        self.method, self.code, self.details, self.tarpit, self.key = method, code, details, tarpit, key

    async def answer(self, context: grpc.aio.ServicerContext) -> None:
        """Drop the call's held request from the memory budget (``CallGate.drop_request``: the handler that raised
        holds it no more), wait for the tarpit slot, if any, then end the call (raises grpc.aio.AbortError)."""
        gated = _GATED.get()
        if gated is not None:
            gated[0].drop_request(gated[1])
        if self.tarpit is not None:
            await self.tarpit.hold(self.key)
        await context.abort(self.code, self.details)


def _unary(method, abort=None):
    # Registered as a request-streaming handler (on the wire a unary request is a stream of one message) that
    # reads its one message itself: grpc's own unary path keeps the request (and its raw bytes) in its frame until
    # the answer goes, so a refusal that waits in the tarpit held up to the message limit per call.
    name = method.__name__

    async def handler(_request_iterator, context: grpc.aio.ServicerContext, call=None, gate=None):
        if call is None:
            request = await context.read()
        else:
            # the caller's reading slot is held while the request is received and decoded, not while the method
            # runs: held for the whole handler, a tenant's Hellos waited behind its slow ProfileGraphs (review18
            # F9); what a decoded request holds while its method runs is the method's to bound (ProfileGraph
            # reserves its spec's bytes in the memory budget, ``EdgeRuntime.profile``)
            try:
                await gate.reading(call)
                request = await context.read()
            finally:
                gate.read_done(call)
            gate.started(call)
            if request is not grpc.aio.EOF and not isinstance(request, Undecodable):
                # the decoded request is held in the memory budget until the handler ends (CallGate.hold_request);
                # one that does not fit is dropped and refused before the method sees it
                try:
                    gate.hold_request(call, _RECEIVED.get())
                except ResourceExhausted as e:
                    request = None
                    await _refuse(abort, context, e, name)
        if request is grpc.aio.EOF:
            exc: BaseException = InvalidArgument(f"{name}: no request message")
        elif isinstance(request, Undecodable):
            exc = InvalidArgument(request.message)
        else:
            try:
                return await method(request, context)
            except Refusal as r:
                r.__traceback__ = r.__context__ = None  # its frames hold the request
                request = None
                if call is not None:
                    gate.drop_request(call)
                await r.answer(context)
        request = None
        if call is not None:
            gate.drop_request(call)
        await _refuse(abort, context, exc, name)

    return handler


async def _refuse(abort, context: grpc.aio.ServicerContext, exc: BaseException, name: str) -> None:
    if abort is not None:  # the servicer's error boundary (metrics, log line, tarpit); raises
        await abort(context, exc, name)
    code = getattr(exc, "code", "INVALID_ARGUMENT")
    logger.info("%s: %s: %s", name, code, exc)
    await context.abort(grpc.StatusCode[code] if isinstance(code, str) else grpc.StatusCode.INTERNAL, str(exc))


def _stream_unary(method, abort=None):
    async def handler(request_iterator, context: grpc.aio.ServicerContext, call=None, gate=None):
        try:
            return await method(_checked(request_iterator, call, gate), context)
        except Refusal as r:
            r.__traceback__ = r.__context__ = None  # its frames hold the last message read
            await r.answer(context)

    return handler


def _stream_stream(method, abort=None):
    session = method.__name__ == "Session"

    async def handler(request_iterator, context: grpc.aio.ServicerContext, call=None, gate=None):
        async for msg in method(_checked(request_iterator, call, gate, session), context):
            yield msg

    return handler


class _Ended:
    """The gate's hold on a call for the block of its handler: on leaving the block the call leaves the gate, and a
    cancellation the gate caused (:meth:`edge_server.call_state.Call.end`: the call's task cancelled with a reason) is
    taken back and kept in ``exc``, the status to answer after the block; the client's own cancellation (grpc
    cancels the handler's task when the call ends) and every other exception go on. One for the unary and the
    streaming wrappers (session 17 had the block twice)."""

    __slots__ = ("call", "exc", "gate")

    def __init__(self, call, gate) -> None:
        self.call, self.gate = call, gate
        self.exc: BaseException | None = None

    def __enter__(self) -> _Ended:
        return self

    def __exit__(self, et, e, tb) -> bool:
        self.gate.leave(self.call)
        if et is None or not issubclass(et, asyncio.CancelledError) or self.call.reason is None:
            return False
        asyncio.current_task().uncancel()
        self.exc = self.call.reason
        return True


async def _answer_now(context: grpc.aio.ServicerContext, exc: BaseException, name: str, gate) -> None:
    """End a call the gate refused or ended: one INFO line, counted, answered at once (never in the tarpit: a call
    waiting there would be one more open call). Raises grpc.aio.AbortError."""
    code = getattr(exc, "code", "INVALID_ARGUMENT")
    gate.answered_now += 1
    n = gate.answered_now
    # the first, then one line per 1000 (the rest at DEBUG; the metrics count each): a line per refused call was
    # 0.5 MB of log a second under one host's flood of the health port (break27 F4)
    logger.log(logging.INFO if n == 1 or n % 1000 == 0 else logging.DEBUG, "%s: %s: %s (%d refused or ended so far)",
               name, code, exc, n)
    if gate.on_refused is not None:
        gate.on_refused(name, code)
    await context.abort(grpc.StatusCode[code], str(exc))


async def _admitted(context: grpc.aio.ServicerContext, name: str, gate, admit):
    """The call registered in the gate by ``admit``, or its refusal answered at once (raises AbortError)."""
    try:
        return admit(context, name)
    except EdgeError as e:
        exc: BaseException = e
    await _answer_now(context, exc, name, gate)


def _gate_unary(handler, name: str, gates):
    """``handler`` (of :func:`_unary` / :func:`_stream_unary`) inside the call gate (``edge_server.calls``):
    ``gates()`` -> (gate, admit) or None (no gate)."""

    async def gated(request_iterator, context: grpc.aio.ServicerContext):
        g = gates()
        if g is None:
            return await handler(request_iterator, context)
        gate, admit = g
        ended = _Ended(await _admitted(context, name, gate, admit), gate)
        _GATED.set((gate, ended.call))
        with ended:
            return await handler(request_iterator, context, ended.call, gate)
        await _answer_now(context, ended.exc, name, gate)

    return gated


def _gate_stream(handler, name: str, gates):
    """As :func:`_gate_unary` for a response-streaming handler (an async generator)."""

    async def gated(request_iterator, context: grpc.aio.ServicerContext):
        g = gates()
        if g is None:
            async for msg in handler(request_iterator, context):
                yield msg
            return
        gate, admit = g
        ended = _Ended(await _admitted(context, name, gate, admit), gate)
        _GATED.set((gate, ended.call))
        with ended:
            async for msg in handler(request_iterator, context, ended.call, gate):
                yield msg
            return
        await _answer_now(context, ended.exc, name, gate)

    return gated


def add_edge_service(servicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (an ``EdgeServiceServicer``) on ``server`` with lenient request decoding.
    An undecodable unary request is answered through ``servicer.abort(context, exc, method)`` when the
    servicer has one (``EdgeServicer``: the one error boundary), else with INVALID_ARGUMENT here.
    Every call passes ``servicer.gates()`` when it has one (``EdgeServicer``: the runtime's
    ``edge_server.calls.CallGate`` and its admission): calls open per caller bounded, a deadline on the first
    message, revoked tokens' calls ended."""
    gates = getattr(servicer, "gates", lambda: None)
    su, ss = (
        grpc.stream_unary_rpc_method_handler,
        grpc.stream_stream_rpc_method_handler,
    )
    table = {
        "Hello": (su, _unary, pb.HelloRequest, pb.HelloResponse),
        "ProfileGraph": (su, _unary, pb.ProfileGraphRequest, pb.ProfileGraphResponse),
        "QueryWeights": (su, _unary, pb.QueryWeightsRequest, pb.QueryWeightsResponse),
        "Stats": (su, _unary, pb.StatsRequest, pb.StatsResponse),
        "UploadWeights": (su, _stream_unary, pb.UploadWeightsRequest, pb.UploadWeightsResponse),
        "Session": (ss, _stream_stream, pb.SessionRequest, pb.SessionResponse),
    }
    handlers = {
        name: make(
            (_gate_stream if make is ss else _gate_unary)(
                wrap(getattr(servicer, name), getattr(servicer, "abort", None)), name, gates
            ),
            request_deserializer=lenient_deserializer(req),
            response_serializer=resp.SerializeToString,
        )
        for name, (make, wrap, req, resp) in table.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def health_gate(memory=None, window_bytes: int = 0, on_refused=None):
    """A call gate of its own for the standard health service, which needs no token (probes and load balancers):
    keys are peer hosts, at most :data:`HEALTH_CALLS_PER_HOST` calls open per host and :data:`HEALTH_CALLS` over
    all (at that cap a host holding fewer ends the oldest call of the host holding most: ``CallGate(take_calls=)``,
    session 27, break26 Q4), :data:`HEALTH_READS` reading their request at once server-wide (shared by host as the
    EdgeService's reading slots, a silent holder's slot taken back after :data:`HEALTH_STRANGER_CONTENDED_S` (a
    tenant's: 0.25 s), 0.2 s over its host's share, while another host waits), the request within
    :data:`HEALTH_FIRST_MESSAGE_S`, each call's receive window beyond 64 KiB
    (``window_bytes``) reserved in ``memory`` for its host: the server passes its
    ``edge_server.health_admission.HealthAdmission``, which holds a stranger's (with tokens, a caller without a valid
    one) in the health service's own budget, never in the pool the strangers' refused EdgeService calls share
    (``MemoryBudget.pool``; session 25: that pool full, a tokenless prober's Checks were RESOURCE_EXHAUSTED). A call
    whose window does not fit takes the window of a call only holding its own, which is ended UNAVAILABLE
    (``edge_server.idle_windows``, session 26: five silent calls from a host, reopened as they ended, had every probe
    from that host refused, and five hosts every host's; one silent call on each of more hosts than the budget has
    windows still does: ``edge_server.health_listener`` is the probers' way out).

    Why (session 22): grpc read a health call's request itself, from the call's start and with no bound on how many:
    the pending read let a client without a token send all but the last byte of a message of the 8 MiB limit per
    call (16 Check calls: RSS +129 MiB, nothing reserved, no limit on the count). Now at most ``HEALTH_READS`` such
    messages are in grpc's buffers at once (16 MiB)."""
    from edge_server.calls import CallGate

    gate = CallGate(max_calls=HEALTH_CALLS_PER_HOST, max_waiting=HEALTH_CALLS_PER_HOST,
                    first_message_s=HEALTH_FIRST_MESSAGE_S, on_refused=on_refused, max_peer_calls=HEALTH_CALLS,
                    memory=memory, server_reading=HEALTH_READS, reading_grace_s=0.2, contended_s=0.25,
                    stranger_contended_s=HEALTH_STRANGER_CONTENDED_S, idle_window_s=IDLE_WINDOW_S, take_calls=True)
    gate.window_bytes = window_bytes
    return gate


def _half_closed(watch):
    """``Watch`` (the health servicer's) that first waits for its client to close the request stream, then gives back
    the call's receive window: nothing more can arrive, and a stream open for hours held a window for its life (break25
    F1, session 25: 8 Watch streams from each of 4 addresses, each host's cap, held the health service's whole budget,
    32 windows, and every tokenless probe's Check was RESOURCE_EXHAUSTED, 158 of 158 in 40 s). An honest client closes
    its side with its one request (a unary request); one that does not within ``HEALTH_FIRST_MESSAGE_S``, or sends a
    second message, is INVALID_ARGUMENT."""

    async def Watch(request, context: grpc.aio.ServicerContext):
        try:
            more = await asyncio.wait_for(context.read(), HEALTH_FIRST_MESSAGE_S)
        except TimeoutError:
            more = None
        if more is not grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "Watch takes one request, then the client closes its side"
                                if more is not None else
                                f"Watch: the request stream was not closed within {HEALTH_FIRST_MESSAGE_S:g} s")
        gated = _GATED.get()
        if gated is not None:
            call = gated[1]
            if call is not None and call.window is not None:
                call.window.release()
                call.window = None
        return await watch(request, context)

    return Watch


def add_health_service(servicer, server: grpc.aio.Server, gate=None, auth=None, admission=None) -> None:
    """Register ``servicer`` (a ``grpc_health`` asyncio ``HealthServicer``) on ``server``, its two methods reading
    their one request themselves inside ``gate`` (:func:`health_gate`; None: read as grpc would, unbounded), with
    lenient decoding (an undecodable request is INVALID_ARGUMENT). ``Watch`` answers with ``context.write``.
    ``admission`` (``edge_server.health_admission.HealthAdmission``; None: none): each call first waits for its
    caller's slot (:meth:`~edge_server.health_admission.HealthAdmission.pace`: a stranger's host past its burst of
    health calls), before its request is read.

    The service needs no token, but a call that carries a valid one (``auth``: the server's ``Authenticator``) is
    its tenant's (``tenant:NAME``: its window counts in the tenant's share of the memory budget), not its address's:
    a UE pings the server on its channel (connecting, its round-trip watch, a late request's liveness check), and
    keyed by address those pings sat in the pool all tokenless callers share, so one stranger's address filling the
    pool left a tenant's client unable to reach the server (session 23's tester: every request fell back)."""
    from grpc_health.v1 import health_pb2

    from edge_server.auth import authorization_of
    from edge_server.tarpit import caller_key

    def key_of(context) -> str:
        who = None if auth is None else auth.authenticate(authorization_of(context.invocation_metadata()))
        return caller_key(None if who is None else who.tenant, context.peer())

    def gates():
        if gate is None:
            return None
        return gate, lambda context, name: gate.enter(key_of(context), "", "", name)

    def paced(handler):
        if admission is None:
            return handler

        async def wait_then(request_iterator, context: grpc.aio.ServicerContext, call=None, g=None):
            # before the request is read: a call waiting for its slot holds no reading slot, only its place among
            # its host's calls (and its window), and its first message's deadline runs; a call waiting here is its
            # host's flood past its burst, and its window may be taken from then (``idle_windows.idle_since``)
            if call is None:
                await admission.pace(key_of(context))
            else:
                call.paced_since = asyncio.get_running_loop().time()
                try:
                    await admission.pace(call.key)
                finally:
                    call.paced_since = 0.0
            return await handler(request_iterator, context, call, g)

        return wait_then

    handlers = {
        "Check": grpc.stream_unary_rpc_method_handler(
            _gate_unary(paced(_unary(servicer.Check)), "Check", gates),
            request_deserializer=lenient_deserializer(health_pb2.HealthCheckRequest),
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
        "Watch": grpc.stream_stream_rpc_method_handler(
            _gate_unary(paced(_unary(_half_closed(servicer.Watch))), "Watch", gates),
            request_deserializer=lenient_deserializer(health_pb2.HealthCheckRequest),
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, handlers),))
    server.add_registered_method_handlers(HEALTH_SERVICE, handlers)
