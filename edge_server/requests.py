"""The requests of one session: their cut tensors, their driver tasks, and running their ops.

Each request has a driver task that runs the slice's ops in order, each as soon as its cut tensors and
its weights have arrived; the compute itself runs on the shared
:class:`~edge_server.scheduler.ComputeScheduler` in bounded time slices, so sessions share the device
fairly. Everything here runs on the server's event loop except :func:`run_batch` and :func:`collect_outputs`
(worker threads, which touch only their own request's tensors and the session's weights).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from edge_server.config import ServerConfig
from edge_server.errors import EdgeError, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from edge_server.events import Event, OutputReady, ProgressRound, RequestDone, RequestFailed, RequestProgress
from edge_server.ids import RecentIds
from edge_server.memory import Bounds, Reservation
from edge_server.precision import GATE, served_precision
from edge_server.scheduler import ComputeScheduler
from edge_server.slices import CompiledSlice
from edge_server.tensor_codec import TensorAssembler, TensorPiece, dtype_name
from edge_server.weight_store import StagingAccount, StoredWeight
from modelgraph import SliceError
from modelgraph.tensors import from_wire
from protos.values import OpTime, ServerTimings

logger = logging.getLogger(__name__)

SEEN_REQUEST_IDS = 65536
"""Finished request ids a session remembers (reuse refused, late chunks dropped silently); older ones
are forgotten: a chunk for one of those is answered like one for a request never begun."""


class OpFailed(InvalidArgument):
    """An op of a client's slice raised while running (bad data the checks could not see)."""


class SessionWeights(Protocol):
    """What requests need of their session's weights."""

    available: dict[str, StoredWeight]
    """sha256 -> weight pinned for the session (grows as uploads commit)."""

    def device_weight(self, cs: CompiledSlice, name: str) -> torch.Tensor:
        """Worker thread: the device tensor of weight ``name`` of slice ``cs``."""


@dataclass(slots=True)
class RequestCounters:
    """Owned and updated by one :class:`RequestRunner` (read by stats)."""

    requests_done: int = 0
    requests_failed: int = 0
    chunks_dropped: int = 0
    """TensorChunks of requests that had already finished, failed or been cancelled."""


@dataclass(slots=True)
class _Timings:
    """Timings of a request while it runs (frozen into :class:`ServerTimings` when it is done)."""

    input_wait_ms: float = 0.0
    weight_wait_ms: float = 0.0
    queue_ms: float = 0.0
    ops: list[OpTime] = field(default_factory=list)
    validation_ms: float = 0.0
    """The slice's DefineSlice wall time, on the first request of that definition (else 0)."""

    def freeze(self, total_ms: float) -> ServerTimings:
        return ServerTimings(
            total_ms=total_ms,
            compute_ms=sum(o.ms for o in self.ops),
            input_wait_ms=self.input_wait_ms,
            weight_wait_ms=self.weight_wait_ms,
            queue_ms=self.queue_ms,
            ops=tuple(self.ops),
            validation_ms=self.validation_ms,
        )


