"""A session: one UE's stream of slices, weights and requests (the protocol of the Session call).

A session belongs to one tenant. It holds compiled slices (by slice id), the weights it can use (pinned
in the store for its whole life, so weights uploaded for request 1 are still there for request 2), the
uploads in progress on its stream (:class:`~edge_server.uploads.UploadTracker`) and its requests
(:class:`~edge_server.requests.RequestRunner`). The servicer decodes each client message into a piece
or an ``edge_server.events`` command and hands the stream to :meth:`Session.serve`; what the session
has to say goes out as events (:meth:`Session.next_event`) that the servicer encodes.

Everything here runs on the server's event loop, except :meth:`Session.device_weight` (worker threads).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Protocol

import torch

from edge_server import events as ev
from edge_server.config import ServerConfig
from edge_server.errors import EdgeError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from edge_server.ids import MAX_ID_LEN, check_id
from edge_server.memory import Bounds, Reservation
from edge_server.requests import RequestRunner
from edge_server.scheduler import ComputeScheduler
from edge_server.slices import CompiledSlice, compile_slice, weight_tensor
from edge_server.tensor_codec import TensorPiece, WeightPiece
from edge_server.uploads import ProgressClock, UploadTracker
from edge_server.weight_store import CommitResult, StoredWeight, WeightStore
from protos.values import ServerTimings, UeProfile

logger = logging.getLogger(__name__)

Inbound = (
    WeightPiece
    | ev.WeightPieces
    | TensorPiece
    | ev.BadTensorChunk
    | ev.BeginRequest
    | ev.DefineSlice
    | ev.CancelRequest
    | ev.UpdateProfile
    | ev.CloseSession
)
"""A client message after OpenSession, decoded (see ``servicer.decode_session_request``)."""

MAX_EVENTS_WAITING = 4096
"""Events (each weight acknowledgement counted) a session may have queued for its client and not yet
sent before it stops reading the client's messages, until half of them went: a client that sends and
never reads its stream (one 1-byte weight resent 400 000 times, 256 chunks a message) had every
acknowledgement held in one growing list; waiting, it sends nothing the session reads, so the idle
timeout (``--session-idle-s``) ends it. As the data channel's ``MAX_ACKS_WAITING``."""

SLICE_BYTES_PER_SPEC_BYTE = 16
"""Host memory a compiled slice holds, per byte of its JSON (ops, templates, metadata, the program's binders):
11-16 measured with tracemalloc (relu chains of 3k-15k ops, resnet18 / mobilenet_v2 / tiny_vit server parts).
Charged to the ``--memory-mb`` budget for as long as the slice is defined (``Session.define_slice``)."""

VALIDATION_BYTES_PER_SPEC_BYTE = 24
"""Host memory a slice validation in progress holds, per byte of its JSON: the parsed spec, the meta values and the
slice compiled so far. Its peak measured with tracemalloc: 18.7-21.9 (tril chains of 5k and 45k ops, a relu chain of
10k, as DefineSlice and as ProfileGraph; 33.7 for the first validation of a process, with torch's one-time caches);
review19 read 23 mid-way. Reserved in the ``--memory-mb`` budget while the validation runs, paused or not
(``Bounds.compile``): DefineSlice the part over its ``SLICE_BYTES_PER_SPEC_BYTE`` charge, ProfileGraph all of it."""


@dataclass(frozen=True, slots=True)
class SessionCounters:
    """A snapshot of one session's counters (each kept by the part that owns it)."""

    requests_done: int = 0
    requests_failed: int = 0
    bytes_received: int = 0
    chunks_dropped: int = 0
    """TensorChunks of requests that had already finished, failed or been cancelled."""
    slices_rejected: int = 0

    def __add__(self, other: SessionCounters) -> SessionCounters:
        return SessionCounters(*(a + b for a, b in zip(_astuple(self), _astuple(other))))


