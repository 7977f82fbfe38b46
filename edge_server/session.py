"""Sessions: one UE's stream of slices, weights and requests, and the executor that runs them.

A session belongs to one tenant. It holds compiled slices (by slice id), the weights it can use (pinned
in the store for its whole life, so weights uploaded for request 1 are still there for request 2), the
uploads in progress on its stream, and the requests in flight. Each request has a driver task that
runs the slice's ops in order, each as soon as its cut tensors and its weights have arrived; the
compute itself runs on the shared :class:`~edge_server.scheduler.ComputeScheduler` in bounded time
slices, so sessions share the device fairly.

Everything here runs on the server's event loop except the compute tasks (worker threads). Nothing
here knows about protobuf: inbound data arrives as validated pieces (``tensor_codec``), outbound data
leaves as events that the servicer encodes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edge_server.allocation import SessionInfo, ShareAllocator, UeProfileData
from edge_server.config import ServerConfig
from edge_server.errors import (
    EdgeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from edge_server.scheduler import ComputeScheduler
from edge_server.slices import CompiledSlice, compile_slice, weight_tensor
from edge_server.tensor_codec import TensorAssembler, TensorPiece, WeightPiece, dtype_name
from edge_server.weight_store import CommitResult, StoredWeight, Upload, WeightStore
from modelgraph import SliceError

logger = logging.getLogger(__name__)

MAX_ID_LEN = 256


class OpFailed(InvalidArgument):
    """An op of a client's slice raised while running (bad data the checks could not see)."""


def check_id(what: str, value: str, *, allow_empty: bool = False) -> str:
    if not value and not allow_empty:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_ID_LEN or not value.isprintable():
        raise InvalidArgument(f"{what} must be printable and at most {MAX_ID_LEN} characters")
    return value


# ------------------------------------------------------------------------------------------------------
# Events (what the servicer sends back)


@dataclass(slots=True)
class SliceDefined:
    slice_id: str
    graph_hash: str
    missing_weights: list[str]


@dataclass(slots=True)
class SliceRejected:
    """A DefineSlice was refused; the session goes on (requests on this slice id fail)."""

    slice_id: str
    code: str
    """grpc.StatusCode name."""
    message: str


@dataclass(slots=True)
class WeightStored:
    sha256: str
    nbytes: int
    already_present: bool


@dataclass(slots=True)
class OutputReady:
    request_id: int
    name: str
    tensor: torch.Tensor


@dataclass(slots=True)
class OpTime:
    name: str
    start_ms: float
    ms: float


@dataclass(slots=True)
class RequestTimings:
    total_ms: float = 0.0
    compute_ms: float = 0.0
    input_wait_ms: float = 0.0
    weight_wait_ms: float = 0.0
    queue_ms: float = 0.0
    ops: list[OpTime] = field(default_factory=list)


@dataclass(slots=True)
class RequestDone:
    request_id: int
    output_names: list[str]
    timings: RequestTimings


@dataclass(slots=True)
class RequestFailed:
    request_id: int
    code: str
    """grpc.StatusCode name."""
    message: str


@dataclass(slots=True)
class ShareChanged:
    share: float


@dataclass(slots=True)
class SessionEnded:
    """The client closed its side and every request finished."""


@dataclass(slots=True)
class SessionFailed:
    """A protocol error: the stream ends with this error's status."""

    error: BaseException


Event = (
    SliceDefined
    | SliceRejected
    | WeightStored
    | OutputReady
    | RequestDone
    | RequestFailed
    | ShareChanged
    | SessionEnded
    | SessionFailed
)


@dataclass(slots=True)
class SessionCounters:
    requests_done: int = 0
    requests_failed: int = 0
    bytes_received: int = 0
    chunks_dropped: int = 0
    """TensorChunks of requests that had already finished, failed or been cancelled."""
    slices_rejected: int = 0


# ------------------------------------------------------------------------------------------------------
# Uploads


