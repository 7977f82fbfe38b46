"""Thin gRPC servicer (TGI style): each RPC decodes, calls one domain method of :class:`EdgeRuntime`
(or of the session it opened), and encodes the answer.

Errors have one boundary, :func:`rpc_boundary`: a domain error (:class:`edge_server.errors.EdgeError`)
carries the status to answer with and is a client mistake (one INFO line); anything else is a bug:
logged with its traceback and answered INTERNAL. The server keeps serving either way. A caller whose
calls keep failing gets its error answers late (``edge_server.tarpit``): a flood of bad calls slows
itself.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc

from edge_server import events as ev
from edge_server.auth import Principal, authorization_of, remembered_caller
from edge_server.errors import DeadlineExceeded, EdgeError, InvalidArgument
from edge_server.precision import matmul_precision
from edge_server.profile_intake import decode_profile, decode_profile_async
from edge_server.runtime import EdgeRuntime, HelloInfo
from edge_server.server_stats import ServerStats
from edge_server.session import Inbound
from edge_server.tarpit import CLIENT_ERRORS, caller_key
from edge_server.tensor_codec import CodecError, decode_tensor_chunk, decode_weight_chunk, encode_tensor_chunks
from edge_server.wire import Refusal, hold_next_reads
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc
from protos.values import ServerTimings, status_value

logger = logging.getLogger(__name__)

MAX_DETAILS = 2000
"""Longest status message sent (characters)."""


# ------------------------------------------------------------------------------------------------------
# the error boundary


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a failed call answers with: the domain error's own code, else INTERNAL."""
    if isinstance(exc, EdgeError):
        return grpc.StatusCode[exc.code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


async def abort(
    context: grpc.aio.ServicerContext, exc: BaseException, method: str, metrics=None, tarpit=None, auth=None
) -> None:
    """End the call with :func:`status_of`'s status: count it (``metrics``), log it (a client mistake: one
    INFO line; a bug: ERROR with its traceback) and, for a client error (``edge_server.tarpit.CLIENT_ERRORS``)
    with a ``tarpit``, first wait for the caller's slot (keyed by the tenant of its bearer token when
    ``auth`` knows it, else by its address). Raises grpc.aio.AbortError (how grpc.aio ends a call)."""
    r = refusal(context, exc, method, metrics, tarpit, auth)
    # the traceback's frames may hold the call's messages (up to the message limit each): not while waiting
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    del exc
    await r.answer(context)


def refusal(
    context: grpc.aio.ServicerContext, exc: BaseException, method: str, metrics=None, tarpit=None, auth=None
) -> Refusal:
    """Count and log ``exc`` as :func:`abort` does and return the answer still to give (its status, its
    details cut to ``MAX_DETAILS``, and the tarpit slot to wait for, if any): it holds nothing of the call."""
    code, msg = status_of(exc)
    if metrics is not None:
        metrics.rpc_error(method, code.name)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed", method, exc_info=exc)
    else:
        logger.info("%s: %s: %s", method, code.name, msg[:MAX_DETAILS])
    hold = tarpit is not None and code.name in CLIENT_ERRORS
    return Refusal(method, code, msg[:MAX_DETAILS], tarpit if hold else None, call_key(context, auth) if hold else "")


def call_key(context: grpc.aio.ServicerContext, auth=None) -> str:
    """The tarpit key of a call (``edge_server.tarpit.caller_key``): its token's tenant if ``auth``
    (an ``edge_server.auth.Authenticator``) knows the token, else its peer address."""
    who = None
    if auth is not None:
        found = remembered_caller()
        who = found[0] if found is not None else auth.authenticate(authorization_of(context.invocation_metadata()))
    return caller_key(who.tenant if who is not None else None, context.peer())


def rpc_boundary(method):
    """Decorate a servicer method (coroutine or async generator): an exception it raises ends the call
    with :func:`status_of`'s status (client mistakes: one INFO line; bugs: ERROR with traceback)."""
    name = method.__name__
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self, request, context):
            try:
                async for out in method(self, request, context):
                    yield out
                return
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                r = self.refusal(context, e, name)
                e.__traceback__ = e.__context__ = e.__cause__ = None  # its frames may hold the last messages
            await r.answer(context)  # out of the except block: the exception (and its text) is gone

        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            # answered by the wire handler (``edge_server.wire``) once it dropped the request: an answer that
            # waits in the tarpit holds no request
            raise self.refusal(context, e, name) from None

    return unary