@dataclass(eq=False)
class _Request:
    request_id: int
    slice: CompiledSlice
    t0: float
    assemblers: dict[str, TensorAssembler] = field(default_factory=dict)
    arrived: dict[str, torch.Tensor] = field(default_factory=dict)
    env: dict[str, torch.Tensor] = field(default_factory=dict)
    area_bytes: int = 0
    staged_bytes: int = 0
    """Bytes its input tensors declared, charged to the tenant's staging, each at least ``MIN_WEIGHT_CHARGE`` (the
    server-wide area, ``area_bytes``: each tensor's ``MIN_AREA_CHARGE`` when it begins and its assembler's
    ``charged`` as bytes arrive; session 22, break39 F1)."""
    timings: _Timings = field(default_factory=_Timings)
    task: asyncio.Task | None = None
    cancelled: bool = False
    """The client cancelled it (answered CANCELLED)."""
    failure: EdgeError | None = None
    """Failed from outside its driver (a bad chunk, its id reused): answered with this error."""
    finalized: bool = False
    abandoned: bool = False
    """Its session is closing (the client went away)."""
    reservation: Reservation | None = None
    """Its intermediates' peak held against the server's memory budget from begin to end (a request
    waiting for a cut tensor holds it too: waiting requests are bounded by the budget)."""
    late_ops: int = 0
    """Ops that finished after it was cancelled, failed from outside or abandoned (at most one)."""
    step: concurrent.futures.Future | None = None
    """Its compute step last submitted to the scheduler."""
    reused: bool = False
    """A second BeginRequest named its id while it was in flight (refused): copies of a tensor it already
    has are dropped, not a failure (they are most likely that BeginRequest's chunks)."""
    waiting: bool = False
    """Waiting for the client (a cut tensor, a weight, room for its outputs), not computing."""
    op_timings: bool = False
    """The client asked for its per-op timings on the wire (``RequestDone.with_ops``)."""
    matmul_precision: str = "highest"
    """The UE's float32 matmul precision (``BeginRequest.matmul_precision``): its ops run under it (``run_batch``)."""
    input_bytes: int = 0
    """Bytes of its cut tensors received so far (its progress reports)."""
    reported: tuple[int, int] = (0, 0)
    """(ops run, input bytes) in its last ``RequestProgress`` sent (none yet: nothing moved)."""

    def progress(self) -> tuple[int, int]:
        """(ops run, cut-tensor bytes received) now. The ops count is the worker thread's list of op timings,
        read on the event loop: a length, safe under the GIL, at most one op behind."""
        return len(self.timings.ops), self.input_bytes

    @property
    def stopped(self) -> bool:
        """Cancelled, failed from outside or abandoned: a running batch stops at its next op boundary."""
        return self.cancelled or self.failure is not None or self.abandoned


def _ready(req: _Request, i: int, available: dict[str, StoredWeight]) -> tuple[bool, bool]:
    """(inputs ready, weights ready) for op ``i`` of the request's slice."""
    cs = req.slice
    inputs_ok = all(r in req.arrived or r in req.env for r in cs.op_inputs[i])
    weights_ok = all(cs.weights[w].sha256 in available for w in cs.op_weights[i])
    return inputs_ok, weights_ok


def _closed_before(req: _Request, missing: list[str]) -> FailedPrecondition:
    return FailedPrecondition(f"request {req.request_id}: the stream closed before cut tensor(s) {missing[:4]} arrived")