def _output_bytes(event: ev.Event) -> int:
    """Output bytes an event carries to the client (an output tensor, or a RequestDone with its outputs
    inside): held in the memory budget and the flow control until it was handed to the transport."""
    if isinstance(event, ev.OutputReady):
        return event.tensor.nbytes
    if isinstance(event, ev.RequestDone):
        return event.nbytes
    return 0


def _astuple(c: SessionCounters) -> tuple[int, ...]:
    return (c.requests_done, c.requests_failed, c.bytes_received, c.chunks_dropped, c.slices_rejected)


class SessionHost(Protocol):
    """What a session needs of its manager."""

    def weight_committed(self, tenant: str, sha: str) -> None:
        """A weight of ``tenant`` was committed on this session's stream (other sessions may wait for it)."""

    def upload_done(self, session: Session) -> None:
        """The session holds every weight of its slices (told once)."""

    def admit_request(self, tenant: str) -> None:
        """Raise ResourceExhausted if ``tenant`` may not start another request now (its quota)."""

    def request_finished(self, session: Session, code: str | None, timings: ServerTimings | None) -> None:
        """A request of ``session`` was answered (``code`` None: done, with its server ``timings``)."""

    async def profile_changed(self, session: Session, profile: UeProfile, hold: Reservation | None = None) -> None:
        """The UE sent a new profile (``SessionRequest.profile``): re-allocate with it. ``hold``: the memory
        its parsed cost graph holds in the tenant's budget; the host releases it (when the graph has left
        the allocator's queue), also on any error."""