# ------------------------------------------------------------------------------------------------------
# decoders


def decode_weight_chunks(msg: pb.WeightChunks, max_chunk_bytes: int, max_chunks: int) -> ev.WeightPieces:
    """``SessionRequest.weights`` -> its validated pieces, in order.

    Raises InvalidArgument for no chunk, more than ``max_chunks``, more than ``max_chunk_bytes`` of data
    in all, or any chunk that ``decode_weight_chunk`` refuses.
    """
    n = len(msg.chunks)
    if not 0 < n <= max_chunks:
        raise InvalidArgument(f"WeightChunks with {n} chunks (1..max_chunks_per_message={max_chunks})")
    size = sum(len(c.data) for c in msg.chunks)
    if size > max_chunk_bytes:
        raise InvalidArgument(f"WeightChunks with {size} bytes of data exceeds max_chunk_bytes={max_chunk_bytes}")
    return ev.WeightPieces([decode_weight_chunk(c, max_chunk_bytes) for c in msg.chunks])


def decode_begin_request(b: pb.BeginRequest, max_chunk_bytes: int, max_inputs: int) -> ev.BeginRequest:
    """``SessionRequest.begin_request`` -> :class:`~edge_server.events.BeginRequest`, its inline cut tensors
    (``inputs``) decoded as TensorChunks are (``decode_tensor_chunk``: name, dtype, shape, size and bounds).

    Never raises for the inline tensors: one that is malformed, whose ``request_id`` is neither 0 nor the
    request's, more than ``max_inputs`` of them (``ServerConfig.max_chunks_per_message``, announced as
    ``Limits.max_chunks_per_message``; checked before any is read), or inline data over ``max_chunk_bytes``
    in all becomes ``input_error`` (InvalidArgument), which fails this request only, as a bad TensorChunk
    would. The count bound keeps the decode's work per message bounded: without it one 8 MiB BeginRequest
    held ~350k empty chunks, ~2.5 s of the event loop (every session's) to decode.
    """
    begin = ev.BeginRequest(b.request_id, b.slice_id, b.input_names, op_timings=b.op_timings)  # names: not copied
    try:  # only the three values torch takes; "" (an older client): "highest" (break38 F2)
        begin.matmul_precision = matmul_precision(b.matmul_precision)
    except ValueError as e:  # fails this request only (as a malformed inline tensor does)
        begin.input_error = InvalidArgument(f"request {b.request_id}: {e}")
        return begin
    if not b.inputs:
        return begin
    rid = b.request_id
    try:
        if len(b.inputs) > max_inputs:
            raise CodecError(
                f"request {rid}: {len(b.inputs)} cut tensors in BeginRequest; at most {max_inputs} "
                "(Limits.max_chunks_per_message), the rest as TensorChunks"
            )
        size = sum(len(c.data) for c in b.inputs)
        if size > max_chunk_bytes:
            raise CodecError(
                f"request {rid}: {size} bytes of cut tensors in BeginRequest exceed max_chunk_bytes={max_chunk_bytes}"
            )
        for c in b.inputs:
            if c.request_id not in (0, rid):
                raise CodecError(f"request {rid}: an inline cut tensor names request {c.request_id}")
            piece = decode_tensor_chunk(c, max_chunk_bytes)
            begin.inputs.append(replace(piece, request_id=rid) if piece.request_id != rid else piece)
    except EdgeError as e:
        begin.inputs.clear()
        begin.input_error = e
    return begin