class Arrivals:
    """Requests waiting for their data: a signal raised whenever a cut tensor or a weight arrives, and
    whether the client closed its side (then no more cut tensors can come)."""

    def __init__(self, weights: SessionWeights) -> None:
        self.weights = weights
        self._changed = asyncio.Event()
        self.input_closed = False
        """The client closed its side: no more cut tensors can arrive on this stream."""

    def notify(self) -> None:
        """Wake every request waiting for an input or a weight (they re-check readiness)."""
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def close_input(self) -> None:
        self.input_closed = True
        self.notify()

    def ready(self, req: _Request, i: int) -> tuple[bool, bool]:
        return _ready(req, i, self.weights.available)

    async def wait_for(self, req: _Request, i: int) -> None:
        """Wait until op ``i``'s cut tensors and weights are there, accounting the wait.

        Each interval between wake-ups goes to what was missing during it: only cut tensors ->
        input wait, only weights -> weight wait. Time when both were missing goes to whichever arrived
        last (it is what held the op back); if both arrived together, to input wait.
        Raises FailedPrecondition if the client closed its side while a cut tensor is missing.
        """
        inputs_ok, weights_ok = self.ready(req, i)
        if inputs_ok and weights_ok:
            return
        both_ms = 0.0
        last_missing = "input"
        t = time.perf_counter()
        while not (inputs_ok and weights_ok):
            if self.input_closed and not inputs_ok:
                raise _closed_before(
                    req, [r for r in req.slice.op_inputs[i] if r not in req.arrived and r not in req.env]
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
            inputs_ok, weights_ok = self.ready(req, i)
        if last_missing == "weight":
            req.timings.weight_wait_ms += both_ms
        else:
            req.timings.input_wait_ms += both_ms

    async def wait_for_passthrough(self, req: _Request) -> None:
        """Outputs that are cut tensors read by no op: wait until they arrived (no op waited for them)."""
        spec_inputs = req.slice.spec.inputs
        need = [o for o in req.slice.outputs if o in spec_inputs]
        t = time.perf_counter()
        while any(o not in req.arrived and o not in req.env for o in need):
            if self.input_closed:
                raise _closed_before(req, [o for o in need if o not in req.arrived and o not in req.env])
            await self._changed.wait()
        if need:
            req.timings.input_wait_ms += (time.perf_counter() - t) * 1e3


def run_batch(
    req: _Request,
    start: int,
    stop: int,
    inputs: dict[str, torch.Tensor],
    weights: SessionWeights,
    quantum_ms: float,
    yield_now: Callable[[], bool] | None = None,
) -> int:
    """Worker thread: run ops [start, stop) (all ready) of ``req`` for at most ``quantum_ms``, and only
    one op once ``yield_now()`` says other work waits for the worker; returns the number of ops run.
    Raises OpFailed when an op fails on the client's data."""
    cs = req.slice
    program = cs.program
    for name, t in inputs.items():
        req.env[name] = program.prepare_input(name, t)
    deadline = time.perf_counter() + quantum_ms / 1e3
    timings: list = []
    i = start
    with torch.inference_mode(), GATE.hold(req.matmul_precision, program.program.device):
        while i < stop:
            if req.stopped:  # cancelled while this batch ran: stop at the op boundary
                break
            for w in cs.op_weights[i]:
                weights.device_weight(cs, w)
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
            finally:
                if req.stopped:
                    req.late_ops += 1
            req.timings.ops.append(OpTime(timings[-1].name, (t0 - req.t0) * 1e3, timings[-1].ms))
            i += 1
            if time.perf_counter() >= deadline or (yield_now is not None and yield_now()):
                break
    return i - start


def collect_outputs(req: _Request) -> dict[str, torch.Tensor]:
    """Worker thread: the outputs as contiguous CPU tensors."""
    return {o: req.env[o].detach().to("cpu").contiguous() for o in req.slice.outputs}


def outputs_in_place(req: _Request) -> dict[str, torch.Tensor] | None:
    """The outputs as :func:`collect_outputs` gives them when that needs no copy (all already contiguous
    CPU tensors: a detached view each), else None. The event loop calls it: a request whose outputs are
    ready as they are then needs no second trip to a compute worker and back (two hand-offs that each
    wait for the GIL when other work holds it)."""
    env = req.env
    out = {}
    for o in req.slice.outputs:
        t = env[o]
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        out[o] = t.detach()
    return out


def check_input_names(request_id: int, names: Sequence[str], cs: CompiledSlice) -> None:
    """A BeginRequest's ``input_names`` against its slice: none (the client does not say), or each of the
    slice's inputs exactly once, in any order.

    Raises InvalidArgument naming the counts, or the first names that differ. The count is compared
    first (``len`` of the message's repeated field: no name is read), so the work is bounded by the
    slice's input count whatever the message carries: a 5 MB BeginRequest of 2.5M names held the event
    loop ~150 ms in copies, sets and sorts before (and a name repeated passed as one).
    """
    n, want = len(names), len(cs.spec.inputs)
    if n == 0:
        return
    if n != want:
        raise InvalidArgument(
            f"request {request_id}: {n} input names; slice {cs.slice_id[:64]!r} takes {want} "
            f"input{'s' if want != 1 else ''} (name each once, or none)"
        )
    got = set(names)
    if got != cs.spec.inputs.keys():
        extra, missing = sorted(got - cs.spec.inputs.keys())[:4], sorted(cs.spec.inputs.keys() - got)[:4]
        raise InvalidArgument(
            f"request {request_id}: input names differ from slice {cs.slice_id[:64]!r}'s inputs: "
            f"not inputs {[e[:64] for e in extra]}, missing {[m[:64] for m in missing]}"
        )


class RequestRunner:
    """The requests in flight of one session (event-loop side; see the module docstring)."""

    def __init__(
        self,
        session_id: str,
        *,
        config: ServerConfig,
        scheduler: ComputeScheduler,
        staging: StagingAccount,
        weights: SessionWeights,
        emit: Callable[[Event], None],
        admit: Callable[[], None] | None = None,
        tenant: str = "",
        bounds: Bounds | None = None,
        output_room: Callable[[], Awaitable[None]] | None = None,
        on_finished: Callable[[str | None, ServerTimings | None], None] | None = None,
        stream_quiet: Callable[[], bool] | None = None,
    ) -> None:
        self.session_id = session_id
        self._stream_quiet = stream_quiet
        """True when nothing waits to be sent to the client: a round of progress reports is queued only then (any
        other message shows the stream alive), and the session drops it if an answer was queued behind it before the
        stream took it."""
        self.progress_interval_s = 0.0
        """Report requests in flight at most this often (rounds of ``RequestProgress``, :meth:`_report_progress`);
        0: never (the client did not ask, or the server's ``progress_interval_ms`` is 0)."""
        self._reporter: asyncio.Task | None = None
        """The task queueing rounds of progress reports while requests are in flight (one per session)."""
        self._moved = asyncio.Event()
        """Set when a request may have moved where the reporter would not look otherwise: bytes of a cut tensor
        arrived, a request begins, starts computing (its ops then move on a worker thread) or ends. The reporter
        sleeps on it while every request in flight waits for the client: before (session 24) it looked at them every
        interval, 60 sessions of 16 requests waiting for their cut tensors cost 0.34-0.38 server CPU s in 20 s (0.02
        without reports: ~67 us per session and tick; session 24's tester, F3); now 0.03."""
        self._admit = admit
        """Raises ResourceExhausted when the tenant may not start another request (its quota)."""
        self._on_finished = on_finished
        """Told (status name or None on success; the request's server timings when it ran to the end, else
        None) when a request is answered (metrics, and the allocator's check of the UE's claimed costs)."""
        self.tenant = tenant
        self.bounds = bounds or Bounds()
        self._output_room = output_room
        self.config = config
        self.scheduler = scheduler
        self.staging = staging
        self.weights = weights
        self._emit = emit
        self.counters = RequestCounters()
        self._requests: dict[int, _Request] = {}
        self._seen = RecentIds(SEEN_REQUEST_IDS)
        """Request ids begun (or failed before they began): not reusable, and their late chunks are
        dropped silently. Bounded: a long-lived session would otherwise grow without end."""
        self.arrivals = Arrivals(weights)
        self.closed = False
        self.outputs_in_done = False
        """The client reads ``RequestDone.outputs`` (``OpenSession.outputs_in_done``): outputs that fit in
        ``config.max_chunk_bytes`` together go inside the RequestDone, not as TensorChunks before it."""

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    @property
    def computing(self) -> bool:
        """Some request in flight is computing (or about to), not waiting for the client's data or for
        room for its outputs (the idle timeout spares a session only then)."""
        return any(not r.waiting for r in self._requests.values())

    def notify(self) -> None:
        """A weight arrived: wake the requests waiting for data."""
        self.arrivals.notify()

    # -- starting, failing, cancelling ---------------------------------------------------------------

    def begin(
        self,
        request_id: int,
        resolve: Callable[[], CompiledSlice],
        input_names: Sequence[str],
        validation_ms: Callable[[], float] | None = None,
        *,
        op_timings: bool = False,
        matmul_precision: str = "highest",
    ) -> bool:
        """Start a request on the slice ``resolve()`` returns (it raises EdgeError if there is none).
        One that cannot start fails alone (RequestFailed); the session goes on. ``validation_ms()``, called
        once the request starts, gives its ``ServerTimings.validation_ms`` (the slice's DefineSlice time
        when this is its first request, else 0). ``op_timings``: its RequestDone carries per-op timings.
        ``matmul_precision``: the float32 matmul precision its ops run under (checked by the decoder,
        ``edge_server.precision``).
        ``input_names`` (``BeginRequest.input_names``): empty, or each of the slice's inputs once
        (:func:`check_input_names`). Returns False when this BeginRequest names a request in flight: it is
        refused (one RequestFailed, INVALID_ARGUMENT) and the request in flight goes on (its inline tensors
        are not to be fed; later copies of tensors the running one already has are dropped). Before, the
        request in flight failed too and never got its own answer."""
        running = self._requests.get(request_id)
        if running is not None:
            running.reused = True
            self._reject(request_id, InvalidArgument(
                f"request id {request_id} reused while it is in flight: this BeginRequest is refused, the "
                "request in flight goes on"))
            return False
        if request_id in self._seen:
            self._reject(request_id, InvalidArgument(f"request id {request_id} already used in this session"))
            return True
        self._seen.add(request_id)
        try:
            cs = resolve()
            if len(self._requests) >= self.config.max_requests_per_session:
                raise ResourceExhausted(
                    f"{len(self._requests)} requests in flight; the limit is {self.config.max_requests_per_session}"
                )
            if self._admit is not None:
                self._admit()
            check_input_names(request_id, input_names, cs)
            peak = cs.cost.peak_bytes if cs.cost is not None else 0
            reservation = self.bounds.memory.reserve(self.tenant, peak, f"request {request_id}")
        except EdgeError as e:
            self._reject(request_id, e)
            return True
        req = _Request(request_id, cs, time.perf_counter(), reservation=reservation, op_timings=op_timings,
                       matmul_precision=served_precision(matmul_precision, cs.batched_products))
        if validation_ms is not None:
            req.timings.validation_ms = validation_ms()
        self._requests[request_id] = req
        req.task = asyncio.get_running_loop().create_task(
            self._drive(req), name=f"coinfer-request-{self.session_id[:8]}-{request_id}"
        )
        # A task cancelled before its first step never enters _drive: finish it here then.
        req.task.add_done_callback(lambda _t, req=req: self._finalize(req, self._stopped_event(req)))
        self._moved.set()
        if self.progress_interval_s > 0 and (self._reporter is None or self._reporter.done()):
            self._reporter = asyncio.get_running_loop().create_task(
                self._report_progress(), name=f"coinfer-progress-{self.session_id[:8]}")
        return True

    # -- progress reports ----------------------------------------------------------------------------

    async def _report_progress(self) -> None:
        """Queue rounds of progress reports while requests are in flight; ends when none is.

        A round (:class:`~edge_server.events.ProgressRound`) is queued when a request moved since its last report
        and nothing else waits to be sent, at most every ``progress_interval_s``, counted from when the stream
        wrote the previous round to the transport (or dropped it): a session has at most one round waiting, never
        a queue of them, and its values are read when the stream takes it (the latest; see ``Session.next_event``).
        Whether a request moved is looked at once per interval while one of them computes (its ops run on a worker
        thread, which tells nobody); while every request waits for the client (its cut tensors, weights, room for
        its outputs) none can move unseen, so the task sleeps until :attr:`_moved` says something happened: a
        session whose requests all wait costs no wake-up.

        Written to the transport is not read by the client: gRPC's flow-control window (grown by its bandwidth
        probe to ~4 MiB on loopback) takes ~10^5 reports unread, so a client that stops reading still finds one
        round per interval it was away ahead of its answers (one message each with ``OpenSession.batch_progress``,
        else one per request that moved), not one per request and interval and not a constant."""
        interval = self.progress_interval_s
        while True:
            await asyncio.sleep(interval)
            while True:
                if not self._requests or self.closed:
                    return
                self._moved.clear()
                if any(r.progress() != r.reported for r in self._requests.values() if not r.stopped):
                    break
                if any(not r.waiting for r in self._requests.values()):
                    await asyncio.sleep(interval)  # computing: its ops may move unseen
                else:
                    await self._moved.wait()  # all wait for the client: nothing moves unseen
            if self._stream_quiet is not None and not self._stream_quiet():
                continue
            due = ProgressRound(self._progress_round)
            self._emit(due)
            await due.written.wait()

    def _progress_round(self) -> list[RequestProgress]:
        """A ``RequestProgress`` of each request in flight that moved since its last report, with its counts now
        (they become its last report's). Called when the stream takes a :class:`ProgressRound` to send it."""
        out = []
        for req in self._requests.values():
            if req.finalized or req.stopped:
                continue
            now = req.progress()
            if now != req.reported:
                req.reported = now
                out.append(RequestProgress(req.request_id, now[0], len(req.slice.order), now[1]))
        return out

    def _reject(self, request_id: int, error: EdgeError) -> None:
        """A request that never ran fails: answer RequestFailed; its chunks will be dropped."""
        self._seen.add(request_id)
        logger.info("session %s request %d refused: %s: %s", self.session_id[:8], request_id, error.code, error)
        self._emit(RequestFailed(request_id, error.code, str(error)[:2000]))
        self.counters.requests_failed += 1
        if self._on_finished is not None:
            self._on_finished(error.code, None)

    def fail(self, req: _Request, error: EdgeError) -> None:
        """Fail a request in flight from outside its driver (bad chunk, id reused): it stops and answers
        RequestFailed with ``error``; the session goes on."""
        if req.finalized or req.failure is not None or req.cancelled:
            return
        logger.info("session %s request %d failed: %s: %s", self.session_id[:8], req.request_id, error.code, error)
        req.failure = error
        if req.task is not None:
            req.task.cancel()

    def chunk_error(self, request_id: int, error: EdgeError) -> None:
        """A chunk of ``request_id`` could not be decoded: fail that request (or drop it if finished)."""
        req = self._requests.get(request_id)
        if req is not None:
            self.fail(req, error)
        elif request_id in self._seen:
            self.counters.chunks_dropped += 1
        else:
            self._reject(request_id, error)

    def cancel(self, request_id: int) -> None:
        """The client abandons a request: stop it; its late chunks are dropped silently."""
        req = self._requests.get(request_id)
        if req is None or req.task is None or req.failure is not None:
            return
        req.cancelled = True
        req.task.cancel()

    # -- cut tensors ---------------------------------------------------------------------------------

    def on_tensor_piece(self, piece: TensorPiece) -> None:
        """One chunk of a cut tensor: assembled into its request; a bad one fails that request only."""
        req = self._requests.get(piece.request_id)
        if req is None:
            if piece.request_id not in self._seen:
                self._reject(
                    piece.request_id,
                    NotFound(f"request {piece.request_id} was never begun (send BeginRequest before its TensorChunks)"),
                )
            # finished, failed or cancelled (chunks in flight), or just refused: dropped
            self.counters.chunks_dropped += 1
            return
        if req.failure is not None or req.cancelled:
            self.counters.chunks_dropped += 1
            return
        try:
            self._add_piece(req, piece)
        except EdgeError as e:
            self.fail(req, e)

    def _add_piece(self, req: _Request, piece: TensorPiece) -> None:
        meta = req.slice.spec.inputs.get(piece.name)
        if meta is None:
            raise InvalidArgument(f"request {piece.request_id}: {piece.name!r} is not an input of its slice")
        asm = req.assemblers.get(piece.name)
        if asm is None:
            if piece.name in req.arrived or piece.name in req.env:
                if req.reused:  # most likely the refused second BeginRequest's copy: the request goes on
                    self.counters.chunks_dropped += 1
                    return
                raise InvalidArgument(f"request {piece.request_id}: tensor {piece.name!r} sent twice")
            # dense, or (a layout with stride-0 dimensions) its compact base (``modelgraph.tensors.wire_shape``:
            # ``prepare_input`` expands it back)
            if (piece.shape != meta.shape and piece.shape != meta.wire_shape) or dtype_name(piece.dtype) != meta.dtype:
                compact = f" (or compact {list(meta.wire_shape)})" if meta.wire_shape != meta.shape else ""
                raise InvalidArgument(
                    f"request {piece.request_id}: tensor {piece.name!r} is {list(piece.shape)} "
                    f"{dtype_name(piece.dtype)}; the slice expects {list(meta.shape)}{compact} {meta.dtype}"
                )
            # at least its bookkeeping in the tenant's staging and the area (break39 F1), given back at the end
            staged, area = self.staging.declare_tensor(piece.total_bytes)
            req.staged_bytes += staged
            req.area_bytes += area
            try:
                asm = TensorAssembler(piece.name, piece.dtype, piece.shape, piece.total_bytes,
                                      charge=self._area_charge(req))
            except BaseException:
                self.staging.undeclare(staged)
                self.staging.release_area(area)
                req.staged_bytes -= staged
                req.area_bytes -= area
                raise
            req.assemblers[piece.name] = asm
        req.input_bytes += len(piece.data)
        self._moved.set()
        if asm.add(piece):
            del req.assemblers[piece.name]
            req.arrived[piece.name] = asm.tensor()
            self.arrivals.notify()

    def _area_charge(self, req: _Request) -> Callable[[int], None]:
        """Charge a request's arriving input bytes to the server-wide staging area (``req.area_bytes``)."""

        def charge(n: int) -> None:
            self.staging.reserve_area(n)
            req.area_bytes += n

        return charge

    # -- running -------------------------------------------------------------------------------------

    async def _drive(self, req: _Request) -> None:
        outcome: Event | None = None
        try:
            n = len(req.slice.order)
            i = 0
            while i < n:
                req.waiting = True
                await self.arrivals.wait_for(req, i)
                stop = i + 1
                while stop < n and all(self.arrivals.ready(req, stop)):
                    stop += 1
                if self._output_room is not None:  # flow control: the client reads its outputs first
                    t_room = time.perf_counter()
                    await self._output_room()
                    req.timings.queue_ms += (time.perf_counter() - t_room) * 1e3
                req.waiting = False
                self._moved.set()  # computing: the reporter looks at it every interval
                inputs = {r: req.arrived.pop(r) for r in list(req.arrived)}
                req.step = self.scheduler.submit(
                    self.session_id, lambda i=i, stop=stop, inputs=inputs: self._run_batch(req, i, stop, inputs)
                )
                res = await asyncio.wrap_future(req.step)
                req.timings.queue_ms += res.queued_ms
                i += res.value
            # outputs that are slice inputs passed through (no op waits for them), and inputs nobody read
            req.waiting = True
            await self.arrivals.wait_for_passthrough(req)
            req.waiting = False
            spec_inputs = req.slice.spec.inputs
            for r, t in req.arrived.items():  # (a compact one expanded back: an output has its logical shape)
                req.env.setdefault(r, from_wire(t, spec_inputs[r]))
            outputs = outputs_in_place(req)
            if outputs is None:  # a copy (to the CPU, or to make one contiguous): on a worker
                outputs = (await self.scheduler.run(self.session_id, lambda: collect_outputs(req))).value
            timings = req.timings.freeze((time.perf_counter() - req.t0) * 1e3)
            if self.outputs_in_done and sum(t.nbytes for t in outputs.values()) <= self.config.max_chunk_bytes:
                # one message for the outputs and the answer (the client said it reads them there)
                outcome = RequestDone(req.request_id, list(outputs), timings, outputs, req.op_timings)
            else:
                for name, t in outputs.items():
                    self._emit(OutputReady(req.request_id, name, t))
                outcome = RequestDone(req.request_id, list(outputs), timings, None, req.op_timings)
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

    def _run_batch(self, req: _Request, start: int, stop: int, inputs: dict[str, torch.Tensor]) -> int:
        """Worker thread: :func:`run_batch` with this session's current time slice."""
        quantum = self.scheduler.quantum_ms(self.session_id, self.config.slice_time_slice_ms)
        return run_batch(
            req, start, stop, inputs, self.weights, quantum, lambda: self.scheduler.contended(self.session_id)
        )

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
        self._moved.set()  # the reporter ends once none is in flight
        if req.reservation is not None:
            req.reservation.release()
        if req.stopped:  # count the ops of its running step that finished after the stop, once it ends
            step = req.step
            if step is not None and not step.done():
                step.add_done_callback(lambda _f: self.bounds.count_stopped(req.late_ops))
            else:
                self.bounds.count_stopped(req.late_ops)
        if outcome is not None and not self.closed:
            self._emit(outcome)
        if self._requests.pop(req.request_id, None) is not None:
            if req.staged_bytes:
                self.staging.undeclare(req.staged_bytes)
                req.staged_bytes = 0
            if req.area_bytes:
                self.staging.release_area(req.area_bytes)
                req.area_bytes = 0
        req.assemblers.clear()
        req.arrived.clear()
        req.env.clear()
        if isinstance(outcome, RequestDone):
            self.counters.requests_done += 1
        else:
            self.counters.requests_failed += 1
        if self._on_finished is not None and outcome is not None:
            if isinstance(outcome, RequestDone):
                self._on_finished(None, outcome.timings)
            else:
                self._on_finished(outcome.code, None)

    # -- ending --------------------------------------------------------------------------------------

    def close_input(self) -> None:
        """The client half-closed: requests still missing a cut tensor fail; those waiting for weights
        keep waiting (weights may still come through UploadWeights with this session's id)."""
        self.arrivals.close_input()

    async def drain(self) -> None:
        """Wait for every request in flight (after the client closed its side)."""
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel every request and drop its data (no answers are sent). Idempotent."""
        self.closed = True
        if self._reporter is not None:
            self._reporter.cancel()
        for r in self._requests.values():
            r.abandoned = True
        tasks = [r.task for r in self._requests.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for req in list(self._requests.values()):
            self._finalize(req, None)