class UploadTracker:
    """The weight uploads in progress on one stream (a session or an UploadWeights call).

    Chunks of one weight arrive in order, chunks of different weights may interleave. A weight is
    verified and committed when its last chunk arrives; :meth:`abort_all` (stream gone) drops the rest.
    """

    def __init__(self, store: WeightStore, tenant: str) -> None:
        self.store = store
        self.tenant = tenant
        self._uploads: dict[str, Upload] = {}

    def feed(self, piece: WeightPiece) -> CommitResult | None:
        up = self._uploads.get(piece.sha256)
        dtype = dtype_name(piece.dtype)
        if up is None:
            if piece.offset != 0:
                raise InvalidArgument(
                    f"weight {piece.sha256[:12]}: chunk at offset {piece.offset} but no upload in progress"
                )
            up = self.store.begin_upload(self.tenant, piece.sha256, piece.total_bytes, dtype=dtype, shape=piece.shape)
            self._uploads[piece.sha256] = up
        elif up.total_bytes != piece.total_bytes or up.shape != piece.shape or up.dtype != dtype:
            raise InvalidArgument(f"weight {piece.sha256[:12]}: metadata changed mid-upload")
        if not up.write(piece.offset, piece.data):
            return None
        del self._uploads[piece.sha256]
        try:
            return up.commit()
        finally:
            up.abort()

    @property
    def in_progress(self) -> int:
        return len(self._uploads)

    def abort_all(self) -> None:
        for up in self._uploads.values():
            up.abort()
        self._uploads.clear()


# ------------------------------------------------------------------------------------------------------
# Requests


SEEN_REQUEST_IDS = 65536
"""Finished request ids a session remembers (reuse refused, late chunks dropped silently); older ones
are forgotten: a chunk for one of those is answered like one for a request never begun."""


class RecentIds:
    """A set that keeps only the ``limit`` most recently added members."""

    def __init__(self, limit: int):
        self.limit = limit
        self._set: set[int] = set()
        self._order: collections.deque[int] = collections.deque()

    def add(self, x: int) -> None:
        if x in self._set:
            return
        self._set.add(x)
        self._order.append(x)
        if len(self._order) > self.limit:
            self._set.discard(self._order.popleft())

    def __contains__(self, x: object) -> bool:
        return x in self._set

    def __len__(self) -> int:
        return len(self._set)