def decode_session_request(
    msg: pb.SessionRequest, max_chunk_bytes: int, max_chunks: int = 1, max_cost_graph_ops: int = 0
) -> Inbound:
    """One client message after OpenSession -> a piece or command for :meth:`Session.receive`.

    ``max_chunks``: chunks a ``weights`` message may pack, and cut tensors a ``begin_request`` may carry
    inline (``ServerConfig.max_chunks_per_message``);
    ``max_cost_graph_ops``: ``ServerConfig.max_cost_graph_ops`` (a profile update is decoded here on the
    calling thread, uncharged; the Session stream decodes it with ``decode_profile_async`` instead).
    Raises InvalidArgument for a message that makes the stream untrustworthy (malformed weight chunk,
    a second OpenSession, an empty message); a malformed TensorChunk becomes BadTensorChunk (it fails
    its request only).
    """
    kind = msg.WhichOneof("msg")
    if kind == "weight":
        return decode_weight_chunk(msg.weight, max_chunk_bytes)
    if kind == "weights":
        return decode_weight_chunks(msg.weights, max_chunk_bytes, max_chunks)
    if kind == "tensor":
        try:
            return decode_tensor_chunk(msg.tensor, max_chunk_bytes)
        except EdgeError as e:
            return ev.BadTensorChunk(msg.tensor.request_id, len(msg.tensor.data), e)
    if kind == "begin_request":
        return decode_begin_request(msg.begin_request, max_chunk_bytes, max_chunks)
    if kind == "define_slice":
        return ev.DefineSlice(msg.define_slice.slice_id, msg.define_slice.slice_spec_json)
    if kind == "cancel_request":
        return ev.CancelRequest(msg.cancel_request.request_id)
    if kind == "profile":  # (the servicer's Session decodes it off the loop: decode_profile_async)
        return ev.UpdateProfile(decode_profile(msg.profile, update=True, max_ops=max_cost_graph_ops))
    if kind == "close":
        return ev.CloseSession()
    if kind == "open":
        raise InvalidArgument("OpenSession may only be the first message")
    raise InvalidArgument("empty SessionRequest")


# ------------------------------------------------------------------------------------------------------
# encoders


def limits_pb(info: HelloInfo) -> pb.Limits:
    c = info.config
    return pb.Limits(
        max_chunk_bytes=c.max_chunk_bytes,
        max_chunks_per_message=c.max_chunks_per_message,
        profile_updates=True,
        preferred_chunk_bytes=c.preferred_chunk_bytes,
        max_message_bytes=c.max_message_bytes,
        cache_bytes=c.cache_bytes,
        staging_bytes=c.staging_bytes,
        max_sessions=c.max_sessions,
        max_ops=info.max_ops,
        data_port=info.data_port,
        max_cost_graph_ops=c.max_cost_graph_ops,
        inline_tensors=True,
        progress_interval_ms=round(c.progress_interval_ms),
    )


def hello_pb(info: HelloInfo) -> pb.HelloResponse:
    return pb.HelloResponse(
        server_version=info.server_version,
        protocol=info.protocol,
        device=info.device,
        device_name=info.device_name,
        torch_version=info.torch_version,
        threads=info.threads,
        allowed_ops=info.allowed_ops,
        allowed_ops_hash=info.allowed_ops_hash,
        limits=limits_pb(info),
        active_sessions=info.active_sessions,
        share=info.share,
        instance_id=info.instance_id,
    )


def stats_pb(s: ServerStats) -> pb.StatsResponse:
    st = s.store
    out = pb.StatsResponse(
        store=pb.StoreStats(
            bytes_used=st.bytes_used,
            capacity_bytes=st.capacity_bytes,
            staging_bytes=st.staging_bytes,
            entries=st.entries,
            blobs=st.blobs,
            hits=st.hits,
            misses=st.misses,
            evictions=st.evictions,
            commits=st.commits,
            rejected=st.rejected,
            pinned_bytes=st.pinned_bytes,
        ),
        active_sessions=s.active_sessions,
        sessions_opened=s.sessions_opened,
        requests_done=s.requests_done,
        requests_failed=s.requests_failed,
        profile_cache_hits=s.profile_cache_hits,
        profile_cache_misses=s.profile_cache_misses,
        tenant_bytes=s.tenant_bytes,
        uptime_s=s.uptime_s,
        chunks_dropped=s.chunks_dropped,
        slices_rejected=s.slices_rejected,
    )
    if s.session is not None:
        x = s.session
        out.session.CopyFrom(
            pb.SessionStats(
                session_id=x.session_id,
                tenant=x.tenant,
                model_id=x.model_id,
                share=x.share,
                requests_done=x.requests_done,
                requests_failed=x.requests_failed,
                weights_pinned=x.weights_pinned,
                bytes_received=x.bytes_received,
                chunks_dropped=x.chunks_dropped,
                slices_rejected=x.slices_rejected,
            )
        )
    return out


