"""The device-side library API: build a client for a model, call it like the model.

    client = CoinferClient("torchvision:resnet18", server="127.0.0.1:50051", policy="auto")
    y = client(x)                  # the model's output, computed split between this device and the server
    client.last_report             # what happened: split, bytes, predicted vs measured, fallback

One interface, two engines (vLLM style): ``LocalEngine`` runs the captured model in-process (no
server, or policy ``local``); ``RemoteEngine`` plans every request against what the server holds,
runs the UE prefix while the session stream uploads the server part's weights and the cut tensors in
need order, and falls back to local execution whenever the server cannot answer in time.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from modelgraph import ModelGraph, ModelGraphError, SignatureCache, run_graph
from modelgraph.allowlist import is_allowed
from modelgraph.capture import grad_mode
from modelgraph.out_layout import INPUTS_REQUIRE_GRAD, inputs_require_grad
from modelgraph.pinning import PinnedTail, pin_off_allowlist
from modelgraph.pytree_io import forward_signature, layout_key, reads_layout, rebind_call
from modelgraph.signatures import autocast_state, no_autocast
from modelgraph.tracelock import TORCH_TRACE_LOCK
from partitioner import CostGraph, Link
from partitioner.state import ServerState, Shares
from ue_client import planning, transport_cache, wire
from ue_client.background import BACKGROUND_MIN_GAP_MS, Lookahead
from ue_client.backlog import UplinkBacklog
from ue_client.calibration import CostModel, head_costs
from ue_client.call_forecast import CallForecast, after_kind_of
from ue_client.connection import Connection
from ue_client.cpu_speed import CpuSpeed
from ue_client.decider import Decider
from ue_client.decisions import DecisionCache
from ue_client.errors import CoinferError, InputError, ServerError
from ue_client.heap import freeze_gc, refreeze_gc, release_gc, retain_freed_buffers
from ue_client.inputs import parse_server_address
from ue_client.model import DeferredCheck, PreparedModel, WeightWatch, bind, input_signature, prepare_model, run_whole
from ue_client.options import ClientOptions, LinkOverride, fixed_split
from ue_client.plan_run import PlanRunner
from ue_client.probing import LinkProbe
from ue_client.report import RequestReport
from ue_client.report_tally import ReportTally
from ue_client.request import MAX_SLICES, RequestPath
from ue_client.send_rate import SendRateReport
from ue_client.uploads import UploadScheduler

log = logging.getLogger(__name__)

# ---- engines -------------------------------------------------------------------------------------------
class LocalEngine:
    """Runs the whole captured model in-process: the reference, and the engine without a server."""

    def __init__(self, model: PreparedModel):
        self.model = model
        self._n = 0

    def infer(self, args, kwargs=None, *, started: float | None = None,
              check: DeferredCheck | None = None) -> tuple[Any, RequestReport]:
        """``forward(*args, **kwargs)`` on the captured graph here; (output in the model's structure, report).
        ``started``: as ``RemoteEngine.infer``'s (no prediction here to count it in). ``check``: run before
        computing (nothing here waits)."""
        if check is not None:
            check.finish()
        g = self.model.graph
        env = bind(g, args, kwargs)
        t0 = time.perf_counter()
        out = run_whole(self.model, env)
        ms = (time.perf_counter() - t0) * 1e3
        self._n += 1
        return out, RequestReport(self._n, "local", 0, len(g.ops), 0, 0, None, ms)

    def close(self) -> None:
        pass


class RemoteEngine:
    """Split execution against one edge server over one channel and one Session stream.

    A coordinator over parts with one job each:

    ========================  ==================================================================
    ``conn``                  ``connection.Connection``: channel, Session stream, suspension, backoff
    ``uploads``               ``uploads.UploadScheduler``: what goes on the uplink, what the server holds
    ``cost_model``            ``calibration.CostModel``: profiled costs rescaled by measured times
    ``decisions``             ``decisions.DecisionCache``: plan or reuse, drift detection, rent-or-buy
    ``decider``               ``decider.Decider``: a request's decision from what the parts hold now
    ``probe``                 ``probing.LinkProbe``: link and send-cost estimates, the uplink probe
    ``path``                  ``request.RequestPath``: run a plan locally or split, fallback
    ``runner``                ``plan_run.PlanRunner``: a plan's run with the uplink arranged around it
    ``backlog``               ``backlog.UplinkBacklog``: the uplink's backlog, charged to split plans
    ``cpu``                   ``cpu_speed.CpuSpeed``: the CPU frequency in force, the share of a core
    ``forecast``              ``call_forecast.CallForecast``: a call's time before and after its run
    ``tally``                 ``report_tally.ReportTally``: what a report says beyond the run
    ``ahead``                 ``background.Lookahead``: the next request's decision, made in the background
    ``send_rate``             ``send_rate.SendRateReport``: the send rate the server is told
    ========================  ==================================================================

    The engine itself builds them (``_cut``), opens the session (``connect``), serialises requests and
    dispatches each one (local, offline on a suspended session, split, or a fallback) and fills its report.

    Threads. Requests of one engine are serialised (``infer``, ``connect`` and ``close`` take the
    engine's lock): every part's state belongs to the caller's thread. Other threads never change a
    part's state; they post events that the caller's thread applies, or read one reference once:

    - the session's receiver thread (``coinfer-session-rx``) posts each weight acknowledgement to
      ``uploads`` (``UploadScheduler.ack_handler``: a deque append, tagged with the session's
      generation); the caller's thread applies them (``UploadScheduler.drain``) when it next looks;
    - gRPC's sender thread calls ``probe.rate_bps`` (reads the link estimate, which locks itself);
    - the queue watch's thread feeds idle RTTs to ``probe.observe_rtt`` (same lock) and reads the data
      channel's socket backlog (``backlog.socket_s``: ``conn.session`` once, then the link estimate);
    - a suspension's linger timer (``coinfer-linger``) closes the idle channel under the connection's lock,
      only while that suspension is still in force (``Connection.suspend``);
    - a progress display calls ``upload_status``, which reads ``conn.session`` once;
    - the background planner's worker (``coinfer-plan-bg``, ``ue_client.background.Lookahead``, the engine's
      ``ahead``; ``plan_background``) decides the next request after a request returned: it takes the engine's
      lock for the whole job (so while it runs it owns the parts as a request does), applies posted
      acknowledgements and slice answers, and writes one slot, ``ahead.spec``: a decision made on a copy of the
      ``DecisionCache``, which the next request takes only if every input is what it was made with
      (``Lookahead.take``). The next request waits for a running job before it takes the lock; ``close`` stops
      the worker; a forked child forgets it (``_after_fork_in_child``).

    So detaching the session (close, suspension, a failure's teardown) can never pull it from under
    a thread that is using it (the race of the receiver thread's ack handler against ``_detach``).
    """

    def __init__(self, model: PreparedModel, server: str, options: ClientOptions | None = None):
        opts = options or ClientOptions()
        if opts.server_ops is not None:
            fixed_split(model.graph, opts.server_ops)  # a valid split of this model, or InputError
        self.model = model
        self.address = server
        self.options = opts
        self.policy = opts.policy
        self.conn = Connection(server, opts.tenant, connect_timeout_s=opts.connect_timeout_s,
                               backoff_s=opts.backoff_s, channel_args=opts.channel_args(),
                               data_target=opts.data_target(server))
        link = opts.link
        if opts.cell_uplink_mbps is not None and (link is None or link.uplink_mbps is None):
            link = LinkOverride(opts.cell_uplink_mbps, *(() if link is None else (link.downlink_mbps, link.rtt_ms)))
        # the transport residual is this device's, that server's and the link model's: a client for the same
        # ones starts from what the earlier clients of this process measured (``calibration.TransportMemory``)
        self.cost_model = CostModel(opts.costs, memory_key=(server, model.graph.model_hash, link,
                                                            float(opts.ue_slowdown))
                                    if opts.transport_memory else None)
        self._memory_link = link
        self._disk_key: str | None = None
        """This client's entry in ``transport_cache`` (set while connecting; None: nothing kept on disk)."""
        self.probe = LinkProbe(link, send_cpu=opts.send_cpu, slowdown=float(opts.ue_slowdown),
                               threads=opts.threads, pace=opts.pace)
        self.cpu = CpuSpeed(opts.frequency)
        self.forecast = CallForecast(self.cost_model)
        self.backlog = UplinkBacklog(self.conn, self.probe)
        self.tally = ReportTally(opts, self.probe, self.cpu)
        self.ahead = Lookahead(self)
        """The next request's decision on a worker thread while the caller is away (``ClientOptions.plan_background``;
        ``ue_client.background``)."""
        self._choice: planning.PlanChoice | None = None
        """The plan of the request in progress (None: it ran without one)."""
        self.warm_split = False
        """The last request ran split without a fallback: the next call's weight check may wait for the server's answer
        (``DeferredCheck``; ``CoinferClient.__call__``; a split whose weights the server lacks runs it before they are
        queued, ``RequestPath.run_split``)."""
        self._offline_plan = (0.0, 0.0)
        """(wall, CPU) ms of the request in progress's offline decision (a suspended session), 0 without one."""
        self._cut(pin_off_allowlist(model.graph))
        self._lock = threading.Lock()
        self._n = 0
        self.freeze_after_profile = False
        """Freeze the objects alive after the first connect's profiling (``ue_client.heap.freeze_gc``: the
        cost graphs, the server's profile, the planner's tables); set by the client that froze the model."""
        me = weakref.ref(self)  # _cut may replace uploads. Not ``self`` in the closure: engine -> send_rate ->
        # closure -> engine was a cycle, which ``gc.freeze`` (``ue_client.heap``) kept, with everything the engine
        # holds, while another client stayed open (~250 objects per closed client, never collected)
        self.send_rate = SendRateReport(self.probe, lambda: me().uploads.take_send_sample())
        self.send_log = self.send_rate.log
        """(time.time(), send rate, "probe" / "sustained") each time one was sent to the server (the last 256)."""
        _ENGINES.add(self)

    def _cut(self, pinned: PinnedTail) -> None:
        """Plan, upload and split the ``pinned.head`` of the model; its tail (ops off the server's
        allowlist and their descendants) always runs here after the head, so an op the server cannot
        run keeps only itself and what depends on it on the UE. A fixed split (``server_ops``) loses
        the tail's ops. Only before the first connect: the parts built here hold no state yet."""
        opts = self.options
        self.pinned = pinned
        self._pinned_report = pinned.to_json()["pinned"]
        """What each request's report says was pinned (built once per cut, not per request)."""
        self.graph = pinned.head
        """The graph splits are made of: the model's head (the whole graph when nothing is pinned)."""
        if pinned.pins:
            log.info("%s: %s", self.model.graph.name, pinned.note())
        fixed = None if opts.server_ops is None else frozenset(n for n in opts.server_ops if n not in pinned.tail)
        if opts.costs is not None and pinned.pins:
            self.cost_model.base = head_costs(opts.costs, pinned.head)
        self.uploads = UploadScheduler(self.graph, self.conn)
        self.decisions = DecisionCache(opts.policy, fixed_server_ops=fixed, deadline_ms=opts.deadline_ms,
                                       plan_budget_s=opts.plan_budget_s, horizon=opts.horizon, eps=opts.eps,
                                       energy=self.cpu.energy, uplink_cv=opts.uplink_cv, held_shortcut=opts.quick_reuse)
        self.path = RequestPath(self.model, opts, conn=self.conn, uploads=self.uploads, cost_model=self.cost_model,
                                probe=self.probe, decisions=self.decisions, pinned=pinned)
        self.decider = Decider(opts, self.conn, self.uploads, self.cost_model, self.probe, self.decisions, self.path,
                               self.ahead)
        self.runner = PlanRunner(self.graph, opts, self.conn, self.uploads, self.probe, self.path, self.decider)
        m = self.model
        self._plan_model = m if not pinned.pins and not m.example_kwargs else PreparedModel(
            pinned.head, bind(m.graph, m.example_inputs, m.example_kwargs), m.spec)
        """The head with the example inputs bound by name: what is profiled here and on the server."""

    def _cut_for_server(self, info: wire.ServerInfo | None) -> None:
        """Cut again when the server's allowlist (``Hello``) refuses ops this build allows."""
        if info is None or not info.allowed_ops or self.cost_model.base is not None:
            return
        allowed = frozenset(info.allowed_ops)
        if all(op.target in allowed for op in self.graph.ops):
            return
        self._cut(pin_off_allowlist(self.model.graph, lambda t: is_allowed(t) and t in allowed))

    # ---- views the library, the CLI and the benchmarks use ----------------------------------------------
    @property
    def costs(self) -> CostGraph | None:
        """The cost graph planning uses (profiled, rescaled by measured times; None before connecting)."""
        return self.cost_model.costs

    @property
    def server_info(self) -> wire.ServerInfo | None:
        return self.conn.server_info

    @property
    def suspensions(self) -> int:
        """How often the session was closed because plans stayed local."""
        return self.conn.suspensions

    @property
    def weight_acks(self) -> list[wire.WeightAck]:
        """Every WeightStored the server sent on this engine's sessions."""
        return self.uploads.weight_acks

    @property
    def send_est(self):
        """The send-CPU estimator (``profiler.link.SendCpuEstimator``)."""
        return self.probe.send_est

    @property
    def freq(self):
        """The frequency control (``ClientOptions.frequency``; None: none)."""
        return self.cpu.control

    @property
    def energy(self):
        """The planner's energy model (``partitioner.robust.EnergyModel``) of the frequency control."""
        return self.cpu.energy

    @property
    def cpu_share(self) -> float:
        """The share of one core the deciding thread gets (``CpuSpeed.share``)."""
        return self.cpu.share

    def planning_link(self) -> Link:
        return self.probe.planning_link()

    def ue_cpu(self):
        """What sending costs this UE (``partitioner.uecpu.UeCpu``; None before it was measured)."""
        return self.probe.ue_cpu()

    def server_state(self) -> ServerState:
        return self.uploads.server_state()

    def upload_status(self) -> tuple[int, int]:
        """(weight bytes sent on this session, weight bytes still waiting); any thread."""
        return self.uploads.upload_status()

    def wait_uploads(self, timeout_s: float) -> bool:
        """Wait until every queued weight was acknowledged by the server (tests, benchmarks)."""
        return self.uploads.wait_uploads(timeout_s)

    # ---- the decider's, by the names the background planner, tests and benchmarks use -----------------------
    def marks(self, n: int) -> tuple | None:
        """``Decider.marks``: the exact key of request ``n``'s decision inputs (``Lookahead.take_exact``)."""
        return self.decider.marks(n)

    def _shares(self) -> Shares:
        return self.decider.shares()

    def _decide_inputs(self) -> dict:
        return self.decider.inputs()

    def _decide_now(self) -> planning.PlanChoice:
        """The request in progress's decision with the session open (``Decider.decide_now``; a method of the
        engine, which ``_remote`` calls, so that a benchmark can time it on one engine)."""
        return self.decider.decide_now(self._n)

    # ---- connection --------------------------------------------------------------------------------
    def connect(self) -> None:
        """Hello (RTT), server costs (once), QueryWeights, open the session, optional upload probe."""
        if self.conn.alive:
            return
        o, conn = self.options, self.conn
        self.cpu.open()  # profile at the nominal frequency, at the share of a core the process has now
        try:
            rtts = conn.open()
            for r in rtts:
                self.probe.observe_rtt(r * 1e3)
            self._recall_transport(conn.server_info)
            if self.cost_model.base is None:
                self._cut_for_server(conn.server_info)
                self.cost_model.measure(self._plan_model, conn.stub, conn.server_info, threads=o.threads,
                                        runs=o.profile_runs, slowdown=float(o.ue_slowdown))
            held = wire.query_weights(conn.stub, o.tenant, list(self.uploads.sha_names), o.connect_timeout_s * 4)
            self.uploads.reset(held)
            self.path.reset()
            link = self.probe.planning_link()
            send = self.send_rate.rate_mbps()
            costs = self.cost_model.costs
            limit = conn.server_info.limits.max_cost_graph_ops
            if limit and len(costs.ops) > limit:  # the server would refuse the session: plan without the allocator
                log.info("cost graph of %d ops is over the server's %d: no profile sent (the allocator gives an "
                         "equal share)", len(costs.ops), limit)
                profile = None
            else:
                profile = wire.UeProfile(costs.to_json(), link.uplink_mbps, link.rtt_ms, weight=o.weight,
                                         send_mbps=send)
            sess = conn.start_session(self.graph.name, profile, chunk_bytes=o.chunk_bytes,
                                      rate_bps=self.probe.rate_bps,
                                      ack_handler=self.uploads.ack_handler, cell_uplink_mbps=o.cell_uplink_mbps,
                                      op_timings=o.op_timings)
            self.send_rate.opened(sess, send if profile is not None else 0.0)
            lo = self.probe.override
            if o.probe and not self.probe.probed and self.policy != "local":
                # the send CPU cost; the uplink unless overridden (once: a re-opened session knows them)
                acked = self.probe.probe_uplink(self.graph, conn.stub, o.tenant, sess, probe_bytes=o.probe_bytes,
                                                timeout_s=o.connect_timeout_s,
                                                link=lo is None or lo.uplink_mbps is None)
                self.uploads.query_held |= acked
                self.tally.mark(sess)  # the probe's bytes (data channel) are no request's
                # the allocator caps the uplink share at it
                if profile is not None and self.send_rate.rate_mbps() != profile.send_mbps:
                    self.send_rate.report(sess, margin=0.0)
            if o.pace:
                conn.start_watch(min(rtts), self.probe.observe_rtt, self.backlog.socket_s)
        except ServerError:
            conn.teardown()
            raise
        if self._n == 0:  # the first request's decision (and its slice) made while connecting
            self.decider.decide_first()
        if self.freeze_after_profile:  # once: what profiling and the first plan built lives as long as the engine
            self.freeze_after_profile = False
            refreeze_gc()

    def _recall_transport(self, info: wire.ServerInfo | None) -> None:
        """With ``transport_memory``, key this client's ``transport_cache`` entry (the server process, the model, the
        given link, the slowdown, the CPU share now) and, when its cost model learned nothing yet in this process,
        start from what an earlier process of this UE kept there (session 32: the first decision was made without
        the UE's own cost of a remote request)."""
        if not self.options.transport_memory or info is None:
            return
        self._disk_key = transport_cache.cache_key(info.instance_id, self.graph.model_hash, self._memory_link,
                                                   float(self.options.ue_slowdown), self.cpu.share)
        if self._disk_key is None or not self.cost_model.fresh():
            return
        snap = transport_cache.load(self._disk_key)
        if snap is not None and self.cost_model.seed(snap):
            log.info("starting from %d transport residuals kept for this server and model (mean %.1f ms)",
                     len(snap["residuals"]), self.cost_model.transport_ms)

    def _keep_transport(self) -> None:
        """Write what the cost model learned from requests to this client's ``transport_cache`` entry."""
        if self._disk_key is None or self.cost_model.fresh():
            return
        transport_cache.store(self._disk_key, self.cost_model.snapshot())

    def close(self) -> None:
        self.ahead.stop()  # a running background decision ends first (it holds the engine's lock)
        with self._lock:
            self.ahead.drop()
            self._keep_transport()
            self.conn.close()
            self.cpu.close()  # (the control restores the nominal frequency)
        self._choice = None

    # ---- one request -------------------------------------------------------------------------------
    def infer(self, args, kwargs=None, *, started: float | None = None,
              check: DeferredCheck | None = None) -> tuple[Any, RequestReport]:
        """One request of ``forward(*args, **kwargs)``: (output in the model's own structure, report).
        ``started``: ``time.perf_counter()`` when the caller's call began (``CoinferClient.__call__``; None: now),
        from which the report's ``call_before_ms`` counts. ``check``: the call's weight check, for a split request to
        run while it waits for the server (``DeferredCheck``; the caller finishes it after this returns)."""
        if started is None:
            started = time.perf_counter()
        ahead, forecast = self.ahead, self.forecast
        ahead.arrived()
        background = ahead.spec is not None or ahead.worker.pending  # (before the wait: the call's kind)
        wait_ms = ahead.wait()  # the decision made for this request in the background, if it still runs
        with self._lock:
            mode = forecast.mode(self.conn, self.uploads, self._n, background)
            self._choice = None
            self.cpu.plan_share = self.cpu.share
            ahead.begin()
            forecast.begin()
            self.path.run_end = None
            self.path.deferred = check
            try:
                out, rep = self._infer(bind(self.model.graph, args, kwargs))
            finally:
                self.path.deferred = None
            self.warm_split = bool(rep.server_ops) and not rep.fallback
            after_kind = after_kind_of(self._choice, self.graph.weights)
            forecast.predict(rep, started, mode, after_kind)
            self.send_rate.report(self.conn.session)
            self.tally.fill(rep, self._choice, self._pinned_report)
            ahead.report(rep, self._n, wait_ms)
            rep.cpu_share = share = self.cpu.plan_share
            rep.plan_at_share_ms = rep.plan_cpu_ms / share
            nxt = self._n + 1 if ahead.due() else None
            run_end = self.path.run_end
        if nxt is not None:
            ahead.submit(nxt)
        ahead.returned()
        forecast.returned(run_end, after_kind)  # noted by the next call, under the lock (the job may hold it now)
        return out, rep

    def _infer(self, env: dict[str, torch.Tensor]) -> tuple[Any, RequestReport]:
        """The request on bound inputs: local, offline (suspended session), split, or a fallback."""
        self._n += 1
        self._offline_plan = (0.0, 0.0)
        n, conn, path = self._n, self.conn, self.path
        if self.policy == "local":
            return path.run_local(env, "local", n, fallback=False)
        wait = conn.backoff_left()
        if wait > 0:
            why = f"{conn.local_reason} (retry in {wait:.1f} s)"
            return path.run_local(env, self.policy, n, reason=why, error=conn.last_error)
        if conn.suspended is not None:
            done = self._offline(env)
            if done is not None:
                return done
        try:
            self.connect()
        except ServerError as e:
            conn.note_failure(e, loud=self.options.fallback)
            return path.run_local(env, self.policy, n, reason=f"{e.reason}: {e}", error=e)
        sess = conn.session
        w0 = sess.queue.sent.weight_bytes
        try:
            out, rep = self._remote(env)
        except ServerError as e:  # raised before anything ran (e.g. the stream broke at begin)
            conn.note_failure(e, loud=self.options.fallback)
            return path.run_local(env, self.policy, n, reason=f"{e.reason}: {e}", error=e)
        self.tally.weights(rep, sess, w0)
        return out, rep

    def _remote(self, env: dict[str, torch.Tensor]) -> tuple[Any, RequestReport]:
        """A request with the session open. Its ``plan_ms`` / ``plan_cpu_ms`` are the whole decision on its clock,
        wall / this thread's CPU ms: the server state, shares, refusals and estimates read, the decision or its
        reuse check (a reused decision's too: session 12 reported 0 for it, timing none of that)."""
        t_start, c_start = window_clocks()
        self.cpu.plan_share = self.cpu.share  # (after ``connect``: the first request's share is read there)
        try:  # the backlog read and its charge too: a failure there must not cost the answer either (review21)
            choice, backlog = self.backlog.charge(self._decide_now(), self.graph.weights)
        except Exception as e:  # a planner failure must not cost the answer
            log.exception("planner failed; running locally")
            return self.path.run_local(env, self.policy, self._n,
                                       reason=f"planner failed: {type(e).__name__}: {e}", kind="planner failure")
        w, c = self._offline_plan  # an offline decision earlier in this request that needed the server
        now, c_end = window_clocks()
        self.forecast.decided_at = now
        plan = ((now - t_start) * 1e3 + w, (c_end - c_start) * 1e3 + c)
        out, rep = self.runner.run(env, choice, self._n, t_start, plan[0], self._adopt)
        rep.plan_ms, rep.plan_cpu_ms = plan
        if choice.server_ops:
            rep.uplink_backlog_ms = backlog
            rep.uplink_backlog_added_ms = choice.details.get("backlog_added_ms", 0.0)
        return out, rep

    def _offline(self, env) -> tuple[Any, RequestReport] | None:
        """Plan with what the server held when the session was suspended (``Decider.decide_offline``); run locally
        if the plan stays local. None: the plan needs the server (or the state is too old): re-open the session."""
        s = self.conn.suspended
        if time.monotonic() - s.since > self.options.refresh_s:
            return None
        t0, c0 = window_clocks()
        try:
            choice = self.decider.decide_offline(s, self._n)
        finally:  # on this request's clock whatever comes of it (a decision that needs the server is made again)
            t1, c1 = window_clocks()
            self._offline_plan = ((t1 - t0) * 1e3, (c1 - c0) * 1e3)
        if choice is None or choice.server_ops or choice.background or choice.invest:
            return None
        self.forecast.decided_at = time.perf_counter()
        self._adopt(choice)
        out, rep = self.path.run_planned_local(env, choice, self._n)
        rep.plan_ms, rep.plan_cpu_ms = self._offline_plan
        rep.offline = True
        return out, rep

    def _adopt(self, choice: planning.PlanChoice) -> None:
        """Make ``choice`` the plan of the request in progress, at its CPU frequency (robust's choice;
        the nominal one for other policies)."""
        self._choice = choice
        self.path.time_factor = self.cpu.apply(choice.details.get("frequency_ghz", self.cpu.energy.f_nominal_ghz))


_ENGINES: weakref.WeakSet[RemoteEngine] = weakref.WeakSet()
"""Every live remote engine (``_after_fork_in_child``)."""


def window_clocks() -> tuple[float, float]:
    """(``time.perf_counter()``, ``time.thread_time()``) in s, for either end of a request's ``plan_ms`` /
    ``plan_cpu_ms`` window: the thread's CPU clock read first. Reading CLOCK_THREAD_CPUTIME_ID makes the kernel
    account the thread's runtime at once (otherwise at its next tick): on a UE under a CFS quota a quota the
    process overspent before the window is found by that read, and the throttle (up to a period: 9 ms of 10 at
    10 % of a core) starts there. Read before the wall clock at the start, it falls before the window (the request
    still pays it: it is in its ``call_ms``); read before the wall clock at the end, a quota the window itself
    overspent is paid inside it. Session 20: with the wall clock read first at the start, the session-19 grid's
    windows held a throttle owed by earlier work (`docs/results/plan_ms/session20/window_clock.py`: such a window
    of 0.1 ms of CPU after a busy loop waited over half a period in most rounds, read CPU-first in almost none)."""
    c = time.thread_time()
    return time.perf_counter(), c


def _after_fork_in_child() -> None:
    """In a forked child: no engine has a background worker (threads do not survive ``fork``), and an engine
    lock its worker held at the fork would stay held forever: each engine gets a new lock and forgets its
    worker's job and speculation (its next request decides itself). The child's gRPC channels are the
    parent's (gRPC does not support using them across ``fork``): a child should build its own client."""
    for eng in list(_ENGINES):
        eng._lock = threading.Lock()
        eng.ahead.reset_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- the public client ---------------------------------------------------------------------------------
MAX_SIGNATURES = 4
"""Input signatures a client keeps a captured graph (and an engine) for besides its first (LRU)."""


class CoinferClient:
    """Call it like the model: ``client(*args, **kwargs)`` returns what ``model(*args, **kwargs)`` returns,
    in the model's own structure (dicts, lists, nested tuples, ``None`` leaves, constants), on every
    path: local, split, offloaded, fallback. ``server=None`` runs in-process only.

    Inputs may be tensors or numpy arrays of the captured dtypes (nothing is cast: another dtype is an
    ``InputError``, a ``ValueError``), in any strides or memory format. A call whose tensors differ from the
    example inputs only in their sizes (another batch size, image size, sequence length) or memory layouts
    (``modelgraph.pytree_io.layout_key``: a channels_last or HWC-permuted image for a model captured with a
    contiguous one, or the reverse; a slice's strides alone are no new layout, unless the forward reads strides: then
    they are, ``modelgraph.pytree_io.reads_layout``) gets the model captured again
    for that input signature, so that its outputs have the strides eager's have for those inputs, once
    (``modelgraph.signatures.SignatureCache``), with its own engine (its own profile and session; the
    server's weights are shared by sha256): at most ``MAX_SIGNATURES`` besides the first, least
    recently used dropped. That costs one capture (about the first capture's time) plus, for a remote
    engine, its profiling and connection. So does a call in another form than the capture's (another tree
    structure: an optional argument left out or ``None``, one the capture did not pass, another number of
    ``*args``; or another constant), captured in its own form (``_form``; session 17). A call that differs in
    tensor dtypes or ranks alone is refused (never cast), as is any other form for a client of a graph.

    ``example_kwargs``: keyword arguments of ``forward`` to capture a module with besides
    ``example_inputs`` (its positional arguments), e.g. ``{"mask": m}`` for a required keyword-only tensor
    of ``forward(x, *, mask)``; calls then pass them as ``client(x, mask=m)``.

    ``options`` (a ``ClientOptions``; default ``ClientOptions()``) says how the client plans, uploads
    and falls back; keyword ``overrides`` replace single fields, in the looser forms
    ``ClientOptions.build`` converts: ``link`` as a ``partitioner.Link``, ``{"uplink_mbps", "rtt_ms"}``
    or ``(uplink_mbps, rtt_ms)``; ``server_ops`` as a position or op names. ``server`` is ``HOST:PORT``
    (port 1-65535). Raises ``InputError`` for a model that cannot be captured, a bad address or option.
    """

    def __init__(self, model: str | torch.nn.Module | ModelGraph, example_inputs: Any = None,
                 *, server: str | None = None, options: ClientOptions | None = None, name: str = "",
                 weights: str | None = None, example_kwargs: Mapping[str, Any] | None = None, **overrides: Any):
        if options is not None and not isinstance(options, ClientOptions):
            raise InputError(f"options must be a ClientOptions, got {type(options).__name__}")
        self.server = None if server is None else parse_server_address(server)
        # one heap for profiling and for every request, of every policy: a session raised glibc's thresholds
        # (ue_client.heap) only when it opened, after the UE's profile and connect-time runs, so those ran
        # with ~4,000 page faults per mobilenet_v2 pass (18.4 vs 11.8 ms CPU) and every later request, local
        # ones too, ran faster than profiled (warm mobilenet_v2 at 25 % of a core: local predicted ~58 ms,
        # measured ~47; every planner offloaded, at 54-63 ms)
        retain_freed_buffers()
        self.model = prepare_model(model, example_inputs, name=name, weights=weights, example_kwargs=example_kwargs)
        self.graph = self.model.graph
        self.example_inputs = self.model.example_inputs
        self.example_kwargs = dict(self.model.example_kwargs)
        self._option_args = (options, dict(overrides))
        self.options = ClientOptions.build(self.graph, options, **overrides)
        self._watch = WeightWatch(self.graph, self.model.module, self.options.weight_check)
        self._last_engine: LocalEngine | RemoteEngine | None = None
        """The engine the last answered call ran on (whether the next call's weight check may be deferred)."""
        """The weights as captured: a call after the user changed them is refused (``WeightWatch``)."""
        self.policy = self.options.policy
        self.engine: LocalEngine | RemoteEngine = self._make_engine(self.model, self.options)
        self._gc = self.options.gc_freeze
        """This client asked for the objects alive now to be frozen (``ue_client.heap.freeze_gc``); released
        at ``close``."""
        if self._gc:  # the captured model and torch's own objects: alive as long as the client
            freeze_gc()
            if isinstance(self.engine, RemoteEngine):
                self.engine.freeze_after_profile = True
        self._exact = reads_layout(self.graph.python_reads)
        """The forward reads its inputs' strides (``x.is_contiguous()``): a non-dense input's own strides are its
        layout (``layout_key(t, exact=True)``), captured on them, not copied dense (session 22)."""
        self.signature = input_signature(self.example_inputs, self.example_kwargs or None, self._exact)
        self._autocast = autocast_state()
        """The CPU autocast state the model was captured in (``modelgraph.signatures.autocast_state``): a call in
        another is captured once more in its own (break38 F1: a call under ``torch.autocast`` answered float32 from
        the server where ``model(x)`` answers bfloat16, and a client built under it answered bfloat16 outside)."""
        ex = self.example_inputs
        self._plain = (tuple((tuple(t.shape), t.dtype, layout_key(t, self._exact)) for t in ex)
                       if isinstance(ex, tuple) and not self.example_kwargs
                       and all(isinstance(t, torch.Tensor) for t in ex) else None)
        """(shape, dtype, layout) of each example input when they are a flat tuple of tensors: a call with
        tensors of the same shapes, dtypes and memory layouts (``layout_key``) has the first signature
        (``_graph_for`` then skips the pytree walk)."""
        module = self.model.module
        self._signatures = None if module is None else SignatureCache(
            module, name=self.graph.name, capacity=MAX_SIGNATURES + 1,
            first=(self.example_inputs, self.graph, self.example_kwargs), exact_layout=self._exact)
        """Graphs per input signature (``modelgraph.signatures``); None for a model given as a graph."""
        io = self.graph.io
        self._forward = None if module is None or io is None else forward_signature(module)
        """The user's ``forward`` signature: calls are bound as Python binds them (``_bound``)."""
        self._captured_order = () if io is None else tuple(io.in_spec.children()[1].context or ())
        """The captured call's keyword names in its order (a pytree dict spec keeps key order: a call with the
        same keywords in another order is put back in this one, else it would be a form of its own)."""
        self._captured_keys = frozenset(self._captured_order)
        self._engines: OrderedDict[tuple, tuple[ModelGraph, LocalEngine | RemoteEngine]] = OrderedDict()
        self.reports: list[RequestReport] = []
        self.last_report: RequestReport | None = None
        """The report of the last call, if it returned; None before the first call and after a call that raised
        (refused inputs or weights, ``AccessDenied``, a server error under ``fallback=False``): before session 17
        it still held the previous request's report then. ``reports`` keeps every returned call's."""

    def _make_engine(self, model: PreparedModel, options: ClientOptions) -> LocalEngine | RemoteEngine:
        if self.server is None:
            return LocalEngine(model)
        return RemoteEngine(model, self.server, options)

    # ---- inputs -> the graph for their signature ---------------------------------------------------------
    def _args(self, args: tuple, kwargs: Mapping[str, Any] | None = None) -> Any:
        """Positional arguments as given; the older call form ``client([x1, x2])`` (one list or tuple for a
        model of several inputs) and ``client({"input name": x})`` (the graph's flat input names) too, when
        the call has no keyword arguments and Python could not bind it to the user's ``forward`` as given
        (``client(xs, bias=b)`` of ``forward(xs, bias=None)`` is that call, not the older form)."""
        if len(args) == 1 and isinstance(args[0], list | tuple | dict) and self._n_args() != 1 and not kwargs:
            if self._forward is not None:
                try:
                    self._forward.bind(*args)
                    return args
                except TypeError:
                    pass
            return args[0] if isinstance(args[0], dict) else tuple(args[0])
        return args

    def _bound(self, args: Any, kwargs: dict) -> tuple[Any, dict]:
        """``(args, kwargs)`` in the form the model was captured with (``modelgraph.pytree_io.rebind_call``):
        ``client(xs, bias=bias)`` for a model captured with ``(xs, bias)``, defaults, ``*args``, keyword-only
        parameters, as ``model(...)`` binds them. A plain call in the captured form is returned as is.
        ``InputError`` for a call Python would refuse or an argument the capture did not pass (``_form`` then
        captures the call's own form when the module is known)."""
        if self._forward is None or isinstance(args, Mapping):
            return args, kwargs
        if len(args) == self._n_args() and kwargs.keys() == self._captured_keys:
            if kwargs and tuple(kwargs) != self._captured_order:
                kwargs = {k: kwargs[k] for k in self._captured_order}  # review17 F1: another order, the same call
            return args, kwargs
        try:
            return rebind_call(self._forward, self.graph.io, args, kwargs)
        except ModelGraphError as e:
            raise InputError(str(e)) from None

    def _n_args(self) -> int:
        io = self.graph.io
        return len(self.graph.inputs) if io is None else io.in_spec.children()[0].num_children

    def _graph_for(self, args: Any, kwargs: dict,
                   before_capture: Callable[[], None] | None = None) -> tuple[tuple | None, ModelGraph]:
        """(signature key, or None for the first graph; the captured graph) for these inputs. ``before_capture``: run
        before a new signature is captured (the call's deferred weight check: break41 F1, a capture of a changed
        module was kept and answered later calls of its signature wrongly once the change was undone)."""
        if isinstance(args, Mapping) or self._signatures is None:
            return None, self.graph
        captured = self.graph.grad_mode  # None unless the forward reads the autograd mode (as most do not)
        mode = None if captured is None else grad_mode(args, kwargs, bool(captured[2]))
        cast = autocast_state()
        cast = None if cast == self._autocast else cast  # another autocast state than the capture's (break38 F1)
        plain = self._plain
        if mode == captured and cast is None and plain is not None and not kwargs and isinstance(args, tuple) and len(
                args) == len(plain) and all(
                isinstance(a, torch.Tensor) and not a.is_nested and a.dtype == d and a.shape == s
                and layout_key(a, self._exact) == k for a, (s, d, k) in zip(args, plain)):
            return None, self.graph  # the first signature (what ``input_signature`` would say, ~0.1 ms sooner)
        sig = input_signature(args, kwargs, self._exact)
        if any(k[0] == "odd" for k in sig[1:]):
            return None, self.graph  # a sparse or nested tensor: binding refuses it, naming it (``check_tensor``)
        other = sig != self.signature and (_sizes_only(sig, self.signature) or _other_form(sig, self.signature))
        if not other and ((mode == captured and cast is None) or sig != self.signature):
            return None, self.graph  # the first graph (binding it names any other difference: a dtype)
        # another size, form or layout; for a forward that reads it, another autograd mode (session 18); another
        # autocast state, which the dispatcher applies to every op (break38 F1): each captured in its own
        key = sig if mode is None else (*sig, ("grad mode", mode))
        try:
            return (key if cast is None else (*key, ("autocast", cast))), self._signatures.get(
                args, kwargs or None, mode, autocast=cast, before_capture=before_capture)
        except ModelGraphError as e:
            raise InputError(str(e)) from e

    def _engine_for(self, sig: tuple | None, graph: ModelGraph, args: Any,
                    kwargs: Mapping[str, Any] | None = None) -> LocalEngine | RemoteEngine:
        if sig is None:
            return self.engine
        hit = self._engines.get(sig)
        if hit is not None and hit[0] is graph:
            self._engines.move_to_end(sig)
            return hit[1]
        model = PreparedModel(graph, tuple(args), self.model.spec, self.model.module, dict(kwargs or {}))
        options, overrides = self._option_args
        given = overrides.get("server_ops", None if options is None else options.server_ops)
        if given is not None and not isinstance(given, int):
            try:
                fixed_split(graph, given)
            except InputError as e:  # break38 F5: "unknown ops in server part: ['max_1']" for another batch size
                raise InputError(
                    f"server_ops names ops of the graph captured from the example inputs; this call's inputs were "
                    f"captured once more (another size, form, layout or autocast state) into a graph those names do "
                    f"not split ({e}): give server_ops as a position (ops from k on), which applies to every "
                    f"captured graph, or call with the example's signature") from None
        opts = ClientOptions.build(graph, options, **overrides)
        eng = self._make_engine(model, opts)
        self._engines[sig] = (graph, eng)
        while len(self._engines) > MAX_SIGNATURES:
            _, (_, old) = self._engines.popitem(last=False)
            old.close()
        return eng

    # ---- calls ------------------------------------------------------------------------------------------
    def _form(self, args: tuple, kwargs: dict) -> tuple[Any, dict]:
        """``(args, kwargs)`` bound as the capture took them (``_bound``); a call Python binds to ``forward`` but
        in another form than the capture's (an argument the capture did not pass, another constant) as given, to
        be captured in its own form (``_graph_for``). ``InputError`` for a call Python would refuse."""
        raw = self._args(args, kwargs)
        try:
            return self._bound(raw, kwargs)
        except InputError as refused:
            if self._signatures is None or self._forward is None or isinstance(raw, Mapping):
                raise
            try:
                bound = self._forward.bind(*raw, **kwargs)
            except TypeError:
                raise refused from None  # ``rebind_call``'s line naming what Python refuses
            # One form per call whatever its style (review17 F1: ``c(x, a=a, b=b)`` and ``c(x, b=b, a=a)``, or
            # ``c(x, a, b, 2.0)`` and ``c(x, a, b, scale=2.0)``, were captured once each): Python's own binding,
            # parameters that can go by position by position, the rest by keyword in the signature's order.
            return tuple(bound.args), dict(bound.kwargs)

    def __call__(self, *args: Any, **kwargs: Any):
        started = time.perf_counter()  # the call's clock (``RequestReport.call_ms``, ``call_predicted_ms``)
        self.last_report = None  # a call that raises leaves no report: not the previous request's
        last = self._last_engine
        check = None
        if isinstance(last, RemoteEngine) and last.warm_split:
            check = DeferredCheck(self._watch.check)  # likely a warm split again: checked while the server computes
        else:
            self._watch.check()
        args, kwargs = self._form(args, kwargs)
        sig, graph = self._graph_for(args, kwargs, None if check is None else check.finish)
        engine = self._engine_for(sig, graph, args, kwargs)
        if check is not None and (check.ran or engine is not last):  # checked before a capture, or another engine
            check.finish()
            check = None
        # binding detaches the inputs: whether one required grad, for an output layout that depends on it (break41 F3)
        token = INPUTS_REQUIRE_GRAD.set(inputs_require_grad(graph.out_layout, (args, kwargs)))
        try:
            with no_autocast():  # the graph as traced, its casts in it: the server applies no autocast either
                out, rep = engine.infer(args, kwargs or None, started=started, check=check)
        except Exception:
            if check is not None:  # a change found is what to name (the module made float64, then its input refused)
                check.finish()
            raise
        finally:
            INPUTS_REQUIRE_GRAD.reset(token)
        self._last_engine = engine
        if check is not None:
            check.finish()  # a change found: its InputError instead of an answer computed on changed weights
        rep.call_ms = (time.perf_counter() - started) * 1e3
        rep.request = len(self.reports) + 1
        self.last_report = rep
        self.reports.append(rep)
        return out

    def reference(self, *args: Any, **kwargs: Any):
        """The model's output computed entirely on this device by the captured graph (the correctness
        reference: every path equals it bit for bit on CPU), in the model's own structure."""
        self._watch.check()
        args, kwargs = self._form(args, kwargs)
        _, graph = self._graph_for(args, kwargs)
        with no_autocast():
            return run_graph(graph, args, kwargs=kwargs or None)

    def eager(self, *args: Any, **kwargs: Any):
        """The user's own eager module on these inputs (None when the model came as a captured graph).

        Under ``modelgraph.tracelock.TORCH_TRACE_LOCK``, as every capture: ``torch.export`` in another
        thread (another client's capture of this module) swaps the module's parameters for fake tensors."""
        module = self.model.module
        if module is None:
            return None
        args = self._args(args, kwargs)
        if isinstance(args, Mapping):
            args = tuple(args[n] for n in self.graph.inputs)
        with TORCH_TRACE_LOCK, torch.inference_mode():
            return module(*args, **kwargs)

    @property
    def link(self) -> Link | None:
        return self.engine.planning_link() if isinstance(self.engine, RemoteEngine) else None

    def close(self) -> None:
        self.engine.close()
        for _, eng in self._engines.values():
            eng.close()
        if self._gc:
            self._gc = False
            release_gc()

    def __enter__(self) -> CoinferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sizes_only(a: tuple, b: tuple) -> bool:
    """Two input signatures differ only in tensor sizes or memory layouts (same structure, dtypes, ranks and
    constants): a graph captured for the other signature answers them as the eager module does."""
    if len(a) != len(b) or a[0] != b[0]:
        return False
    for x, y in zip(a[1:], b[1:]):
        if x[0] != y[0]:
            return False
        if x[0] == "t":
            if x[2] != y[2] or len(x[1]) != len(y[1]):
                return False
        elif x != y:
            return False
    return True


def _other_form(a: tuple, b: tuple) -> bool:
    """Two input signatures of calls in different forms: another tree structure (an optional argument left out
    or ``None``, another number of ``*args``) or another constant (``output_attentions=False``). A graph captured
    for that form answers as the eager module does; a call that differs from the captured form in tensor dtypes
    alone is not one (refused, never cast)."""
    if len(a) != len(b) or a[0] != b[0]:
        return True
    return any(x[0] != y[0] or (x[0] == "c" and x != y) for x, y in zip(a[1:], b[1:]))


def new_tenant() -> str:
    """A fresh tenant id (its own weight namespace: a cold server for this client)."""
    return f"ue-{uuid.uuid4().hex[:12]}"


__all__ = ["BACKGROUND_MIN_GAP_MS", "MAX_SIGNATURES", "MAX_SLICES", "ClientOptions", "CoinferClient", "CoinferError",
           "LinkOverride", "LocalEngine", "PreparedModel", "RemoteEngine", "RequestReport", "new_tenant",
           "prepare_model"]
