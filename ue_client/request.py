"""The request path of one device client: run a planned request locally, or split over the session.

Splits are made of the model's *head* (``modelgraph.pinning``): ops off the server's allowlist and
their descendants always run here, after the head (``model.finish_tail``), so they pin only
themselves. A split request defines its slice on the session (at most ``MAX_SLICES`` ids, LRU), queues the
weights it needs, runs the UE prefix while each cut tensor goes on the uplink as soon as it exists,
waits for the server's outputs while the request is on time or progressing (``ue_client.deadline``),
and completes locally on any server failure (unless fallback is off). Measured times calibrate the
cost model; the uplink and send-CPU samples feed the probe's estimates.

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from typing import Any

import torch

from modelgraph import Split, make_slice, tensor_bytes
from modelgraph.errors import OpExecutionError
from modelgraph.pinning import PinnedTail
from modelgraph.tensors import TensorMeta, compact_for_wire, restore_layout, tensor_from_bytes, to_dtype
from ue_client import deadline, planning, wire
from ue_client import model as local
from ue_client.calibration import MIN_CALIBRATION_MS, CostModel
from ue_client.connection import Connection
from ue_client.deadline import patience_of
from ue_client.decisions import DecisionCache
from ue_client.errors import DeadlineExceeded, ProtocolError, RequestFailed, ServerError, ServerUnavailable
from ue_client.model import DeferredCheck, PreparedModel
from ue_client.options import ClientOptions
from ue_client.probing import LinkProbe
from ue_client.refusals import PERMANENT, RefusedSlices
from ue_client.report import RequestReport
from ue_client.session import FOREGROUND, UplinkItem
from ue_client.uploads import UploadScheduler

log = logging.getLogger(__name__)

MAX_SLICES = 4
HAND_OFF_WAIT_S = 0.05
"""How long a split request waits for its cut tensors to be handed to gRPC before it runs the call's deferred weight
check anyway (a paced uplink hands them over slowly, and needs little CPU meanwhile)."""
"""Slice ids kept per session (the server allows a few; the least recently used id is replaced)."""
WEIGHTS_FIRST_MS = 100.0
"""A request on a new slice queues its missing weights before the slice's definition when they take at least
this long on the planning link (``RequestPath._weights_first``)."""


def fallback_kind(error: ServerError | None, kind: str = "") -> tuple[str, str]:
    """(category, gRPC status name) of a fallback for the report: the error's ``kind`` and ``code``
    ("unreachable", "server error" + code, "deadline", "protocol error"), else ``kind`` as given."""
    if error is None:
        return kind or "server error", ""
    return error.kind, str(error.code or "")


def transport_residual(measured_ms: float, choice: planning.PlanChoice, ue_ms: float, ue_pred_ms: float,
                       ue_base_ms: float, server_pred_ms: float, timings) -> tuple[float, float]:
    """(measured, predicted) transport of one answered split request, for ``CostModel.calibrate_transport``:
    the request's latency (``measured_ms``: its set-up here after planning included) less the server's
    compute and queueing
    (``timings``: ``ServerTimings``), against the plan's prediction (``choice``) less its transport
    residual and predicted server time (``server_pred_ms``).

    The UE's own time is taken out of both only when the UE cost scale learns it (a prefix of at least
    ``calibration.MIN_CALIBRATION_MS`` profiled): then ``ue_ms`` measured and ``ue_pred_ms`` (the plan's
    UE compute, not the simulator's UE finish: that also counts the UE's CPU spent sending, which
    ``ue_ms`` does not; a cold request's upload went into the residual that way, ~+950 ms on resnet18 at
    400 Mbit/s in the session-7 quick bench, and the next warm predictions were 1.6-4.5x the measured
    latency) predicted. An empty or tiny prefix is not calibrated, and what the UE spends on such a
    request (the begin message, the hand-off of the inputs to the sender, a CPU quota's stall: 10-30 ms
    on a 10 % UE with 0 UE ops in the same bench) would otherwise be predicted by no term at all; it
    stays in the residual. All in ms."""
    own = ue_base_ms >= MIN_CALIBRATION_MS
    return (measured_ms - (ue_ms if own else 0.0) - timings.compute_ms - timings.queue_ms,
            choice.predicted_ms - choice.details.get("transport_ms", 0.0) - (ue_pred_ms if own else 0.0)
            - server_pred_ms)


def plausible_timings(t, measured_ms: float) -> bool:
    """Whether a server's timings of one request (``ServerTimings``) can be true: its compute and its queueing are
    finite, >= 0, and together no longer than the ``measured_ms`` the UE waited for the answer (plus a millisecond:
    the two clocks). The server's word moves the UE's cost model (``CostModel.calibrate_server``, the transport
    residual, the uplink's rate samples); timings that cannot be true are not learnt from. Before session 25, NaN
    compute times moved the server's scale to its floor and every transport residual to -1000 ms (a window of 32
    requests), 1e300 to +1000 ms (``tests/test_hostile_server25.py``)."""
    c, q = t.compute_ms, t.queue_ms
    return math.isfinite(c) and math.isfinite(q) and c >= 0 and q >= 0 and c + q <= measured_ms + 1.0


class SplitRun:
    """What every request of one split shares, computed on its first request (``RequestPath.split_run``):
    nothing here depends on a request's values or on what the server holds now.

    ``need_pos``: {cut tensor ref: 2 x position of its first reader in ``split.server_order``} (a cut tensor's
    priority on the uplink); ``inline``: (ref, dtype name, shape) of the cut tensors that are the graph's
    own inputs (``bind`` gave them the captured dtype, shape and layout), in ``split.cut_tensors`` order;
    ``outputs``: (ref, captured ``TensorMeta``, torch dtype) of the server's outputs; ``compact``: {cut tensor ref:
    declared ``TensorMeta``} of the cut tensors that may travel compact; ``sums``: the profiled
    (UE ms, server ms, UE variance ms^2, server variance ms^2) of the split's parts, per cost graph
    (``sums_of``)."""

    __slots__ = ("_sums", "compact", "expected", "inline", "need_pos", "outputs", "split")

    def __init__(self, graph, split: Split):
        self.split = split
        pos: dict[str, int] = {}
        for k, name in enumerate(split.server_order):
            for r in graph.op_by_name[name].tensor_inputs:
                pos.setdefault(r, 2 * k)
        self.need_pos = pos
        self.inline = tuple((ref, graph.inputs[ref].dtype, graph.inputs[ref].shape)
                            for ref in split.cut_tensors if ref in graph.inputs)
        self.compact = {ref: meta for ref, meta in ((r, graph.meta_of(r)) for r in split.cut_tensors)
                        if meta.wire_shape != meta.shape}
        """Cut tensors whose declared layout has stride-0 dimensions (``modelgraph.tensors.wire_shape``): each goes
        on the uplink as its compact base when the run-time tensor has stride 0 there too (``compact_for_wire``)."""
        self.outputs = tuple((name, meta, to_dtype(meta.dtype))
                             for name, meta in ((o, graph.meta_of(o)) for o in split.server_outputs))
        self.expected = {name: (meta.dtype, tuple(meta.shape), meta.nbytes) for name, meta, _ in self.outputs}
        """The only outputs a request of the split takes from the server, ``name -> (dtype, shape, bytes)``
        (``session.Pending.expected``)."""
        self._sums: tuple = (None, ())

    def sums_of(self, cm: CostModel) -> tuple[float, float, float, float]:
        """(UE ms, server ms, UE variance, server variance) of the profiled ``cm.base`` summed over the split's
        UE and server ops (recomputed when ``cm.base`` is another cost graph)."""
        base, got = self._sums
        if base is not cm.base or not got:
            split = self.split
            got = (cm.base_ms("ue", split.ue_order), cm.base_ms("server", split.server_order),
                   *cm.variances(split.ue_order, split.server_order))
            self._sums = (cm.base, got)
        return got


class RequestPath:
    """Runs one request's plan: locally (``run_local``, ``run_planned_local``) or split (``run_split``)."""

    def __init__(self, model: PreparedModel, opts: ClientOptions, *, conn: Connection, uploads: UploadScheduler,
                 cost_model: CostModel, probe: LinkProbe, decisions: DecisionCache, pinned: PinnedTail | None = None):
        self.model = model
        self.full = model.graph
        """The whole captured graph (local runs, the tail, the model's output structure)."""
        self.pinned = pinned if pinned is not None else PinnedTail(model.graph, (), {}, {})
        """The full graph cut at the ops off the server's allowlist (``modelgraph.pinning``)."""
        self.graph = self.pinned.head
        """What splits are made of: the head (the full graph when nothing is pinned)."""
        self.opts = opts
        self.slowdown = float(opts.ue_slowdown)
        self.conn = conn
        self.uploads = uploads
        self.cost_model = cost_model
        self.probe = probe
        self.decisions = decisions
        self.slices: OrderedDict[frozenset[str], str] = OrderedDict()
        self.refusals = RefusedSlices()
        """Slices servers refused or accepted, per server address (kept across sessions)."""
        self._slice_sha: OrderedDict[frozenset[str], str] = OrderedDict()
        """server ops of a split -> sha256 of the slice JSON last defined for it (the latest 256)."""
        self._runs: OrderedDict[frozenset[str], SplitRun] = OrderedDict()
        """server ops of a split -> its ``SplitRun`` (the latest ``2 x MAX_SLICES``)."""
        self._slice_seq = 0
        self._rid = 0
        self.run_end: float | None = None
        """``time.perf_counter()`` when the latest request's run ended (its ``measured_ms``; the caller's time
        after it is the call's, ``RemoteEngine.infer``)."""
        self.deferred: DeferredCheck | None = None
        """The call's weight check when it may wait for the server (``model.DeferredCheck``; set by the engine for
        one request): ``run_split`` runs it while the UE waits for the answer, or before weights the server lacks
        are queued."""
        self.time_factor = 1.0
        """UE op time at the frequency now applied / at the profile's (``ue_client.frequency``): measured
        UE times are divided by it before they calibrate the cost model."""

    @property
    def last_request_id(self) -> int:
        """The id of the latest split request on the session (its cut tensors keep their priority)."""
        return self._rid

    def reset(self) -> None:
        """A new session: no slice defined on it."""
        self.slices.clear()

    # ---- local ---------------------------------------------------------------------------------------
    def run_local(self, env: dict[str, torch.Tensor], policy: str, n: int, *, reason: str = "",
                  fallback: bool = True, error: ServerError | None = None,
                  kind: str = "", calibrate: bool = True) -> tuple[Any, RequestReport]:
        """The whole model here (the captured graph: a fallback equals ``CoinferClient.reference``
        bit for bit). ``fallback``: the server could not be used, because of ``error`` (its ``kind``
        and ``code`` go to the report) or, without one, ``kind`` (e.g. "planner failure"); raises
        ``error`` or ``ServerUnavailable(reason)`` instead when fallback is off. ``calibrate``: False for a
        run that shared the CPU with an upload (its time is not the UE's compute alone)."""
        if fallback and not self.opts.fallback:
            raise error or ServerUnavailable(reason)
        t0 = time.perf_counter()
        out = local.run_whole(self.model, env, self.slowdown)
        self.run_end = t_end = time.perf_counter()
        ms = (t_end - t0) * 1e3
        if calibrate and self.cost_model.base is not None:  # not ``costs``: that would rebuild the rescaled graph
            self.cost_model.calibrate("ue", ms / self.time_factor, self.cost_model.base_ue_ms())
        if fallback:
            log.info("request %d ran locally: %s", n, reason)
        rep = RequestReport(n, policy, 0, len(self.full.ops), 0, 0, None, ms, fallback=fallback,
                            fallback_reason=reason, ue_compute_ms=ms)
        if fallback:
            rep.fallback_kind, rep.fallback_code = fallback_kind(error, kind)
        return out, rep

    def run_planned_local(self, env, choice: planning.PlanChoice, n: int) -> tuple[Any, RequestReport]:
        """A plan that keeps every op here. A prefetch (the warm target's weights go up while this run
        computes) also gives the send-cost estimate a sample of what sending costs beside the computation
        (:meth:`_prefetch_send_sample`)."""
        sess = self.conn.session if choice.prefetch else None
        mark = (sess.queue.sent.weight_bytes + sess.queue.sent.tensor_bytes, time.process_time(),
                time.thread_time()) if sess is not None else None
        out, rep = self.run_local(env, choice.policy, n, fallback=False, calibrate=not choice.prefetch)
        if mark is not None:
            self._prefetch_send_sample(sess.queue, *mark)
        self.decisions.account(choice, rep.measured_ms)
        rep.predicted_ms, rep.plan_ms, rep.link = choice.predicted_ms, choice.decision_ms, self.probe.report_link()
        rep.plan_cpu_ms = choice.details.get("plan_cpu_ms", 0.0)
        rep.fallback_reason = rep.plan_reason = choice.reason
        return out, rep

    def _prefetch_send_sample(self, q, sent0: int, proc0: float, thread0: float) -> None:
        """Feed the send-cost estimate (``LinkProbe.observe_send``) from a prefetching local run: the bytes
        the session handed over since ``sent0`` (weights and tensors, ``SentRecord``; the data channel's
        block in progress counts when taken, so the window is off by at most one block) and the process's
        CPU seconds since ``proc0`` minus this thread's since ``thread0`` (the local run's compute): the
        CPU of the data channel's sender, the session's receiver, gRPC's and the queue watch's threads
        while the UE computes. The connect-time probe sends ~1 MiB alone; in the testbed's googlenet and
        mobilenet_v2 cells (10 % UE, 400 Mbit/s, TLS, data channel) a prefetch's sending threads took 1.0-1.1
        ns of CPU per byte against the probe's 0.63, and the plan predicted the prefetching request at
        482 / 176 ms against 739 / 368 measured (docs/results/gap/session11). A sample below
        ``SendCpuEstimator.MIN_SAMPLE_BYTES`` is ignored there; an estimate given as ``send_cpu`` is not
        replaced by samples (``LinkProbe.ue_cpu``)."""
        sent = q.sent.weight_bytes + q.sent.tensor_bytes - sent0
        others_s = (time.process_time() - proc0) - (time.thread_time() - thread0)
        if sent > 0 and others_s > 0:
            self.probe.observe_send(sent, others_s)

    # ---- split ---------------------------------------------------------------------------------------
    def run_split(self, env: dict[str, torch.Tensor], choice: planning.PlanChoice, n: int,
                  report_link: dict[str, float], *, t_start: float | None = None,
                  decide_ms: float = 0.0) -> tuple[Any, RequestReport]:
        """A plan with ops on the server, over the open session. ``t_start``: ``time.perf_counter()`` when
        the caller began this request (before planning), ``decide_ms`` the ms it spent planning since: the
        rest of that time (the request's set-up here, e.g. the split and its uploads' schedule) is part of
        the transport residual the cost model learns (``transport_residual``)."""
        g = self.graph
        run = self.split_run(choice.server_ops)
        split = run.split
        sess = self.conn.session
        q = sess.queue
        rejected = self.rejection(split.server_ops)
        if rejected is not None:  # refused before on this session: run it here, without asking again
            out, rep = self.run_local(env, choice.policy, n, reason=f"{rejected.reason}: {rejected}", error=rejected)
            rep.predicted_ms, rep.plan_ms, rep.link = choice.predicted_ms, choice.decision_ms, report_link
            rep.plan_cpu_ms = choice.details.get("plan_cpu_ms", 0.0)
            return out, rep
        self._rid += 1
        rid = self._rid
        # a new slice whose weights take a while on the link: they go up first, and its JSON is built and
        # validated while they flow (googlenet's 197 ops: ~1.5 ms of CPU for the JSON, 15 ms on a 10 % UE,
        # that held back every weight byte); else (or after a refusal) the slice first, as before
        check = self.deferred
        if check is not None and not check.ran and self.uploads.missing_bytes(split):
            check.run()  # before any weight bytes of this request are read for the uplink
        early = self._weights_first(split)
        if early:
            needed = self.uploads.schedule(split, choice.background, rid)
        t_slice, c_slice = time.perf_counter(), time.thread_time()
        slice_id, new_slice = self._ensure_slice(split)
        t_defined = time.perf_counter()
        define_cpu_ms = (time.thread_time() - c_slice) * 1e3
        if not early:
            needed = self.uploads.schedule(split, choice.background, rid)
        if choice.idle_only:
            self.uploads.park_background()
        sent0_w, sent0_t = q.sent.weight_bytes, q.sent.tensor_bytes
        t0 = time.perf_counter()
        inline = self._inline_inputs(run, env, sess.inline_budget(), sess.inline_count())
        pending = sess.begin(rid, slice_id, split.cut_tensors, inline, outputs=run.expected)
        need_pos, compact = run.need_pos, run.compact

        first_cut: list[float] = [t0] if inline else []
        inlined = {name for name, *_ in inline} if inline else ()
        cut_bytes = [sum(data.nbytes for *_, data in inline) if inline else 0]  # this request's cut tensors

        def on_cut(ref: str, t: torch.Tensor) -> None:
            if ref in inlined:  # went inside the BeginRequest
                return
            if not first_cut:
                first_cut.append(time.perf_counter())
            wide = compact.get(ref)
            if wide is not None:  # a layout with stride-0 dims (an ``expand``: an attention mask) goes compact
                t = compact_for_wire(t, wide)
            data = tensor_bytes(t)
            cut_bytes[0] += data.nbytes
            meta = TensorMeta.of(t, keep_stride=False)
            q.put(UplinkItem("tensor", ref, meta.dtype, meta.shape, data, (FOREGROUND, need_pos[ref], rid),
                             request_id=rid, owner=t))

        env = local.run_prefix(g, split, env, on_cut_tensor=on_cut, slowdown=self.slowdown)
        pending.inputs_queued = True  # the uplink's chunks may grow: no cut tensor of it can become ready now
        cm = self.cost_model
        ue_ms = (time.perf_counter() - t0) * 1e3
        ue_base, server_base, ue_var, server_var = run.sums_of(cm)
        # the plan's UE compute (its costs were scaled by the UE scale before this request moves it); not
        # the simulator's UE finish, which also counts the CPU the UE spends sending this request's weights
        ue_pred = (ue_base * cm.scale["ue"] + cm.overhead_ms) * self.time_factor
        cm.calibrate("ue", ue_ms / self.time_factor, ue_base)
        self.uploads.resume_background()  # the UE now only waits: background weights may go
        var_ms2, server_ms = cm.spread_of(ue_var, server_var, server_base)
        rule = patience_of(var_ms2, server_ms, choice.predicted_ms, share=sess.share,
                           min_stall_ms=self.opts.deadline_slack_ms, deadline_ms=self.opts.timeout_ms)
        items = self.uploads.needed_items(split)

        n_server = len(split.server_order)

        def progress() -> tuple:
            # the server's reports and outputs count in steps the request truly has (its server ops; its cut tensors'
            # bytes in INPUT_STEPS; its expected outputs' bytes in OUTPUT_STEPS): a server that reports or trickles
            # without end (a bug, or one that means harm) holds a request for at most that many stall windows
            total = cut_bytes[0]
            received = min(pending.input_reported, total) * deadline.INPUT_STEPS // total if total else 0
            return (sum(it.remaining for it in items), sum(1 for it in items if it.name in sess.held),
                    q.sent.tensor_bytes, pending.output_step(), min(pending.ops_reported, n_server), received)

        checked_s = 0.0
        if check is not None and not check.ran:
            # the UE now only waits for the answer: the call's weight check runs here, once the request's cut tensors
            # left for gRPC (its CPU would delay them on a CPU-quota'd UE), not before the request (``DeferredCheck``);
            # the deadline's clock leaves its time out (it watched nothing meanwhile: a full check on a 10 % UE takes
            # longer than a stall window)
            t_check = time.perf_counter()
            q.wait_tensors_handed(sent0_t + cut_bytes[0], HAND_OFF_WAIT_S)
            check.run()
            checked_s = time.perf_counter() - t_check
        error: ServerError | None = None
        c0, w0, b0 = time.process_time(), q.sent.weight_bytes, q.sent.weight_bytes + q.sent.tensor_bytes
        channel = self.conn.channel

        vouched = [0, 0.0]  # (needed bytes out and unacknowledged, when health checks first vouched for them)

        def reading(timeout_s: float) -> bool:  # needed bytes left the UE, unacknowledged: still read?
            ahead = sum(it.offset for it in items if it.name not in sess.held)
            if not ahead:
                return False
            now = time.perf_counter()
            if ahead != vouched[0]:
                vouched[:] = [ahead, now]
            elif now - vouched[1] > deadline.read_window_s(ahead, timeout_s):
                # the same bytes unacknowledged longer than they take at the slowest link we wait for: the server has
                # them (it answers health checks behind them) and says nothing. Before session 25 each answered check
                # counted as progress, and a server that took the weights and never acknowledged them held a cold
                # request for ever
                log.warning("request %d: %d bytes of weights sent %.1f s ago are still unacknowledged; not waiting "
                            "for them longer", rid, ahead, now - vouched[1])
                ds = sess.data_sender
                if ds is not None and ds.active:  # they went there: the next requests send them in-stream
                    ds.abandon(f"{ahead} bytes unacknowledged for {now - vouched[1]:.1f} s")
                return False
            try:  # the check waits behind those bytes: give them time at the slowest link we wait for
                wire.ping(channel, max(timeout_s, ahead * 8 / (deadline.MIN_READ_MBPS * 1e6)))
            except ServerError:
                return False
            return True

        if not deadline.wait(rule, pending.done.wait, progress, lambda: time.perf_counter() - t0 - checked_s, reading):
            sess.cancel_request(rid)
            error = DeadlineExceeded(f"no answer after {(time.perf_counter() - t0) * 1e3:.0f} ms: {rule.describe()} "
                                     f"(predicted {choice.predicted_ms:.0f})")
        else:
            t_answer = time.perf_counter()
            # passive send-CPU sample: the UE computed nothing while it waited. Only where weights were most of
            # the bytes: the estimate prices uploads (the probe's sample is weights); a warm request's cut tensors
            # carry the request's fixed CPU (its answer, the session's threads) over few bytes: resnet18's 0.6 MB
            # input moved a stream's estimate from the probe's 777 Mbit/s CPU-bound rate to 331 in 7 warm
            # requests (10 % UE, session 18), a 2.4x dearer upload than any upload measured
            sent, w_sent = q.sent.weight_bytes + q.sent.tensor_bytes - b0, q.sent.weight_bytes - w0
            if 2 * w_sent >= sent:
                self.probe.observe_send(sent, time.process_time() - c0)
            self._tensor_rate_sample(pending, first_cut, t_answer, q.sent.weight_bytes - sent0_w,
                                     q.sent.tensor_bytes - sent0_t)
            if pending.error is not None:
                error = self.rejection(split.server_ops) or pending.error
        outputs = None
        if error is None:
            try:
                outputs = self._outputs(pending, run)
            except ProtocolError as e:
                error = e
        if error is not None:
            if isinstance(error, DeadlineExceeded):
                ack = sess.slice_acks.get(slice_id)  # the server's own word, on this session, on what the slice lacks
                if doubted := self.uploads.doubt(split, frozenset(ack.missing_weights) if ack is not None else ()):
                    log.warning("request %d: no answer; %d weights QueryWeights said the server held, and its answer "
                                "to the slice's definition listed as missing, will be sent", n, doubted)
            blame = split.server_ops not in sess.rejected  # a refused slice says nothing about the server
            if not self.opts.fallback:
                op_failed = op_failure(error)
                if op_failed is not None:  # the server ran it and an op failed on the request's data (break43 F2)
                    raise op_failed from error
                if blame:
                    self.conn.note_failure(error, loud=False)
                raise error
            t1, failed_at = time.perf_counter(), time.monotonic()
            try:
                local.run_rest(g, split, env, self.slowdown)
            except Exception:
                # the rest fails here as well (token ids past an embedding, as the user's eager module would
                # fail): the request's inputs, not the server, so no back-off; the next requests still go there
                log.debug("the server's failure (%s) is the request's: its rest failed locally too", error)
                raise
            if blame:  # the back-off counts from the failure, not from the end of the local rest
                self.conn.note_failure(error, loud=True, at=failed_at)
            ue_ms += (time.perf_counter() - t1) * 1e3
        else:
            env.update(outputs)
            self.conn.note_success()
        t1 = time.perf_counter()
        out = local.finish_tail(self.full, self.pinned, env, self.slowdown)
        ue_ms += (time.perf_counter() - t1) * 1e3
        self.run_end = t_end = time.perf_counter()
        measured = (t_end - t0) * 1e3
        mark = self.uploads.take_busy_mark()
        if mark is not None:
            self.probe.observe_upload(mark[1], mark[0])
        timings = parts = None
        op_times: tuple = ()
        if pending.result is not None and not plausible_timings(pending.result.timings, measured):
            wire.refused("timings", "request %d: its server timings (compute %r ms, queue %r ms) are not within the "
                         "%.1f ms the request took: the cost model does not learn from them", n,
                         pending.result.timings.compute_ms, pending.result.timings.queue_ms, measured)
        elif pending.result is not None:
            t = pending.result.timings
            share = min(1.0, max(1e-3, sess.share))
            # the server's part of the prediction (``planning.refresh_server_scale`` keeps it at the scale of now):
            # what the transport residual leaves out, so a stale server part never goes into it
            server_pred = choice.details.get("server_ms", server_base * cm.scale["server"] / share)
            uploaded = q.sent.weight_bytes != sent0_w
            setup_ms = 0.0 if t_start is None else max(0.0, (t_slice - t_start) * 1e3 - decide_ms
                                                            + (t0 - t_defined) * 1e3)
            wait_ms = self._validation_ms(slice_id, t_defined) if new_slice else 0.0
            parts = {"ue_ms": ue_pred, "server_ms": server_pred,
                     "transport_ms": choice.details.get("transport_ms", 0.0), "setup_ms": setup_ms}
            if new_slice and wait_ms is not None:
                parts["validation_ms"] = wait_ms
            if new_slice:  # measured: this thread's wall / CPU ms building and sending the slice's definition
                parts["define_ms"] = (t_defined - t_slice) * 1e3
                parts["define_cpu_ms"] = define_cpu_ms
            if error is None and not uploaded and not new_slice and choice.details.get("ue_finish_ms") is not None:
                # (before the server's scale moves) A request that put weights on the uplink is left out: its
                # error is mostly the upload's, which the uplink estimate learns (``observe_upload``), and a
                # cold request's residual (+100 ms on resnet18 at 400 Mbit/s, +950 ms before the UE time
                # below was the plan's compute, not its finish) then rode on every warm prediction after it.
                # So is a request that defined its slice: it waited for the server's validation, outside the
                # server's timings, and the UE cannot tell that wait apart (its SliceDefined arrives while the
                # input is already on its way: subtracting ack time - RTT left -43 ms residuals, 10 % UE)
                cm.calibrate_transport(*transport_residual(measured + setup_ms, choice, ue_ms, ue_pred, ue_base,
                                                           server_pred, t))
            cm.calibrate_server(t.compute_ms + t.queue_ms, server_base, share)
            timings = {"total_ms": t.total_ms, "compute_ms": t.compute_ms, "input_wait_ms": t.input_wait_ms,
                       "weight_wait_ms": t.weight_wait_ms, "queue_ms": t.queue_ms,
                       "validation_ms": t.validation_ms}
            # lazy (wire.OpTimes): decoded only if someone reads it. Kept only when asked for and no more than the
            # split's server ops: each report is kept (``CoinferClient.reports``), and before session 25 a server
            # sending 100,000 unasked op timings per answer grew every report by them
            if self.opts.op_timings and len(t.ops) <= n_server:
                op_times = t.ops
            elif t.ops:
                wire.refused("op timings", "request %d: %d op timings (%s; the split has %d server ops): not kept",
                             n, len(t.ops), "asked" if self.opts.op_timings else "not asked", n_server)
        rep = RequestReport(
            n, choice.policy, len(split.server_order), len(split.ue_order) + self.pinned.kept_on_ue,
            q.sent.weight_bytes - sent0_w, q.sent.tensor_bytes - sent0_t, choice.predicted_ms, measured,
            fallback=error is not None, fallback_reason="" if error is None else f"{error.reason}: {error}",
            fallback_kind="" if error is None else error.kind,
            fallback_code="" if error is None else str(error.code or ""),
            needed_upload_bytes=needed, serial_ms=choice.serial_ms, warm_ms=choice.warm_ms,
            plan_ms=choice.decision_ms, plan_cpu_ms=choice.details.get("plan_cpu_ms", 0.0),
            link=report_link, server_timings=timings, invest=choice.invest,
            plan_reason=choice.reason, ue_compute_ms=ue_ms, predicted_parts=parts, server_op_times=op_times)
        self.decisions.account(choice, measured)
        if error is not None:
            log.warning("request %d fell back to local execution: %s", n, rep.fallback_reason)
        return out, rep

    def _inline_inputs(self, run: SplitRun, env: dict[str, torch.Tensor], budget: int,
                       max_count: int = 1 << 30) -> list[tuple[str, str, tuple[int, ...], memoryview]] | None:
        """The cut tensors that go inside this request's BeginRequest: those that are the graph's own inputs
        (ready before the UE prefix runs; ``run.inline``), whole, if together they fit in ``budget`` bytes
        (``SessionStream.inline_budget``; 0: the server takes none). A warm all-server request then costs
        one message up and one down (the outputs inside RequestDone) instead of four or more. Cut tensors
        the prefix makes stream as chunks the moment each exists, as before. More than ``max_count`` of them
        (``SessionStream.inline_count``: the server refuses a BeginRequest with more): none inline. None:
        nothing inline. ``env`` holds ``bind``'s result: each input has its captured dtype and shape."""
        if budget <= 0 or not run.inline or len(run.inline) > max_count:
            return None
        out, used = [], 0
        compact = run.compact
        for ref, dtype, shape in run.inline:
            t = env[ref]
            if ref in compact:  # captured with stride-0 dims, and still so: its compact base
                t = compact_for_wire(t, compact[ref])
                shape = tuple(t.shape)
            data = tensor_bytes(t)
            used += data.nbytes
            if used > budget:
                return None
            out.append((ref, dtype, shape, data))
        return out

    def split_run(self, server_ops: frozenset[str]) -> SplitRun:
        """The ``SplitRun`` of the split whose server part is ``server_ops`` (built on its first request; the
        latest ``2 x MAX_SLICES`` splits kept)."""
        run = self._runs.get(server_ops)
        if run is None:
            run = SplitRun(self.graph, self.graph.split(server_ops))
            if len(self._runs) >= 2 * MAX_SLICES:
                self._runs.popitem(last=False)
            self._runs[server_ops] = run
        else:
            self._runs.move_to_end(server_ops)
        return run

    def _validation_ms(self, slice_id: str, t_defined: float) -> float | None:
        """From the DefineSlice this request sent (at ``t_defined``, ``time.perf_counter()``) until its
        SliceDefined arrived, less one round trip, ms (>= 0): an upper bound of the server's validation as
        the UE saw it (the request's input may travel meanwhile; a CPU-starved UE reads the answer late).
        Reported only (``RequestReport.predicted_parts``). None when no acknowledgement arrived after
        ``t_defined``."""
        at = self.conn.session.slice_ack_at.get(slice_id)
        if at is None or at < t_defined:
            return None
        return max(0.0, (at - t_defined) * 1e3 - self.probe.planning_link().rtt_ms)

    def _tensor_rate_sample(self, pending, first_cut: list[float], t_answer: float, weight_bytes: int,
                            tensor_bytes: int) -> None:
        """A passive uplink rate sample from a request that sent only cut tensors: from the first tensor
        put on the uplink to the answer, less the server's compute and queueing (its own timings) and the
        RTT (``LinkEstimator`` subtracts it). Warm requests send no weights, so without this the link
        estimate (and the rate's measured spread, ``LinkEstimator.uplink_cv``) would never move after the
        connect-time probe. Small transfers are ignored by the estimator (``MIN_RATE_SAMPLE_BYTES``)."""
        res = pending.result
        if weight_bytes or not tensor_bytes or not first_cut or res is None or pending.error is not None \
                or not plausible_timings(res.timings, (t_answer - first_cut[0]) * 1e3):
            return
        t = res.timings
        seconds = t_answer - first_cut[0] - (t.compute_ms + t.queue_ms) / 1e3
        if seconds > 0:
            self.probe.observe_upload(tensor_bytes, seconds)

    def _ensure_slice(self, split: Split) -> tuple[str, bool]:
        """The slice id of ``split`` on the session, and whether it was defined now (the server validates
        a new slice before it runs the request that uses it)."""
        key = split.server_ops
        sid = self.slices.get(key)
        if sid is not None:
            self.slices.move_to_end(key)
            return sid, False
        if len(self.slices) >= MAX_SLICES:
            _, sid = self.slices.popitem(last=False)
        else:
            self._slice_seq += 1
            sid = f"s{self._slice_seq}"
        spec = make_slice(self.graph, split).to_json()
        self._slice_sha[key] = hashlib.sha256(spec.encode()).hexdigest()
        self._slice_sha.move_to_end(key)
        if len(self._slice_sha) > 256:
            self._slice_sha.popitem(last=False)
        self.conn.session.define_slice(sid, spec, tag=key)
        self.slices[key] = sid
        return sid, True

    # ---- what the server refused (ue_client.refusals) --------------------------------------------------
    def sync_refusals(self) -> None:
        """Take the session's answers to DefineSlice (posted by its receiver thread) into ``refusals``; after a
        refusal the background weights waiting on the uplink are shelved (``UploadScheduler.shelve_background``:
        they went up for the refused target; the next plan schedules again what it wants)."""
        sess = self.conn.session
        answers = sess.slice_answers if sess is not None else ()
        refused = False
        while answers:
            tag, ev = answers.popleft()
            if not isinstance(tag, frozenset):
                continue
            sha = self._slice_sha.get(tag, "")
            if isinstance(ev, wire.SliceRejected):
                refused = True
                self.refusals.refused(self.conn.address, tag, sha, ev.code, ev.message)
                # its id names no slice on the server: a later request of the split defines it again (a
                # request that failed before this answer came kept the id, and once a transient refusal's
                # back-off was over its split was begun on a slice never defined)
                if self.slices.get(tag) == ev.slice_id:
                    del self.slices[tag]
            else:
                self.refusals.accepted(self.conn.address, tag, sha)
        if refused:
            shelved = self.uploads.shelve_background()
            log.info("a slice was refused: %d bytes of background weights taken off the uplink", shelved)

    def exclusion(self) -> tuple[frozenset[frozenset[str]], frozenset[frozenset[str]] | None]:
        """What the planner may not use / may only use on this server (``RefusedSlices.exclusion``)."""
        return self.refusals.exclusion(self.conn.address)

    def _weights_first(self, split: Split) -> bool:
        """Whether a request on ``split`` queues its weights before it defines the split's slice: the slice
        is new on this session, the server has not refused slices lately (``unproven``: then the slice is
        checked before any weight goes up), and the weights the server lacks take at least
        ``WEIGHTS_FIRST_MS`` on the planning link (the server's validation of a new slice, 30-98 ms in the
        testbed's 10 %/400 cells, stays behind them; with little to send the validation would wait for
        the schedule instead)."""
        if split.server_ops in self.slices or self.unproven(split.server_ops):
            return False
        missing = self.uploads.missing_bytes(split)
        return missing > 0 and missing * 8 / (self.probe.planning_link().uplink_mbps * 1e3) >= WEIGHTS_FIRST_MS

    def unproven(self, server_ops: frozenset[str]) -> bool:
        """This server refused slices lately and has not accepted this split's: define it before sending
        its weights."""
        r = self.refusals
        return r.has_refused(self.conn.address) and not r.is_accepted(self.conn.address, server_ops)

    def define_ahead(self, split: Split, wait_s: float = 0.0) -> None:
        """Define ``split``'s slice on the session before a request uses it (the server validates it while
        the UE does something else). A slice the server refused before is not sent again. ``wait_s`` > 0:
        wait up to that long for the server's answer (accepted or refused; ``sync_refusals`` takes it), so a
        refusal is known before the next decision."""
        if self.rejection(split.server_ops) is not None:
            return
        t0 = time.perf_counter()
        sid, new = self._ensure_slice(split)
        sess = self.conn.session
        if not new or wait_s <= 0 or sess is None:
            return
        key = split.server_ops
        sess.wait_slice_answer(lambda: sess.slice_ack_at.get(sid, t0 - 1.0) >= t0 or key in sess.rejected, wait_s)
        self.sync_refusals()

    def rejection(self, server_ops: frozenset[str]) -> RequestFailed | None:
        """The server's refusal of this split's slice on this session, or on another session within
        ``refusals.retry_s``, if it refused it. The session's answers are taken in first: a SliceRejected that
        arrived since the last decision is not yet in ``refusals``, and would read as a transient refusal whose
        back-off is over (asked again, the failed request blamed on the server, the UE backed off from a
        healthy server: session 19's fast CPU ran 3 requests inside that 0.5 s, each a flagged fallback)."""
        self.sync_refusals()
        sess = self.conn.session
        rej = sess.rejected.get(server_ops) if sess is not None else None
        addr = self.conn.address
        if rej is not None and rej.code not in PERMANENT and self.refusals.refusal(addr, server_ops) is None:
            sess.rejected.pop(server_ops, None)  # a transient refusal whose back-off is over: ask again
            rej = None
        if rej is None:
            rej = self.refusals.refusal(self.conn.address, server_ops)
            if rej is None:
                return None
        if self.slices.get(server_ops) is not None:  # the id names no slice on the server any more
            del self.slices[server_ops]
        return RequestFailed(f"server rejected the slice: code {rej.code}: {rej.message}", rej.code)

    def _outputs(self, pending, run: SplitRun) -> dict[str, torch.Tensor]:
        """The server's outputs of ``run``'s split from the answer's bytes, checked against the captured
        metadata (``ProtocolError`` for a missing one or another dtype or shape), in the producer's layout."""
        res = pending.result
        names, metas, buffers = res.output_names, pending.metas, pending.buffers
        out = {}
        for name, meta, dtype in run.outputs:
            got = metas.get(name)
            if got is None or name not in names:
                missing = [o for o, *_ in run.outputs if o not in names]
                raise ProtocolError(f"server did not return outputs {missing[:3]}")
            if got[0] != meta.dtype or tuple(got[1]) != meta.shape:
                raise ProtocolError(f"output {name!r} is {list(got[1])} {got[0]}; expected {list(meta.shape)} "
                                    f"{meta.dtype}")
            out[name] = restore_layout(tensor_from_bytes(buffers[name], meta, dtype=dtype), meta)
        return out