def timings_pb(t: ServerTimings, with_ops: bool = True) -> pb.ServerTimings:
    """The wire form of a request's timings; ``with_ops`` False leaves the per-op timings out (a client that
    did not ask for them: 560 entries for googlenet, ~25 kB, encoded here and decoded there per request)."""
    return pb.ServerTimings(
        total_ms=t.total_ms,
        compute_ms=t.compute_ms,
        input_wait_ms=t.input_wait_ms,
        weight_wait_ms=t.weight_wait_ms,
        queue_ms=t.queue_ms,
        ops=[pb.OpTiming(name=o.name, start_ms=o.start_ms, ms=o.ms) for o in t.ops] if with_ops else (),
        validation_ms=t.validation_ms,
    )


def slice_defined_pb(e: ev.SliceDefined) -> pb.SessionResponse:
    return pb.SessionResponse(
        slice_defined=pb.SliceDefined(slice_id=e.slice_id, graph_hash=e.graph_hash, missing_weights=e.missing_weights)
    )


def _weight_stored_pb(e: ev.WeightStored) -> pb.WeightStored:
    return pb.WeightStored(sha256=e.sha256, nbytes=e.nbytes, already_present=e.already_present)


_ENVELOPE_BYTES = 64
"""Bytes a SessionResponse adds around its RequestDone (its tag and length, with room to spare)."""


def encode_event(event: ev.Event, chunk_bytes: int, batch_acks: bool = False, max_message_bytes: int = 0,
                 batch_progress: bool = False):
    """One session event -> the SessionResponse messages that carry it (several for an output; a
    WeightsStored is one ``weights_stored`` message if the client asked for ``batch_acks``, else one
    ``weight_stored`` per weight; a ProgressRound one ``progress_batch`` message if it asked for
    ``batch_progress``, else one ``request_progress`` per request reported).

    A RequestDone stays within ``max_message_bytes`` (the server's send limit; 0: unchecked): outputs that
    fit ``max_chunk_bytes`` but not the message beside the per-op timings the client asked for go as
    TensorChunks before it (before, a 1 MiB output with 3000 ops' timings was over a ``max_chunk_bytes`` +
    64 KiB message limit and the whole session stream failed RESOURCE_EXHAUSTED), and per-op timings that
    alone would not fit are left out (logged).
    """
    if isinstance(event, ev.OutputReady):
        for chunk in encode_tensor_chunks(event.request_id, event.name, event.tensor, chunk_bytes):
            yield pb.SessionResponse(output=chunk)
    elif isinstance(event, ev.RequestDone):
        done = pb.RequestDone(
            request_id=event.request_id,
            output_names=event.output_names,
            timings=timings_pb(event.timings, event.with_ops),
        )
        limit = max_message_bytes - _ENVELOPE_BYTES if max_message_bytes else 0
        if event.outputs:  # each whole in one chunk (their sum is within max_chunk_bytes)
            done.outputs.extend(
                next(encode_tensor_chunks(event.request_id, name, t, max(1, t.nbytes)))
                for name, t in event.outputs.items()
            )
            if limit and done.ByteSize() > limit:
                del done.outputs[:]
                for name, t in event.outputs.items():
                    for chunk in encode_tensor_chunks(event.request_id, name, t, chunk_bytes):
                        yield pb.SessionResponse(output=chunk)
        if limit and done.ByteSize() > limit:
            logger.info("request %d: its %d per-op timings exceed the message limit: left out",
                        event.request_id, len(done.timings.ops))
            del done.timings.ops[:]
        yield pb.SessionResponse(request_done=done)
    elif isinstance(event, ev.RequestFailed):
        yield pb.SessionResponse(
            request_failed=pb.RequestFailed(
                request_id=event.request_id, code=status_value(event.code), message=event.message
            )
        )
    elif isinstance(event, ev.WeightsStored):
        if batch_acks and len(event.acks) > 1:
            yield pb.SessionResponse(
                weights_stored=pb.WeightsStored(weights=[_weight_stored_pb(a) for a in event.acks])
            )
        else:
            for a in event.acks:
                yield pb.SessionResponse(weight_stored=_weight_stored_pb(a))
    elif isinstance(event, ev.SliceDefined):
        yield slice_defined_pb(event)
    elif isinstance(event, ev.SliceRejected):
        yield pb.SessionResponse(
            slice_rejected=pb.SliceRejected(
                slice_id=event.slice_id, code=status_value(event.code), message=event.message
            )
        )
    elif isinstance(event, ev.ProgressRound):
        reports = [
            pb.RequestProgress(request_id=p.request_id, ops_done=p.ops_done, ops_total=p.ops_total,
                               input_bytes=p.input_bytes)
            for p in event.reports
        ]
        if batch_progress:
            yield pb.SessionResponse(progress_batch=pb.ProgressBatch(requests=reports))
        else:
            for r in reports:
                yield pb.SessionResponse(request_progress=r)
    elif isinstance(event, ev.ShareChanged):
        yield pb.SessionResponse(
            share_changed=pb.ShareChanged(
                share=event.share, uplink_share=event.uplink_share, request_uplink_share=event.request_uplink_share
            )
        )
    else:  # pragma: no cover - a new event type without an encoder is a bug
        raise TypeError(f"no encoder for {type(event).__name__}")