@dataclass(eq=False)
class _Request:
    request_id: int
    slice: CompiledSlice
    t0: float
    assemblers: dict[str, TensorAssembler] = field(default_factory=dict)
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)
    env: dict[str, torch.Tensor] = field(default_factory=dict)
    staged_bytes: int = 0
    timings: RequestTimings = field(default_factory=RequestTimings)
    task: asyncio.Task | None = None
    cancelled: bool = False
    """The client cancelled it (answered CANCELLED)."""
    failure: EdgeError | None = None
    """Failed from outside its driver (a bad chunk, its id reused): answered with this error."""
    finalized: bool = False


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
        on_weight_committed: Callable[[str, str], None],
        on_request_finished: Callable[[bool], None],
        totals: ManagerCounters | None = None,
    ) -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.model_id = model_id
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.device = device
        self._on_weight_committed = on_weight_committed
        self._on_request_finished = on_request_finished
        self.slices: dict[str, CompiledSlice] = {}
        self.available: dict[str, StoredWeight] = {}
        """sha256 -> weight pinned for this session."""
        self._uploads = UploadTracker(store, tenant)
        self._requests: dict[int, _Request] = {}
        self._seen_request_ids = RecentIds(SEEN_REQUEST_IDS)
        """Request ids begun (or failed before they began) in this session: not reusable, and their late
        chunks are dropped silently. Bounded: a long-lived session would otherwise grow without end."""
        self._rejected_slices: dict[str, EdgeError] = {}
        """Slice id -> why its last DefineSlice was refused (bounded, oldest forgotten first)."""
        self._totals = totals
        self.reported_share: float | None = None
        self._device_weights: dict[tuple, torch.Tensor] = {}
        self._changed = asyncio.Event()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.counters = SessionCounters()
        self.closed = False
        self.input_closed = False
        """The client closed its side: no more cut tensors can arrive on this stream."""
        self.upload_done_reported = False

    # -- events --------------------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self._events.put_nowait(event)

    async def next_event(self) -> Event:
        return await self._events.get()

    def _notify(self) -> None:
        """Wake every request waiting for an input or a weight (they re-check readiness)."""
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    # -- slices --------------------------------------------------------------------------------------

    async def define_slice(self, slice_id: str, spec_json: bytes) -> SliceDefined:
        check_id("slice_id", slice_id, allow_empty=True)
        if slice_id not in self.slices and len(self.slices) >= self.config.max_slices_per_session:
            raise ResourceExhausted(f"a session holds at most {self.config.max_slices_per_session} slices")
        if len(spec_json) > self.config.max_message_bytes:
            raise InvalidArgument("slice spec too large")
        cs = await asyncio.to_thread(
            compile_slice,
            spec_json,
            slice_id=slice_id,
            device=self.device,
            max_tensor_bytes=self.config.max_tensor_bytes,
            max_slice_bytes=self.config.max_slice_bytes,
        )
        if self.closed:
            raise FailedPrecondition("session closed")
        self.slices[slice_id] = cs
        missing = []
        for sha in dict.fromkeys(w.sha256 for w in cs.weights.values()):
            if not self._acquire(sha):
                missing.append(sha)
        self._notify()
        return SliceDefined(slice_id, cs.graph_hash, missing)

    async def on_define_slice(self, slice_id: str, spec_json: bytes) -> SliceDefined | SliceRejected:
        """DefineSlice on an open session: a bad slice is refused alone, the session goes on.

        The id then refers to no slice (an older slice with this id is dropped, requests already
        running on it keep it); BeginRequest on it fails that request with the rejection's reason.
        """
        try:
            defined = await self.define_slice(slice_id, spec_json)
        except Exception as e:
            if not isinstance(e, EdgeError):  # a bug of ours: logged, reported as INTERNAL, session goes on
                logger.exception("session %s: DefineSlice %r failed", self.session_id[:8], slice_id[:64])
                e = EdgeError(f"internal error while checking the slice: {type(e).__name__}")
            self.counters.slices_rejected += 1
            if self._totals is not None:
                self._totals.slices_rejected += 1
            if len(slice_id) <= MAX_ID_LEN and slice_id.isprintable():
                self.slices.pop(slice_id, None)
                self._rejected_slices.pop(slice_id, None)
                self._rejected_slices[slice_id] = e
                while len(self._rejected_slices) > 4 * self.config.max_slices_per_session:
                    del self._rejected_slices[next(iter(self._rejected_slices))]
            logger.info("session %s: slice %r rejected: %s: %s", self.session_id[:8], slice_id[:64], e.code, e)
            return SliceRejected(slice_id[:MAX_ID_LEN], e.code, str(e)[:2000])
        self._rejected_slices.pop(slice_id, None)
        return defined

    def missing_weights(self) -> set[str]:
        need: set[str] = set()
        for cs in self.slices.values():
            need |= cs.needed_sha256
        return need - self.available.keys()

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
            self._notify()

    async def on_weight_piece(self, piece: WeightPiece) -> WeightStored | None:
        self.counters.bytes_received += len(piece.data)
        result = self._uploads.feed(piece)
        if result is None:
            return None
        self.weight_committed(piece.sha256, uploaded_here=True)
        self._on_weight_committed(self.tenant, piece.sha256)
        return WeightStored(result.sha256, result.nbytes, result.already_present)

    def _device_weight(self, cs: CompiledSlice, name: str) -> torch.Tensor:
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

    # -- requests ------------------------------------------------------------------------------------

    def begin_request(self, request_id: int, slice_id: str, input_names: list[str]) -> None:
        """Start a request. One that cannot start fails alone (RequestFailed); the session goes on."""
        running = self._requests.get(request_id)
        if running is not None:  # its chunks could not be told apart: the running one fails too
            self.fail_request(running, InvalidArgument(f"request id {request_id} reused while it is in flight"))
            return
        if request_id in self._seen_request_ids:
            self._reject_request(request_id, InvalidArgument(f"request id {request_id} already used in this session"))
            return
        self._seen_request_ids.add(request_id)
        try:
            cs = self._slice_for_request(request_id, slice_id, input_names)
        except EdgeError as e:
            self._reject_request(request_id, e)
            return
        req = _Request(request_id, cs, time.perf_counter())
        self._requests[request_id] = req
        req.task = asyncio.get_running_loop().create_task(
            self._drive(req), name=f"coinfer-request-{self.session_id[:8]}-{request_id}"
        )
        # A task cancelled before its first step never enters _drive: finish it here then.
        req.task.add_done_callback(lambda _t, req=req: self._finalize(req, self._stopped_event(req)))

    def _slice_for_request(self, request_id: int, slice_id: str, input_names: list[str]) -> CompiledSlice:
        cs = self.slices.get(slice_id)
        if cs is None:
            rejected = self._rejected_slices.get(slice_id)
            if rejected is not None:
                err = EdgeError(f"slice {slice_id!r} was rejected: {rejected}")
                err.code = rejected.code
                raise err
            raise FailedPrecondition(f"slice {slice_id[:64]!r} is not defined in this session")
        if len(self._requests) >= self.config.max_requests_per_session:
            raise ResourceExhausted(
                f"{len(self._requests)} requests in flight; the limit is {self.config.max_requests_per_session}"
            )
        if input_names and set(input_names) != set(cs.spec.inputs):
            raise InvalidArgument(
                f"request {request_id}: inputs {sorted(input_names)[:8]} differ from the slice's "
                f"{sorted(cs.spec.inputs)[:8]}"
            )
        return cs

    def _reject_request(self, request_id: int, error: EdgeError) -> None:
        """A request that never ran fails: answer RequestFailed; its chunks will be dropped."""
        self._seen_request_ids.add(request_id)
        logger.info("session %s request %d refused: %s: %s", self.session_id[:8], request_id, error.code, error)
        self.emit(RequestFailed(request_id, error.code, str(error)[:2000]))
        self._count_finished(False)

    def fail_request(self, req: _Request, error: EdgeError) -> None:
        """Fail a request in flight from outside its driver (bad chunk, id reused): it stops and answers
        RequestFailed with ``error``; the session goes on."""
        if req.finalized or req.failure is not None or req.cancelled:
            return
        logger.info("session %s request %d failed: %s: %s", self.session_id[:8], req.request_id, error.code, error)
        req.failure = error
        if req.task is not None:
            req.task.cancel()

    def request_error(self, request_id: int, error: EdgeError) -> None:
        """A chunk of ``request_id`` could not be decoded: fail that request (or drop it if finished)."""
        req = self._requests.get(request_id)
        if req is not None:
            self.fail_request(req, error)
        elif request_id in self._seen_request_ids:
            self._drop_chunk()
        else:
            self._reject_request(request_id, error)

    def _drop_chunk(self) -> None:
        self.counters.chunks_dropped += 1
        if self._totals is not None:
            self._totals.chunks_dropped += 1

    def cancel_request(self, request_id: int) -> None:
        """The client abandons a request: stop it; its late chunks are dropped silently."""
        req = self._requests.get(request_id)
        if req is None or req.task is None or req.failure is not None:
            return
        req.cancelled = True
        req.task.cancel()

    async def on_tensor_piece(self, piece: TensorPiece) -> None:
        self.counters.bytes_received += len(piece.data)
        req = self._requests.get(piece.request_id)
        if req is None:
            if piece.request_id in self._seen_request_ids:  # finished, failed or cancelled: chunks in flight
                self._drop_chunk()
                return
            self._reject_request(
                piece.request_id,
                NotFound(f"request {piece.request_id} was never begun (send BeginRequest before its TensorChunks)"),
            )
            self._drop_chunk()
            return
        if req.failure is not None or req.cancelled:
            self._drop_chunk()
            return
        try:
            self._add_piece(req, piece)
        except EdgeError as e:
            self.fail_request(req, e)

    def _add_piece(self, req: _Request, piece: TensorPiece) -> None:
        meta = req.slice.spec.inputs.get(piece.name)
        if meta is None:
            raise InvalidArgument(f"request {piece.request_id}: {piece.name!r} is not an input of its slice")
        asm = req.assemblers.get(piece.name)
        if asm is None:
            if piece.name in req.arrived or piece.name in req.env:
                raise InvalidArgument(f"request {piece.request_id}: tensor {piece.name!r} sent twice")
            if piece.shape != meta.shape or dtype_name(piece.dtype) != meta.dtype:
                raise InvalidArgument(
                    f"request {piece.request_id}: tensor {piece.name!r} is {list(piece.shape)} "
                    f"{dtype_name(piece.dtype)}; the slice expects {list(meta.shape)} {meta.dtype}"
                )
            self.store.staging.reserve(piece.total_bytes)
            req.staged_bytes += piece.total_bytes
            asm = TensorAssembler(piece.name, piece.dtype, piece.shape, piece.total_bytes)
            req.assemblers[piece.name] = asm
        if asm.add(piece):
            del req.assemblers[piece.name]
            req.arrived[piece.name] = asm.tensor()
            self._notify()

    def _ready(self, req: _Request, i: int) -> tuple[bool, bool]:
        """(inputs ready, weights ready) for op ``i`` of the request's slice."""
        cs = req.slice
        inputs_ok = all(r in req.arrived or r in req.env for r in cs.op_inputs[i])
        weights_ok = all(cs.weights[w].sha256 in self.available for w in cs.op_weights[i])
        return inputs_ok, weights_ok

    async def _wait_for(self, req: _Request, i: int) -> None:
        """Wait until op ``i``'s cut tensors and weights are there, accounting the wait.

        Each interval between wake-ups goes to what was missing during it: only cut tensors ->
        input wait, only weights -> weight wait. Time when both were missing goes to whichever arrived
        last (it is what held the op back); if both arrived together, to input wait.
        """
        inputs_ok, weights_ok = self._ready(req, i)
        if inputs_ok and weights_ok:
            return
        both_ms = 0.0
        last_missing = "input"
        t = time.perf_counter()
        while not (inputs_ok and weights_ok):
            if self.input_closed and not inputs_ok:
                missing = [r for r in req.slice.op_inputs[i] if r not in req.arrived and r not in req.env]
                raise FailedPrecondition(
                    f"request {req.request_id}: the stream closed before cut tensor(s) {missing[:4]} arrived"
                )
            await self._changed.wait()
            now = time.perf_counter()
            waited, t = (now - t) * 1e3, now
            if not inputs_ok and not weights_ok:
                both_ms += waited
                last_missing = "input"
            elif not inputs_ok:
                req.timings.input_wait_ms += waited
                last_missing = "input"
            else:
                req.timings.weight_wait_ms += waited
                last_missing = "weight"
            inputs_ok, weights_ok = self._ready(req, i)
        if last_missing == "weight":
            req.timings.weight_wait_ms += both_ms
        else:
            req.timings.input_wait_ms += both_ms

    def _run_batch(self, req: _Request, start: int, stop: int, inputs: dict[str, torch.Tensor]) -> int:
        """Worker thread: run ops [start, stop) (all ready) for at most a time slice; returns ops run."""
        cs = req.slice
        program = cs.program
        for name, t in inputs.items():
            req.env[name] = program.prepare_input(name, t)
        quantum = self.scheduler.quantum_ms(self.session_id, self.config.slice_time_slice_ms)
        deadline = time.perf_counter() + quantum / 1e3
        timings: list = []
        i = start
        with torch.inference_mode():
            while i < stop:
                for w in cs.op_weights[i]:
                    self._device_weight(cs, w)
                t0 = time.perf_counter()
                try:
                    program.program.run_op(i, req.env, cs.device_weights, timings=timings)
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as e:
                    # a validated slice whose op still fails on real data: the slice's fault, not ours
                    op = cs.order[i]
                    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    raise OpFailed(f"op {op.name!r} ({op.target}) failed: {type(e).__name__}: {first}") from e
                req.timings.ops.append(OpTime(timings[-1].name, (t0 - req.t0) * 1e3, timings[-1].ms))
                i += 1
                if time.perf_counter() >= deadline:
                    break
        return i - start

    def _collect_outputs(self, req: _Request) -> dict[str, torch.Tensor]:
        """Worker thread: the outputs as contiguous CPU tensors."""
        return {o: req.env[o].detach().to("cpu").contiguous() for o in req.slice.outputs}

    async def _drive(self, req: _Request) -> None:
        outcome: Event | None = None
        try:
            cs = req.slice
            n = len(cs.order)
            i = 0
            while i < n:
                await self._wait_for(req, i)
                stop = i + 1
                while stop < n and all(self._ready(req, stop)):
                    stop += 1
                inputs = {r: req.arrived.pop(r) for r in list(req.arrived)}
                res = await self.scheduler.run(
                    self.session_id, lambda i=i, stop=stop, inputs=inputs: self._run_batch(req, i, stop, inputs)
                )
                req.timings.queue_ms += res.queued_ms
                i += res.value
            # outputs that are slice inputs passed through (no op waits for them), and inputs nobody read
            await self._wait_for_passthrough(req)
            for r, t in req.arrived.items():
                req.env.setdefault(r, t)
            res = await self.scheduler.run(self.session_id, lambda: self._collect_outputs(req))
            outputs = res.value
            req.timings.total_ms = (time.perf_counter() - req.t0) * 1e3
            req.timings.compute_ms = sum(o.ms for o in req.timings.ops)
            for name, t in outputs.items():
                self.emit(OutputReady(req.request_id, name, t))
            outcome = RequestDone(req.request_id, list(outputs), req.timings)
        except asyncio.CancelledError:
            outcome = self._stopped_event(req)
            if outcome is None:  # the session is closing
                raise
        except EdgeError as e:
            if isinstance(e, OpFailed):
                logger.warning("session %s request %d: %s", self.session_id[:8], req.request_id, e)
            outcome = RequestFailed(req.request_id, e.code, str(e))
        except SliceError as e:
            outcome = RequestFailed(req.request_id, "INVALID_ARGUMENT", f"{type(e).__name__}: {e}")
        except torch.OutOfMemoryError as e:
            outcome = RequestFailed(req.request_id, "RESOURCE_EXHAUSTED", f"out of memory: {e}"[:500])
        except Exception as e:
            logger.exception("session %s request %d failed", self.session_id[:8], req.request_id)
            outcome = RequestFailed(req.request_id, "INTERNAL", f"{type(e).__name__}: {e}"[:500])
        finally:
            self._finalize(req, outcome)

    async def _wait_for_passthrough(self, req: _Request) -> None:
        """Outputs that are cut tensors read by no op: wait until they arrived (no op waited for them)."""
        spec_inputs = req.slice.spec.inputs
        need = [o for o in req.slice.outputs if o in spec_inputs]
        t = time.perf_counter()
        while any(o not in req.arrived and o not in req.env for o in need):
            if self.input_closed:
                missing = [o for o in need if o not in req.arrived and o not in req.env]
                raise FailedPrecondition(
                    f"request {req.request_id}: the stream closed before cut tensor(s) {missing[:4]} arrived"
                )
            await self._changed.wait()
        if need:
            req.timings.input_wait_ms += (time.perf_counter() - t) * 1e3

    @staticmethod
    def _stopped_event(req: _Request) -> RequestFailed | None:
        """The answer for a request stopped from outside: its failure, CANCELLED, or none (closing)."""
        if req.failure is not None:
            return RequestFailed(req.request_id, req.failure.code, str(req.failure)[:2000])
        if req.cancelled:
            return RequestFailed(req.request_id, "CANCELLED", "cancelled by the client")
        return None

    def _finalize(self, req: _Request, outcome: Event | None) -> None:
        """Answer (if ``outcome``), free the request's data and count it. Runs once per request."""
        if req.finalized:
            return
        req.finalized = True
        if outcome is not None and not self.closed:
            self.emit(outcome)
        self._finish(req)
        self._count_finished(isinstance(outcome, RequestDone))

    def _count_finished(self, ok: bool) -> None:
        self._on_request_finished(ok)
        if ok:
            self.counters.requests_done += 1
        else:
            self.counters.requests_failed += 1

    def _finish(self, req: _Request) -> None:
        if self._requests.pop(req.request_id, None) is not None and req.staged_bytes:
            self.store.staging.release(req.staged_bytes)
            req.staged_bytes = 0
        req.assemblers.clear()
        req.arrived.clear()
        req.env.clear()

    @property
    def requests_in_flight(self) -> int:
        return len(self._requests)

    def close_input(self) -> None:
        """The client half-closed: requests still missing a cut tensor fail; those waiting for weights
        keep waiting (weights may still come through UploadWeights with this session's id)."""
        self.input_closed = True
        self._notify()

    async def drain(self) -> None:
        """Wait for every request in flight (after the client closed its side)."""
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel everything, drop partial data, unpin weights. Idempotent."""
        if self.closed:
            return
        self.closed = True
        tasks = [r.task for r in self._requests.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for req in list(self._requests.values()):
            self._finalize(req, None)
        self._uploads.abort_all()
        self.scheduler.drop(self.session_id)
        self.store.unpin_all(self.session_id)
        self.available.clear()
        self._device_weights.clear()
        for cs in self.slices.values():
            cs.device_weights.clear()


# ------------------------------------------------------------------------------------------------------
# Manager


@dataclass(slots=True)
class ManagerCounters:
    sessions_opened: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    chunks_dropped: int = 0
    slices_rejected: int = 0


class SessionManager:
    """Opens, finds and closes sessions; routes weight commits to the sessions of their tenant."""

    def __init__(
        self,
        config: ServerConfig,
        store: WeightStore,
        scheduler: ComputeScheduler,
        allocator: ShareAllocator,
        device: torch.device,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = scheduler
        self.allocator = allocator
        self.device = device
        self.sessions: dict[str, Session] = {}
        self.counters = ManagerCounters()
        self._tasks: set[asyncio.Task] = set()

    async def open(self, tenant: str, model_id: str, profile: UeProfileData | None = None) -> Session:
        check_id("tenant", tenant)
        check_id("model_id", model_id, allow_empty=True)
        if len(self.sessions) >= self.config.max_sessions:
            raise ResourceExhausted(f"{len(self.sessions)} sessions open; the limit is {self.config.max_sessions}")
        sid = uuid.uuid4().hex
        session = Session(
            sid,
            tenant,
            model_id,
            config=self.config,
            store=self.store,
            scheduler=self.scheduler,
            device=self.device,
            on_weight_committed=self.weight_committed,
            on_request_finished=self._request_finished,
            totals=self.counters,
        )
        self.sessions[sid] = session
        self.counters.sessions_opened += 1
        info = SessionInfo(sid, tenant, model_id, weight=(profile.weight or 1.0) if profile else 1.0)
        if profile is not None:
            info.extra["profile"] = profile
        try:  # an allocator may take a while (ARA re-plans): off the event loop
            self.apply_shares(await asyncio.to_thread(self.allocator.on_join, info))
        except BaseException:
            self.sessions.pop(sid, None)
            self.allocator.on_leave(sid)
            raise
        logger.info("session %s opened (tenant %s, model %s)", sid[:8], tenant, model_id or "-")
        return session

    def get(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound(f"no open session {session_id[:64]!r}")
        return s

    def get_for_tenant(self, session_id: str, tenant: str) -> Session:
        s = self.get(session_id)
        if s.tenant != tenant:
            raise PermissionDenied("the session belongs to another tenant")
        return s

    async def close(self, session: Session) -> None:
        await session.close()
        if self.sessions.pop(session.session_id, None) is not None:
            self.apply_shares(await asyncio.to_thread(self.allocator.on_leave, session.session_id))
            c = session.counters
            logger.info(
                "session %s closed (%d requests done, %d failed, %.1f MB received)",
                session.session_id[:8],
                c.requests_done,
                c.requests_failed,
                c.bytes_received / 1e6,
            )

    def weight_committed(self, tenant: str, sha: str) -> None:
        """Make a newly committed weight available to the tenant's sessions that wait for it."""
        for s in list(self.sessions.values()):
            if s.tenant != tenant:
                continue
            s.weight_committed(sha, uploaded_here=False)
            self.check_upload_done(s)

    def check_upload_done(self, s: Session) -> None:
        """Tell the allocator once when a session has every weight of its slices."""
        if not s.upload_done_reported and s.slices and not s.missing_weights():
            s.upload_done_reported = True
            task = asyncio.get_running_loop().create_task(self._upload_done(s.session_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _upload_done(self, session_id: str) -> None:
        try:
            shares = await asyncio.to_thread(self.allocator.on_upload_done, session_id)
        except Exception:
            logger.exception("allocator on_upload_done failed")
            return
        self.apply_shares(shares)

    def apply_shares(self, shares: dict[str, float]) -> None:
        """Give the scheduler new shares and tell every session whose share changed."""
        self.scheduler.set_shares(shares)
        for sid, share in shares.items():
            s = self.sessions.get(sid)
            if s is None or s.closed:
                continue
            if s.reported_share is not None and abs(s.reported_share - share) > 1e-9:
                s.emit(ShareChanged(share))
            s.reported_share = share

    def _request_finished(self, ok: bool) -> None:
        if ok:
            self.counters.requests_done += 1
        else:
            self.counters.requests_failed += 1

    async def close_all(self) -> None:
        for s in list(self.sessions.values()):
            await self.close(s)