class Session:
    def __init__(
        self,
        session_id: str,
        tenant: str,
        model_id: str,
        *,
        config: ServerConfig,
        store: WeightStore,
        scheduler: ComputeScheduler,
        device: torch.device,
        host: SessionHost,
        bounds: Bounds | None = None,
    ) -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.model_id = model_id
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.device = device
        self._host = host
        self.bounds = bounds or Bounds()
        self.slices: dict[str, CompiledSlice] = {}
        self.available: dict[str, StoredWeight] = {}
        """sha256 -> weight pinned for this session."""
        self._uploads = UploadTracker(store, tenant)
        self.weights_clock = ProgressClock(self._uploads, config.upload_progress_bytes, time.monotonic())
        """The idle rule of the weights half-received on this stream (``uploads.ProgressClock``): any message
        restarts :attr:`last_seen`, and re-sending a held 1-byte weight (or any other message) every 0.3 s kept a
        half-received 4 MiB weight's staging for ever (session 23); :meth:`idle_since` counts from the older."""
        self.requests = RequestRunner(
            session_id,
            config=config,
            scheduler=scheduler,
            staging=store.staging_for(tenant),
            weights=self,
            emit=self.emit,
            admit=lambda: host.admit_request(tenant),
            tenant=tenant,
            bounds=self.bounds,
            output_room=self.wait_output_room,
            on_finished=lambda code, timings: host.request_finished(self, code, timings),
            stream_quiet=lambda: self.events_waiting == 0,
        )
        self._rejected_slices: dict[str, EdgeError] = {}
        """Slice id -> why its last DefineSlice was refused (bounded, oldest forgotten first)."""
        self._validation_ms: dict[str, float] = {}
        """Slice id (of ``slices``) -> its DefineSlice's wall time, ms, until its first request takes it."""
        self._slice_charges: dict[str, Reservation] = {}
        """Slice id (of ``slices``) -> its compiled form's bytes held in the memory budget."""
        self.reported_share: float | None = None
        self.reported_uplink_share = 0.0
        """The uplink share last told to the client (0: none given)."""
        self.reported_request_uplink_share = 0.0
        """The request uplink share last told to the client (0: none given)."""
        self._device_weights: dict[tuple, torch.Tensor] = {}
        """(sha256, dtype, shape, stride) -> the weight as a tensor on the session's device (on CUDA a copy in
        device memory; on CPU a view of the store's bytes), shared by the slices that read it; the keys no
        defined slice reads are dropped when a slice is replaced or refused (``_prune_device_weights``)."""
        self._events: asyncio.Queue[ev.Event] = asyncio.Queue()
        self._drained: asyncio.Event | None = None
        self._reader_waits = 0
        """Set by :meth:`next_event` once half of :data:`MAX_EVENTS_WAITING` is free (while :meth:`serve`
        waits for the client to read)."""
        self._ack_batch: ev.WeightsStored | None = None
        """The weight acknowledgements queued last and not taken yet: the next commit joins them."""
        self.output_pending = 0
        """Bytes of outputs produced and not yet handed to the transport (flow control)."""
        self._output_charges: dict[int, Reservation] = {}
        """id(OutputReady) -> its bytes charged to the memory budget until it is sent."""
        self._sending: ev.OutputReady | None = None
        self._round: ev.ProgressRound | None = None
        """The round of progress reports last returned by :meth:`next_event` (being written)."""
        self._room = asyncio.Event()
        self.bytes_received = 0
        self.data_bytes_received = 0
        """Weight bytes that came on this session's data channel (written by its connection's thread only)."""
        self.slices_rejected = 0
        self.op_timings = False
        """Every RequestDone of this session carries per-op timings (``OpenSession.op_timings``)."""
        self.closed = False
        self._upload_done_reported = False
        self.idle_expired = False
        """The idle timeout ended this session (told once)."""
        self.expired_at = 0.0
        """When the idle timeout ended it (monotonic s)."""
        self.stream_task: asyncio.Task | None = None
        """The task serving this session's call (the servicer's): cancelled if the expiry cannot reach it."""
        self.token_digest = ""
        """sha256 of the bearer token that opened it ("": no authentication): a tokens file reloaded without
        that token for this tenant ends the session (``EdgeRuntime.reload_tokens``)."""
        self.last_seen = time.monotonic()
        """When the client last sent a message (monotonic s): the idle timeout counts from it."""

    def client_options(self, *, outputs_in_done: bool, op_timings: bool, progress_events: bool = False) -> None:
        """What the client's OpenSession asked for: outputs inside RequestDone (``outputs_in_done``; they go
        there when they fit in ``max_chunk_bytes``), per-op timings in every RequestDone (``op_timings``) and
        progress reports of its requests in flight (``progress_events``; every ``config.progress_interval_ms``)."""
        self.requests.outputs_in_done = outputs_in_done
        self.op_timings = op_timings
        self.requests.progress_interval_s = self.config.progress_interval_ms / 1e3 if progress_events else 0.0

    @property
    def counters(self) -> SessionCounters:
        r = self.requests.counters
        return SessionCounters(
            r.requests_done,
            r.requests_failed,
            self.bytes_received + self.data_bytes_received,
            r.chunks_dropped,
            self.slices_rejected,
        )

    # -- events --------------------------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        """Queue an event for the client. A WeightStored joins the acknowledgements still waiting at
        the end of the queue (one WeightsStored per burst of commits: no delay, fewer messages)."""
        if isinstance(event, ev.WeightStored):
            if self._ack_batch is not None:
                self._ack_batch.acks.append(event)
                return
            event = self._ack_batch = ev.WeightsStored([event])
        else:
            self._ack_batch = None
        nbytes = _output_bytes(event)
        if nbytes:
            self.output_pending += nbytes
            self._output_charges[id(event)] = self.bounds.memory.charge(self.tenant, nbytes)
        self._events.put_nowait(event)

    @property
    def acks_waiting(self) -> int:
        """Weight acknowledgements queued and not yet taken for sending (the data channel's threads read it
        to stop reading a UE that does not read its stream: a reference and a length, safe under the GIL)."""
        batch = self._ack_batch
        return len(batch.acks) if batch is not None else 0

    @property
    def events_waiting(self) -> int:
        """Events queued for the client and not yet taken for sending, each weight acknowledgement of the
        batch waiting at the end counted as one."""
        return self._events.qsize() + self.acks_waiting

    async def next_event(self) -> ev.Event:
        """The next event to send. Asking for it means the previous one was handed to the transport
        (the servicer yields every message of an event before it asks again): its output bytes are freed, and a
        round of progress reports it was counts as written (its reporter may queue the next one an interval later).

        A :class:`~edge_server.events.ProgressRound` is filled here with the requests' counts now, or dropped
        (never returned) when another event waits behind it (answers never wait behind reports) or nothing moved."""
        self._sent()
        while True:
            event = await self._events.get()
            if event is self._ack_batch:
                self._ack_batch = None
            if self._drained is not None and self.events_waiting < MAX_EVENTS_WAITING // 2:
                self._drained.set()
            if isinstance(event, ev.ProgressRound):
                if self.events_waiting == 0 and not self.closed:
                    event.reports = event.build()
                if not event.reports:
                    event.written.set()
                    continue
                self._round = event
            elif _output_bytes(event):
                self._sending = event
            return event

    def _sent(self) -> None:
        written, self._round = self._round, None
        if written is not None:
            written.written.set()
        done, self._sending = self._sending, None
        if done is not None:
            self.output_pending -= _output_bytes(done)
            charge = self._output_charges.pop(id(done), None)
            if charge is not None:
                charge.release()
            old, self._room = self._room, asyncio.Event()
            old.set()

    async def _wait_for_reader(self) -> None:
        """Read no client message while :data:`MAX_EVENTS_WAITING` events wait unsent: until half of them
        went (the client reads again). A client that never reads sends the session nothing meanwhile, so
        the idle timeout ends it; gRPC's flow control holds back what it sends."""
        (logger.debug if self._reader_waits else logger.info)(
            "session %s: %d events unsent (the client does not read its stream): reading nothing until it does",
            self.session_id[:8],
            self.events_waiting,
        )
        self._reader_waits += 1
        self._drained = asyncio.Event()
        try:
            await self._drained.wait()
        finally:
            self._drained = None

    async def wait_output_room(self) -> None:
        """Wait while more than ``bounds.output_buffer_bytes`` of outputs wait to be sent (a client that
        does not read its outputs stops this session's compute, not the server's memory)."""
        while self.output_pending > self.bounds.output_buffer_bytes and not self.closed:
            await self._room.wait()

    # -- the client's stream -------------------------------------------------------------------------

    async def serve(self, inbound: AsyncIterable[Inbound]) -> None:
        """Consume the client's (decoded) messages until the stream ends, then finish the session.

        Problems of one request or one slice are answered on the stream (RequestFailed, SliceRejected)
        and the session goes on; errors that leave the stream itself untrustworthy (malformed message,
        a second OpenSession, a bad weight chunk) end the session: :class:`~edge_server.events.SessionFailed`.
        The last event is SessionEnded or SessionFailed.
        """
        try:
            async for msg in inbound:
                if isinstance(msg, ev.CloseSession):
                    break
                await self.receive(msg)
                msg = None  # not held until the next message (a profile update's parsed cost graph: ~24x its text)
                if self.events_waiting >= MAX_EVENTS_WAITING:
                    await self._wait_for_reader()
            # weights half-sent on this stream can no longer complete: give their staging bytes back now
            # (requests waiting for weights go on waiting for UploadWeights naming this session)
            self._uploads.abort_all()
            self.requests.close_input()
            await self.requests.drain()
            self.emit(ev.SessionEnded())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.emit(ev.SessionFailed(e))

    def idle_since(self, now: float) -> float:
        """When this session's idle time began (monotonic s): its client's last message (:attr:`last_seen`), or,
        with a weight half-received on its stream, its last progress there if older (``upload_progress_bytes`` of
        weights its tenant does not hold already within each ``session_idle_s``; :attr:`weights_clock`)."""
        self.weights_clock.check(now)
        return min(self.last_seen, self.weights_clock.since)

    def touch(self) -> None:
        """The client did something for this session (a message here, a weight chunk on UploadWeights
        naming it): the idle timeout counts from now."""
        self.last_seen = time.monotonic()

    async def receive(self, msg: Inbound) -> None:
        """Handle one client message (see :meth:`serve`); raises EdgeError for a stream-level error."""
        self.last_seen = time.monotonic()
        if isinstance(msg, WeightPiece):
            self._weight_piece(msg)
        elif isinstance(msg, ev.WeightPieces):
            for piece in msg.pieces:
                self._weight_piece(piece)
        elif isinstance(msg, TensorPiece):
            self.bytes_received += len(msg.data)
            self.requests.on_tensor_piece(msg)
        elif isinstance(msg, ev.BadTensorChunk):
            self.bytes_received += msg.nbytes
            self.requests.chunk_error(msg.request_id, msg.error)
        elif isinstance(msg, ev.BeginRequest):
            fed = self.requests.begin(
                msg.request_id,
                lambda: self._slice_for_request(msg.slice_id),
                msg.input_names,
                lambda: self._validation_ms.pop(msg.slice_id, 0.0),
                op_timings=msg.op_timings or self.op_timings,
                matmul_precision=msg.matmul_precision,
            )
            # its inline cut tensors: exactly as TensorChunks arriving now (a request refused above drops them),
            # unless this BeginRequest was refused for naming a request in flight (they are not that one's)
            if not fed:
                self.bytes_received += sum(len(p.data) for p in msg.inputs)
                return
            if msg.input_error is not None:
                self.requests.chunk_error(msg.request_id, msg.input_error)
            for piece in msg.inputs:
                self.bytes_received += len(piece.data)
                self.requests.on_tensor_piece(piece)
        elif isinstance(msg, ev.DefineSlice):
            self.emit(await self.on_define_slice(msg.slice_id, msg.spec_json))
        elif isinstance(msg, ev.CancelRequest):
            self.requests.cancel(msg.request_id)
        elif isinstance(msg, ev.UpdateProfile):
            hold, msg.hold = msg.hold, None
            # the host releases the graph's reservation once the allocator has taken the graph from its queue
            await self._host.profile_changed(self, msg.profile, hold)
        else:  # pragma: no cover - a decoder producing something new is a bug
            raise TypeError(f"unexpected session message {type(msg).__name__}")

    def _weight_piece(self, piece: WeightPiece) -> None:
        self.bytes_received += len(piece.data)
        result = self._uploads.feed(piece)
        if result is not None:
            self.weight_stored(result)

    def weight_stored(self, result: CommitResult) -> None:
        """A weight uploaded for this session was verified and committed (on its stream, or on its data
        channel: ``edge_server.data_channel`` calls this on the event loop): pin it here, tell the tenant's
        other sessions, and acknowledge it on the stream (``weights_stored``)."""
        self.weight_committed(result.sha256, uploaded_here=True)
        self._host.weight_committed(self.tenant, result.sha256)
        self.emit(ev.WeightStored(result.sha256, result.nbytes, result.already_present))

    # -- slices --------------------------------------------------------------------------------------

    async def define_slice(self, slice_id: str, spec_json: bytes) -> ev.SliceDefined:
        """Compile and add a slice, pinning the weights the tenant already holds.

        Raises InvalidArgument (not a valid slice; modelgraph's errors are InvalidArgument subclasses
        via compile_slice), ResourceExhausted (slice limit), FailedPrecondition (session closed).
        """
        check_id("slice_id", slice_id, allow_empty=True)
        if slice_id not in self.slices and len(self.slices) >= self.config.max_slices_per_session:
            raise ResourceExhausted(f"a session holds at most {self.config.max_slices_per_session} slices")
        if len(spec_json) > self.config.max_message_bytes:
            raise InvalidArgument("slice spec too large")
        t0 = time.perf_counter()
        if slice_id in self.slices:  # redefined (a UE at its slice cap reuses its LRU id): the old slice under
            # this id is dropped now, as a refusal of the new one would drop it (requests running on it keep
            # it), and its charge given back before the new one is reserved: both held during the validation
            # refused a same-size redefinition at the tenant's budget, dropping the old slice all the same
            del self.slices[slice_id]
            self._release_slice_charge(slice_id)
            self._validation_ms.pop(slice_id, None)
        # the compiled slice lives until it is replaced or the session ends, used or not (a UE's prefetch
        # defines its warm target ahead): its memory is held in the budget as long (RESOURCE_EXHAUSTED over it)
        charge = self.bounds.memory.reserve(
            self.tenant, SLICE_BYTES_PER_SPEC_BYTE * len(spec_json), f"slice {slice_id[:64]!r}"
        )
        try:
            # one validation at a time, server-wide, charged to the tenant's slice validation CPU budget
            bucket_of = self.bounds.validation_bucket
            cs = await self.bounds.compile(
                lambda check: compile_slice(
                    spec_json,
                    slice_id=slice_id,
                    device=self.device,
                    max_tensor_bytes=self.config.max_tensor_bytes,
                    max_slice_bytes=self.config.max_slice_bytes,
                    op_limits=self.bounds.op_limits,
                    check=check,
                ),
                bucket_of(self.tenant) if bucket_of is not None else None,
                # its working memory beyond the charge above (which the compiled slice grows into)
                hold_bytes=(VALIDATION_BYTES_PER_SPEC_BYTE - SLICE_BYTES_PER_SPEC_BYTE) * len(spec_json),
                holder=self.tenant,
                what=f"the validation of slice {slice_id[:64]!r} ({len(spec_json) / 2**20:.1f} MiB of JSON)",
            )
        except BaseException:
            charge.release()
            raise
        if self.closed:
            charge.release()
            raise FailedPrecondition("session closed")
        self._release_slice_charge(slice_id)
        self._slice_charges[slice_id] = charge
        self.slices[slice_id] = cs
        self._prune_device_weights()  # a replaced slice's copies its successor does not read
        self._validation_ms[slice_id] = (time.perf_counter() - t0) * 1e3  # told with the slice's first request
        self._rejected_slices.pop(slice_id, None)
        missing = []
        for sha in dict.fromkeys(w.sha256 for w in cs.weights.values()):
            if not self._acquire(sha):
                missing.append(sha)
        self.requests.notify()
        self._check_upload_done()
        return ev.SliceDefined(slice_id, cs.graph_hash, missing)

    async def on_define_slice(self, slice_id: str, spec_json: bytes) -> ev.SliceDefined | ev.SliceRejected:
        """DefineSlice on an open session: a bad slice is refused alone, the session goes on.

        The id then refers to no slice (an older slice with this id is dropped, requests already
        running on it keep it); BeginRequest on it fails that request with the rejection's reason.
        """
        try:
            return await self.define_slice(slice_id, spec_json)
        except Exception as e:
            if not isinstance(e, EdgeError):  # a bug of ours: logged, reported as INTERNAL, session goes on
                logger.exception("session %s: DefineSlice %r failed", self.session_id[:8], slice_id[:64])
                e = EdgeError(f"internal error while checking the slice: {type(e).__name__}")
            self.slices_rejected += 1
            if len(slice_id) <= MAX_ID_LEN and slice_id.isprintable():
                self.slices.pop(slice_id, None)
                self._prune_device_weights()
                self._release_slice_charge(slice_id)
                self._validation_ms.pop(slice_id, None)
                self._rejected_slices.pop(slice_id, None)
                self._rejected_slices[slice_id] = e
                while len(self._rejected_slices) > 4 * self.config.max_slices_per_session:
                    del self._rejected_slices[next(iter(self._rejected_slices))]
            logger.info("session %s: slice %r rejected: %s: %s", self.session_id[:8], slice_id[:64], e.code, e)
            return ev.SliceRejected(slice_id[:MAX_ID_LEN], e.code, str(e)[:2000])

    def _release_slice_charge(self, slice_id: str) -> None:
        """Give back the memory charge of the slice ``slice_id`` names (replaced, refused, or the session ended)."""
        charge = self._slice_charges.pop(slice_id, None)
        if charge is not None:
            charge.release()

    def _slice_for_request(self, slice_id: str) -> CompiledSlice:
        cs = self.slices.get(slice_id)
        if cs is None:
            rejected = self._rejected_slices.get(slice_id)
            if rejected is not None:
                err = EdgeError(f"slice {slice_id!r} was rejected: {rejected}")
                err.code = rejected.code
                raise err
            raise FailedPrecondition(f"slice {slice_id[:64]!r} is not defined in this session")
        return cs

    def missing_weights(self) -> set[str]:
        need: set[str] = set()
        for cs in self.slices.values():
            need |= cs.needed_sha256
        return need - self.available.keys()

    def _check_upload_done(self) -> None:
        """Tell the host once when the session has every weight of its slices."""
        if not self._upload_done_reported and self.slices and not self.missing_weights():
            self._upload_done_reported = True
            self._host.upload_done(self)

    # -- weights -------------------------------------------------------------------------------------

    def _acquire(self, sha: str) -> bool:
        """Pin a weight the tenant holds, making it available to this session. False if not held."""
        if sha in self.available:
            return True
        try:
            self.available[sha] = self.store.pin(self.tenant, sha, owner=self.session_id)
        except NotFound:
            return False
        return True

    def weight_committed(self, sha: str, *, uploaded_here: bool) -> None:
        """A weight of this tenant was committed (here, by UploadWeights, or by another session)."""
        if self.closed or sha in self.available:
            return
        if (uploaded_here or sha in self.missing_weights()) and self._acquire(sha):
            self.requests.notify()
            self._check_upload_done()

    def device_weight(self, cs: CompiledSlice, name: str) -> torch.Tensor:
        """Worker thread: the device tensor of weight ``name`` of slice ``cs`` (created once)."""
        t = cs.device_weights.get(name)
        if t is not None:
            return t
        use = cs.weights[name]
        key = (use.sha256, use.meta.dtype, use.meta.shape, use.meta.stride)
        t = self._device_weights.get(key)
        if t is None:
            t = weight_tensor(self.available[use.sha256].data, use.meta, self.device)
            self._device_weights[key] = t
        cs.device_weights[name] = t
        return t

    def _prune_device_weights(self) -> None:
        """Drop the device tensors no defined slice reads (a replaced or refused slice's). Before, a session
        kept one per (sha256, dtype, shape, stride) it ever ran until it ended: on CUDA a device copy per
        weight of every slice the UE redefined (its LRU slice ids). A request still running on a dropped
        slice keeps its tensors (in that slice's own ``device_weights``); a worker thread may add a key
        meanwhile (the next prune or the session's end drops it)."""
        if not self._device_weights:
            return
        used = {
            (u.sha256, u.meta.dtype, u.meta.shape, u.meta.stride)
            for cs in list(self.slices.values())
            for u in cs.weights.values()
        }
        for key in list(self._device_weights):
            if key not in used:
                self._device_weights.pop(key, None)

    # -- end -----------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel everything, drop partial data, unpin weights. Idempotent."""
        if self.closed:
            return
        self.closed = True
        old, self._room = self._room, asyncio.Event()
        old.set()
        await self.requests.close()
        self._uploads.abort_all()
        self.scheduler.drop(self.session_id)
        self.store.unpin_all(self.session_id)
        self.available.clear()
        self._device_weights.clear()
        for cs in self.slices.values():
            cs.device_weights.clear()
        for charge in self._slice_charges.values():
            charge.release()
        self._slice_charges.clear()
        self._sending = None
        for charge in self._output_charges.values():  # outputs never sent
            charge.release()
        self._output_charges.clear()