_OP_FAILED = re.compile(r"^(?:OpExecutionError: )?(op '.*?' \(.*?\) failed: (\w+): .*)$", re.S)
"""A server's message for an op of a request's slice that raised on its data (``edge_server.requests``: ``OpFailed``,
or the slice runtime's ``OpExecutionError``): the op, and the type of what it raised."""
_DATA_FAULTS = frozenset({"IndexError"})
"""What an op raises on a request's data and never because of the server: an index past a tensor (token ids past an
embedding). A ``RuntimeError`` may be the server's own (a CPU allocator out of memory, a kernel its build lacks), so it
is not taken as the inputs' fault (break45: a memory-starved server got every request of a no-fallback client)."""


def op_failure(error: Exception) -> OpExecutionError | None:
    """The ``OpExecutionError`` a server's answer reports when an op of the request's slice raised on the request's
    data (INVALID_ARGUMENT, the op named, an exception of ``_DATA_FAULTS``), else None.

    Without a fallback the UE cannot run the rest to tell the inputs' fault from the server's, so the status and the
    exception's type decide: a server that ran the request and reports an index past a tensor is serving, and a
    back-off would make the next good requests fail with this one's error without reaching it (break43 F2: ~1 s of
    good requests refused after one bad batch). Raised as the typed error a local run raises (README:
    ``OpExecutionError`` wherever the op ran)."""
    if not isinstance(error, RequestFailed) or error.code != "INVALID_ARGUMENT":
        return None
    m = _OP_FAILED.match(error.server_message)
    if m is None or m.group(2) not in _DATA_FAULTS:
        return None
    return OpExecutionError(f"on the server: {m.group(1)}")