# ------------------------------------------------------------------------------------------------------


class EdgeServicer(pb_grpc.EdgeServiceServicer):
    def __init__(self, runtime: EdgeRuntime) -> None:
        self.rt = runtime

    async def abort(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
        """End the call for ``exc`` through the one error boundary (:func:`abort`, with the runtime's
        metrics, tarpit and authenticator)."""
        await abort(context, exc, method, self.rt.metrics, self.rt.tarpit, self.rt.auth)

    def refusal(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> Refusal:
        """:func:`refusal` with the runtime's metrics, tarpit and authenticator."""
        return refusal(context, exc, method, self.rt.metrics, self.rt.tarpit, self.rt.auth)

    def gates(self):
        """The call gate (``edge_server.calls.CallGate``) and this servicer's admission to it, or None (no gate)."""
        return None if self.rt.calls is None else (self.rt.calls, self.admit)

    def admit(self, context: grpc.aio.ServicerContext, method: str):
        """Register a starting call in the runtime's call gate under its caller key (the tenant of its bearer
        token, else its peer address), with its token's tenant and digest for revocation. Raises
        ResourceExhausted if the caller has the most calls open."""
        found = self._identified(context)
        tenant = found[0].tenant if found is not None else None
        return self.rt.calls.enter(caller_key(tenant, context.peer()), tenant or "",
                                   found[1] if found is not None else "", method)

    def _identified(self, context: grpc.aio.ServicerContext) -> tuple[Principal, str] | None:
        """The call's (principal, token digest): what the authentication interceptor recorded for it
        (``edge_server.auth.remembered_caller``), else its token authenticated here; None without authentication
        or an unknown token."""
        auth = self.rt.auth
        if auth is None:
            return None
        found = remembered_caller()
        return found if found is not None else auth.identify(authorization_of(context.invocation_metadata()))

    @property
    def _max_chunk(self) -> int:
        return self.rt.config.max_chunk_bytes

    async def _decode_profile(self, p: pb.UeProfile, tenant: str, *, update: bool = False, run=None):
        """``edge_server.profile_intake.decode_profile_async`` with this server's op limit and memory budget,
        charged to ``tenant``: ``(profile, reservation)``."""
        return await decode_profile_async(
            p, update=update, max_ops=self.rt.config.max_cost_graph_ops, memory=self.rt.memory, holder=tenant,
            run=run,
        )

    async def _profile_update(self, p: pb.UeProfile, tenant: str, session_id: str) -> ev.UpdateProfile:
        """A session's profile update, parsed on the compute scheduler in the session's fair turn (charged to
        its tenant like its requests' compute). On a thread of its own (``asyncio.to_thread``), every
        session's updates parsed at once, each holding the GIL through its C ``json.loads``: three sessions
        sending 10k-op cost graphs (2 MB) back to back took a victim's 1 ms offloaded request to a median
        of ~0.6 s (equal allocator) to ~1 s (ARA) (tests/test_attack10.py). (Not held back while the
        tenant's planner bucket is in debt: waiting here would stall the session's requests behind it.)"""
        scheduler = self.rt.scheduler

        async def run(fn):
            return (await scheduler.run(session_id, fn)).value

        return ev.UpdateProfile(*await self._decode_profile(p, tenant, update=True, run=run))

    def _caller(self, context: grpc.aio.ServicerContext, claimed_tenant: str, *, need_tenant: bool = True) -> Principal:
        """The caller, from the call's bearer token (see :meth:`EdgeRuntime.caller`)."""
        if self.rt.auth is not None:
            found = remembered_caller()
            if found is not None:
                return self.rt.caller(None, claimed_tenant, need_tenant=need_tenant, principal=found[0])
        return self.rt.caller(authorization_of(context.invocation_metadata()), claimed_tenant, need_tenant=need_tenant)

    @rpc_boundary
    async def Hello(self, request: pb.HelloRequest, context) -> pb.HelloResponse:
        return hello_pb(self.rt.hello(self._caller(context, request.tenant, need_tenant=False)))

    @rpc_boundary
    async def QueryWeights(self, request: pb.QueryWeightsRequest, context) -> pb.QueryWeightsResponse:
        who = self._caller(context, request.tenant)
        return pb.QueryWeightsResponse(present=self.rt.query_weights(who, list(request.sha256)))

    @rpc_boundary
    async def ProfileGraph(self, request: pb.ProfileGraphRequest, context) -> pb.ProfileGraphResponse:
        who = self._caller(context, "", need_tenant=False)
        r = await self.rt.profile(request.slice_spec_json, request.iterations, request.warmup, tenant=who.tenant)
        return pb.ProfileGraphResponse(
            graph_hash=r.graph_hash,
            ops=[pb.OpCost(name=o.name, mean_ms=o.mean_ms, var_ms2=o.var_ms2) for o in r.ops],
            total_mean_ms=r.total_mean_ms,
            total_var_ms2=r.total_var_ms2,
            device=r.device,
            cached=r.cached,
        )

    @rpc_boundary
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        who = self._caller(context, "", need_tenant=False)
        return stats_pb(self.rt.stats(who, request.session_id, request.tenant))

    @rpc_boundary
    async def UploadWeights(
        self, request_iterator: AsyncIterator[pb.UploadWeightsRequest], context
    ) -> pb.UploadWeightsResponse:
        it = request_iterator.__aiter__()
        first = await anext(it, None)
        if first is None:
            raise InvalidArgument("empty UploadWeights stream (no header)")
        if first.WhichOneof("msg") != "header":
            raise InvalidArgument("the first UploadWeights message must be an UploadHeader")
        upload = self.rt.upload_stream(self._caller(context, first.header.tenant), first.header.session_id)
        idle_s = self.rt.config.session_idle_s
        loop = asyncio.get_running_loop()
        progress = self.rt.config.upload_progress_bytes
        clock = upload.progress_clock(progress, loop.time())
        try:
            # a client that stops sending mid-upload (alive, so keepalive does not end the call) would hold
            # its staging bytes for ever: the call ends after --session-idle-s without progress
            # (``uploads.ProgressClock``, the rule of every weight stream), i.e. without a message while
            # nothing is half-received, or with a weight half-received, without ``upload_progress_bytes`` of
            # weights it does not hold already (a trickle of bytes is not progress: review22; nor is a commit:
            # re-sending a 1-byte weight it held kept a half-received 4 MiB one's staging for ever, review23 F2)
            async with asyncio.timeout(idle_s if idle_s > 0 else None) as idle:
                async for msg in it:
                    if msg.WhichOneof("msg") != "chunk":
                        raise InvalidArgument("only the first UploadWeights message may be a header")
                    upload.feed(decode_weight_chunk(msg.chunk, self._max_chunk))
                    if idle_s > 0 and clock.check(loop.time()):
                        idle.reschedule(clock.since + idle_s)
            done = upload.finish()
        except TimeoutError:
            raise DeadlineExceeded(
                f"upload idle for more than {idle_s:g} s (--session-idle-s): no message, or with a weight "
                f"half-received fewer than {progress} bytes of weights not held already"
            ) from None
        finally:
            upload.abort()
        return pb.UploadWeightsResponse(
            weights=[pb.WeightStatus(sha256=r.sha256, nbytes=r.nbytes, already_present=r.already_present) for r in done]
        )

    @rpc_boundary
    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context
    ) -> AsyncIterator[pb.SessionResponse]:
        it = request_iterator.__aiter__()
        first = await anext(it, None)
        if first is None or first.WhichOneof("msg") != "open":
            raise InvalidArgument("the first Session message must be OpenSession")
        op = first.open
        who = self._caller(context, op.tenant)
        hold_next_reads()  # before "opened": an open stream holds the message limit for its reads (review23 F6)
        profile = hold = None
        if op.HasField("profile"):
            profile, hold = await self._decode_profile(op.profile, who.tenant)
        try:
            session, defined = await self.rt.open_session(
                who, op.model_id, profile, op.slice_id, op.slice_spec_json, peer=context.peer() or ""
            )
        finally:
            if hold is not None:
                hold.release()  # the parsed cost graph is the allocator's now
        session.stream_task = asyncio.current_task()
        if self.rt.auth is not None:
            found = remembered_caller()
            session.token_digest = (found[1] if found is not None
                                    else self.rt.auth.digest_of(authorization_of(context.invocation_metadata())))
        batch_acks, batch_progress = op.batch_acks, op.batch_progress
        session.client_options(outputs_in_done=op.outputs_in_done, op_timings=op.op_timings,
                               progress_events=op.progress_events)
        # not held for the stream's life by this frame: the profile's parsed cost graph (~24x its text as
        # Python objects, 185 MiB for an 8 MiB OpenSession) and the message's cost graph and slice spec
        del first, op, profile, hold
        reader: asyncio.Task | None = None
        try:
            yield pb.SessionResponse(
                opened=pb.SessionOpened(
                    session_id=session.session_id,
                    share=self.rt.share_of(session.session_id),
                    uplink_share=self.rt.uplink_share_of(session.session_id),
                    request_uplink_share=self.rt.request_uplink_share_of(session.session_id),
                    limits=limits_pb(self.rt.hello(who)),
                    missing_weights=defined.missing_weights if defined else [],
                    data_ticket=self.rt.data_ticket(session),
                )
            )
            if defined is not None:
                yield slice_defined_pb(defined)

            async def inbound() -> AsyncIterator[Inbound]:
                async for msg in it:
                    if msg.WhichOneof("msg") == "profile":
                        # no local of this frame holds the parsed cost graph while the generator waits
                        update = self._profile_update(msg.profile, session.tenant, session.session_id)
                        msg = None
                        yield await update
                    else:
                        yield decode_session_request(msg, self._max_chunk, max_chunks)

            max_chunks = self.rt.config.max_chunks_per_message

            reader = asyncio.get_running_loop().create_task(session.serve(inbound()))
            chunk_bytes = self.rt.config.preferred_chunk_bytes
            max_message = self.rt.config.max_message_bytes
            while True:
                event = await session.next_event()
                if isinstance(event, ev.SessionEnded):
                    return
                if isinstance(event, ev.SessionFailed):
                    raise event.error
                for msg in encode_event(event, chunk_bytes, batch_acks, max_message, batch_progress):
                    yield msg
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
            await self.rt.close_session(session)
