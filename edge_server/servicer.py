"""Thin gRPC servicer: decode the request, call the domain (:class:`EdgeRuntime`), encode the answer.

Errors: domain errors (:class:`edge_server.errors.EdgeError`) carry the status code to answer with;
anything else is a bug: logged with its traceback and answered INTERNAL. The server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator

import grpc

from edge_server import session as sess
from edge_server.allocation import UeProfileData
from edge_server.errors import EdgeError, InvalidArgument
from edge_server.runtime import EdgeRuntime, HelloInfo, ServerStats
from edge_server.tensor_codec import decode_tensor_chunk, decode_weight_chunk, encode_tensor_chunks
from protos.coinfer.v1 import coinfer_pb2 as pb
from protos.coinfer.v1 import coinfer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, EdgeError):
        return grpc.StatusCode[exc.code], str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, msg = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed", method, exc_info=exc)
    else:
        logger.info("%s: %s: %s", method, code.name, msg)
    await context.abort(code, msg[:2000])


# ------------------------------------------------------------------------------------------------------
# decoders / encoders


def decode_profile(p: pb.UeProfile) -> UeProfileData:
    for name in ("uplink_mbps", "downlink_mbps", "rtt_ms", "weight"):
        v = getattr(p, name)
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(f"profile.{name} must be a finite number >= 0")
    if p.uplink_mbps <= 0:
        raise InvalidArgument("profile.uplink_mbps must be > 0")
    if not p.cost_graph_json:
        raise InvalidArgument("profile.cost_graph_json is empty")
    return UeProfileData(bytes(p.cost_graph_json), p.uplink_mbps, p.downlink_mbps, p.rtt_ms, p.weight or 1.0)


def limits_pb(info: HelloInfo) -> pb.Limits:
    c = info.config
    return pb.Limits(
        max_chunk_bytes=c.max_chunk_bytes,
        preferred_chunk_bytes=c.preferred_chunk_bytes,
        max_message_bytes=c.max_message_bytes,
        cache_bytes=c.cache_bytes,
        staging_bytes=c.staging_bytes,
        max_sessions=c.max_sessions,
        max_ops=info.max_ops,
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


def timings_pb(t: sess.RequestTimings) -> pb.ServerTimings:
    return pb.ServerTimings(
        total_ms=t.total_ms,
        compute_ms=t.compute_ms,
        input_wait_ms=t.input_wait_ms,
        weight_wait_ms=t.weight_wait_ms,
        queue_ms=t.queue_ms,
        ops=[pb.OpTiming(name=o.name, start_ms=o.start_ms, ms=o.ms) for o in t.ops],
    )


def slice_defined_pb(e: sess.SliceDefined) -> pb.SessionResponse:
    return pb.SessionResponse(
        slice_defined=pb.SliceDefined(slice_id=e.slice_id, graph_hash=e.graph_hash, missing_weights=e.missing_weights)
    )


def weight_stored_pb(e: sess.WeightStored) -> pb.SessionResponse:
    return pb.SessionResponse(
        weight_stored=pb.WeightStored(sha256=e.sha256, nbytes=e.nbytes, already_present=e.already_present)
    )


# ------------------------------------------------------------------------------------------------------


class EdgeServicer(pb_grpc.EdgeServiceServicer):
    def __init__(self, runtime: EdgeRuntime) -> None:
        self.rt = runtime

    @property
    def _max_chunk(self) -> int:
        return self.rt.config.max_chunk_bytes

    async def Hello(self, request: pb.HelloRequest, context: grpc.aio.ServicerContext) -> pb.HelloResponse:
        try:
            return hello_pb(self.rt.hello(request.tenant))
        except Exception as e:
            await abort_with(context, e, "Hello")

    async def QueryWeights(self, request: pb.QueryWeightsRequest, context) -> pb.QueryWeightsResponse:
        try:
            return pb.QueryWeightsResponse(present=self.rt.query_weights(request.tenant, list(request.sha256)))
        except Exception as e:
            await abort_with(context, e, "QueryWeights")

    async def ProfileGraph(self, request: pb.ProfileGraphRequest, context) -> pb.ProfileGraphResponse:
        try:
            r = await self.rt.profile(request.slice_spec_json, request.iterations, request.warmup)
        except Exception as e:
            await abort_with(context, e, "ProfileGraph")
        return pb.ProfileGraphResponse(
            graph_hash=r.graph_hash,
            ops=[pb.OpCost(name=o.name, mean_ms=o.mean_ms, var_ms2=o.var_ms2) for o in r.ops],
            total_mean_ms=r.total_mean_ms,
            total_var_ms2=r.total_var_ms2,
            device=r.device,
            cached=r.cached,
        )

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        try:
            return stats_pb(self.rt.stats(request.session_id, request.tenant))
        except Exception as e:
            await abort_with(context, e, "Stats")

    async def UploadWeights(
        self, request_iterator: AsyncIterator[pb.UploadWeightsRequest], context
    ) -> pb.UploadWeightsResponse:
        tracker = None
        statuses: list[pb.WeightStatus] = []
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("msg")
                if tracker is None:
                    if kind != "header":
                        raise InvalidArgument("the first UploadWeights message must be an UploadHeader")
                    tracker, session = self.rt.upload_tracker(msg.header.tenant, msg.header.session_id)
                    continue
                if kind != "chunk":
                    raise InvalidArgument("only the first UploadWeights message may be a header")
                piece = decode_weight_chunk(msg.chunk, self._max_chunk)
                result = tracker.feed(piece)
                if result is not None:
                    self.rt.upload_committed(tracker.tenant, result.sha256, session)
                    statuses.append(
                        pb.WeightStatus(
                            sha256=result.sha256, nbytes=result.nbytes, already_present=result.already_present
                        )
                    )
            if tracker is None:
                raise InvalidArgument("empty UploadWeights stream (no header)")
            if tracker.in_progress:
                raise InvalidArgument(f"stream ended with {tracker.in_progress} incomplete weight(s)")
        except Exception as e:
            await abort_with(context, e, "UploadWeights")
        finally:
            if tracker is not None:
                tracker.abort_all()  # nothing half-written stays behind, whatever happened
        return pb.UploadWeightsResponse(weights=statuses)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context
    ) -> AsyncIterator[pb.SessionResponse]:
        session: sess.Session | None = None
        reader: asyncio.Task | None = None
        try:
            try:
                it = request_iterator.__aiter__()
                first = await anext(it, None)
                if first is None or first.WhichOneof("msg") != "open":
                    raise InvalidArgument("the first Session message must be OpenSession")
                op = first.open
                profile = decode_profile(op.profile) if op.HasField("profile") else None
                session = await self.rt.sessions.open(op.tenant, op.model_id, profile)
                defined = None
                if op.slice_spec_json:
                    defined = await session.define_slice(op.slice_id, op.slice_spec_json)
                    self.rt.sessions.check_upload_done(session)
            except Exception as e:
                await abort_with(context, e, "Session")
            yield pb.SessionResponse(
                opened=pb.SessionOpened(
                    session_id=session.session_id,
                    share=self.rt.share_of(session.session_id),
                    limits=limits_pb(self.rt.hello(session.tenant)),
                    missing_weights=defined.missing_weights if defined else [],
                )
            )
            if defined is not None:
                yield slice_defined_pb(defined)
            reader = asyncio.get_running_loop().create_task(self._read_session(session, it))
            while True:
                event = await session.next_event()
                if isinstance(event, sess.SessionEnded):
                    return
                if isinstance(event, sess.SessionFailed):
                    await abort_with(context, event.error, "Session")
                for msg in self._encode_event(event):
                    yield msg
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
            if session is not None:
                await self.rt.sessions.close(session)

    def _encode_event(self, event: sess.Event):
        if isinstance(event, sess.OutputReady):
            for chunk in encode_tensor_chunks(
                event.request_id, event.name, event.tensor, self.rt.config.preferred_chunk_bytes
            ):
                yield pb.SessionResponse(output=chunk)
        elif isinstance(event, sess.RequestDone):
            yield pb.SessionResponse(
                request_done=pb.RequestDone(
                    request_id=event.request_id, output_names=event.output_names, timings=timings_pb(event.timings)
                )
            )
        elif isinstance(event, sess.RequestFailed):
            code = grpc.StatusCode[event.code].value[0]
            yield pb.SessionResponse(
                request_failed=pb.RequestFailed(request_id=event.request_id, code=code, message=event.message)
            )
        elif isinstance(event, sess.WeightStored):
            yield weight_stored_pb(event)
        elif isinstance(event, sess.SliceDefined):
            yield slice_defined_pb(event)
        elif isinstance(event, sess.SliceRejected):
            code = grpc.StatusCode[event.code].value[0]
            yield pb.SessionResponse(
                slice_rejected=pb.SliceRejected(slice_id=event.slice_id, code=code, message=event.message)
            )
        elif isinstance(event, sess.ShareChanged):
            yield pb.SessionResponse(share_changed=pb.ShareChanged(share=event.share))
        else:  # pragma: no cover - a new event type without an encoder is a bug
            raise TypeError(f"no encoder for {type(event).__name__}")

    async def _read_session(self, session: sess.Session, it: AsyncIterator[pb.SessionRequest]) -> None:
        """Consume the client's messages.

        Problems of one request or one slice are answered on the stream (RequestFailed, SliceRejected)
        and the session goes on; errors that leave the stream itself untrustworthy (malformed message,
        a second OpenSession, a bad weight chunk) end the session with their status.
        """
        try:
            async for msg in it:
                kind = msg.WhichOneof("msg")
                if kind == "weight":
                    stored = await session.on_weight_piece(decode_weight_chunk(msg.weight, self._max_chunk))
                    if stored is not None:
                        session.emit(stored)
                elif kind == "tensor":
                    try:
                        piece = decode_tensor_chunk(msg.tensor, self._max_chunk)
                    except EdgeError as e:  # a malformed chunk fails its request, not the session
                        session.counters.bytes_received += len(msg.tensor.data)
                        session.request_error(msg.tensor.request_id, e)
                        continue
                    await session.on_tensor_piece(piece)
                elif kind == "begin_request":
                    b = msg.begin_request
                    session.begin_request(b.request_id, b.slice_id, list(b.input_names))
                elif kind == "define_slice":
                    d = msg.define_slice
                    answer = await session.on_define_slice(d.slice_id, d.slice_spec_json)
                    session.emit(answer)
                    if isinstance(answer, sess.SliceDefined):
                        self.rt.sessions.check_upload_done(session)
                elif kind == "cancel_request":
                    session.cancel_request(msg.cancel_request.request_id)
                elif kind == "close":
                    break
                elif kind == "open":
                    raise InvalidArgument("OpenSession may only be the first message")
                else:
                    raise InvalidArgument("empty SessionRequest")
            session.close_input()
            await session.drain()
            session.emit(sess.SessionEnded())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            session.emit(sess.SessionFailed(e))
