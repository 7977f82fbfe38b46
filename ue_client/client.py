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
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from modelgraph import (
    ModelGraph,
    ModelGraphError,
    Program,
    ShapeError,
    Split,
    capture,
    collect_outputs,
    load_model,
    make_slice,
    run_ue_part,
    tensor_bytes,
)
from modelgraph.execute import bind_inputs
from modelgraph.tensors import TensorMeta, restore_layout, tensor_from_bytes
from partitioner import CostGraph, Link
from partitioner.state import ServerState, Shares
from ue_client import planning, wire
from ue_client.errors import (
    CoinferError,
    DeadlineExceeded,
    InputError,
    ProtocolError,
    RequestFailed,
    ServerError,
    ServerUnavailable,
)
from ue_client.session import BACKGROUND, FOREGROUND, QueueWatch, SessionStream, UplinkItem

log = logging.getLogger(__name__)

MAX_SLICES = 4
"""Slice ids kept per session (the server allows a few; the least recently used id is replaced)."""


# ---- reports ---------------------------------------------------------------------------------------------
@dataclass
class RequestReport:
    """One request, as the runtime saw it. ``predicted_ms`` is the simulator's latency of what ran."""

    request: int
    policy: str
    server_ops: int
    ue_ops: int
    uploaded_weight_bytes: int
    """Weight bytes put on the uplink while this request ran (its own needs and background uploads)."""
    sent_tensor_bytes: int
    predicted_ms: float | None
    measured_ms: float
    fallback: bool = False
    fallback_reason: str = ""
    background_bytes: int = 0
    """Weight bytes uploaded between the previous request and this one (progressive offloading)."""
    needed_upload_bytes: int = 0
    """Weight bytes this request's split needed that the server did not hold when it was planned."""
    serial_ms: float | None = None
    """Simulated latency of the same split with serial uploading (weights first, then inference)."""
    warm_ms: float | None = None
    plan_ms: float = 0.0
    link: dict[str, float] = field(default_factory=dict)
    server_timings: dict[str, float] | None = None
    max_abs_diff_vs_local: float | None = None
    invest: bool = False
    """The plan uploaded the warm target's weights in this request (horizon / rent-or-buy decision)."""
    plan_reason: str = ""
    offline: bool = False
    """Planned and run without a session (suspended while plans stay local): no server traffic."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- link ----------------------------------------------------------------------------------------------
def _make_estimator():
    from profiler.link import LinkEstimator

    return LinkEstimator()


@dataclass(frozen=True)
class LinkOverride:
    """Values that replace the measured link estimates for planning; None keeps the estimate."""

    uplink_mbps: float | None = None
    downlink_mbps: float | None = None
    rtt_ms: float | None = None

    def __post_init__(self) -> None:
        for k in ("uplink_mbps", "downlink_mbps"):
            v = getattr(self, k)
            if v is not None and not v > 0:
                raise InputError(f"{k} must be > 0, got {v!r}")
        if self.rtt_ms is not None and not self.rtt_ms >= 0:
            raise InputError(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")

    def apply(self, est: Link) -> Link:
        return Link(self.uplink_mbps or est.uplink_mbps,
                    self.downlink_mbps or (self.uplink_mbps if est.downlink_mbps is None else est.downlink_mbps),
                    est.rtt_ms if self.rtt_ms is None else self.rtt_ms)


def _as_link(link: Link | LinkOverride | Mapping | Sequence | None) -> LinkOverride | None:
    if link is None or isinstance(link, LinkOverride):
        return link
    if isinstance(link, Link):
        return LinkOverride(link.uplink_mbps, link.downlink_mbps, link.rtt_ms)
    if isinstance(link, Mapping):
        return LinkOverride(link.get("uplink_mbps"), link.get("downlink_mbps"), link.get("rtt_ms"))
    up, rtt = link
    return LinkOverride(None if up is None else float(up), None, None if rtt is None else float(rtt))


# ---- model preparation ---------------------------------------------------------------------------------
@dataclass
class PreparedModel:
    """A captured model and the inputs it was captured with."""

    graph: ModelGraph
    example_inputs: tuple[torch.Tensor, ...]
    spec: str
    module: torch.nn.Module | None = None
    """The eager model, when we have it: running it is the cheapest way to compute everything locally."""


_CAPTURED: dict[tuple, PreparedModel] = {}
_CAPTURE_LOCK = threading.Lock()


def prepare_model(model: str | torch.nn.Module | ModelGraph, example_inputs: Sequence[torch.Tensor] | None = None,
                  *, name: str = "", weights: str | None = None) -> PreparedModel:
    """Capture ``model`` (a spec string, a module or an already captured graph); specs are cached per process."""
    try:
        if isinstance(model, ModelGraph):
            ex = tuple(example_inputs) if example_inputs is not None else tuple(
                torch.randn(m.shape) for m in model.inputs.values())
            return PreparedModel(model, ex, name or model.name)
        if isinstance(model, str):
            key = (model, weights, None if example_inputs is None else tuple(tuple(x.shape) for x in example_inputs))
            with _CAPTURE_LOCK:
                hit = _CAPTURED.get(key)
                if hit is None:
                    lm = load_model(model, weights=weights,
                                    input_shape=None if example_inputs is None else tuple(example_inputs[0].shape))
                    ex = tuple(example_inputs) if example_inputs is not None else lm.example_inputs
                    hit = PreparedModel(capture(lm.module, ex, name=name or lm.name), ex, model, lm.module)
                    _CAPTURED[key] = hit
            return hit
        if isinstance(model, torch.nn.Module):
            if example_inputs is None:
                raise InputError("a module needs example_inputs to be captured")
            ex = tuple(example_inputs)
            return PreparedModel(capture(model, ex, name=name or type(model).__name__), ex,
                                 name or type(model).__name__, model)
    except ModelGraphError as e:
        raise InputError(str(e)) from e
    raise InputError(f"model must be a spec string, an nn.Module or a ModelGraph, got {type(model).__name__}")


def _bind(graph: ModelGraph, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        return bind_inputs(graph, inputs)
    except ShapeError as e:
        raise InputError(str(e)) from None


def run_whole(model: PreparedModel, env: dict[str, torch.Tensor], slowdown: float = 1.0):
    """The whole model on this device: the eager module when available (no interpreter overhead)."""
    g = model.graph
    if model.module is not None and slowdown <= 1.0:
        with torch.inference_mode():
            out = model.module(*(env[n] for n in g.inputs))
        return tuple(out) if isinstance(out, list) else out
    return collect_outputs(g, run_prefix(g, g.split(()), env, slowdown=slowdown))


def run_prefix(graph: ModelGraph, split: Split, env: dict[str, torch.Tensor], *, on_cut_tensor=None,
               slowdown: float = 1.0) -> dict[str, torch.Tensor]:
    """The UE part of ``split`` on bound inputs, calling ``on_cut_tensor`` as each cut tensor exists.

    ``slowdown`` > 1 emulates a device that many times slower than this CPU: after each op the thread
    sleeps (slowdown - 1) x the op's time (sleeping uses no CPU, so a shared test machine stays fair).
    """
    return run_ue_part(graph, split, env, on_cut_tensor=on_cut_tensor, after_op=_pacer(slowdown))


def _pacer(slowdown: float):
    """``after_op`` hook of an emulated slower device: sleep (slowdown - 1) x each op's time."""
    if slowdown <= 1.0:
        return None
    return lambda seconds: time.sleep(seconds * (slowdown - 1.0))


def _run_rest(graph: ModelGraph, split: Split, env: dict[str, torch.Tensor], slowdown: float = 1.0) -> None:
    """Run the server part locally on the UE prefix's env (fallback: nothing of the prefix is redone)."""
    ops = tuple(graph.op_by_name[n] for n in split.server_order)
    prog = Program(ops, frozenset(graph.outputs), trusted=True)
    prog.run(env, graph.weight_values, after_op=_pacer(slowdown))


def slow_costs(costs: CostGraph, slowdown: float) -> CostGraph:
    """UE costs of a device ``slowdown`` times slower (variance x slowdown^2)."""
    if slowdown == 1.0:
        return costs
    ops = tuple(replace(o, ue_ms=o.ue_ms * slowdown, ue_var=o.ue_var * slowdown ** 2) for o in costs.ops)
    samples = None if costs.ue_samples_ms is None else tuple(tuple(x * slowdown for x in row)
                                                              for row in costs.ue_samples_ms)
    return replace(costs, ops=ops, ue_samples_ms=samples, meta={**costs.meta, "ue_slowdown": slowdown})


# ---- engines -------------------------------------------------------------------------------------------
class LocalEngine:
    """Runs the whole captured model in-process: the reference, and the engine without a server."""

    def __init__(self, model: PreparedModel):
        self.model = model
        self._n = 0

    def infer(self, inputs) -> tuple[Any, RequestReport]:
        g = self.model.graph
        env = _bind(g, inputs)
        t0 = time.perf_counter()
        out = run_whole(self.model, env)
        ms = (time.perf_counter() - t0) * 1e3
        self._n += 1
        return out, RequestReport(self._n, "local", 0, len(g.ops), 0, 0, None, ms)

    def close(self) -> None:
        pass


class RemoteEngine:
    """Split execution against one edge server over one channel and one Session stream.

    Requests of one engine are serialised (one in flight): the session stream and the plan state
    belong to the request in progress.
    """

    def __init__(self, model: PreparedModel, server: str, *, policy: str = "auto", link: LinkOverride | None = None,
                 tenant: str = "default", deadline_ms: float | None = None, deadline_factor: float = 4.0,
                 deadline_slack_ms: float = 1000.0, threads: int | None = None, profile_runs: int = 10,
                 chunk_bytes: int = wire.MAX_CHUNK_BYTES, probe: bool = True, probe_bytes: int = 1 << 20,
                 connect_timeout_s: float = 5.0, plan_budget_s: float = 0.3,
                 backoff_s: tuple[float, float] = (0.5, 30.0), costs: CostGraph | None = None, pace: bool = True,
                 ue_slowdown: float = 1.0, fallback: bool = True, server_ops=None, horizon: int | None = None,
                 send_cpu=None, suspend_idle: bool = True, refresh_s: float = 30.0):
        if policy not in planning.POLICIES:
            raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(planning.POLICIES)}")
        self.model = model
        self.graph = model.graph
        self.address = server
        self.policy = policy
        self.link_override = link
        self.tenant = tenant
        self.deadline_ms = deadline_ms
        self.deadline_factor = deadline_factor
        self.deadline_slack_ms = deadline_slack_ms
        self.threads = threads
        self.profile_runs = profile_runs
        self.chunk_bytes = max(wire.MIN_CHUNK_BYTES, min(wire.MAX_CHUNK_BYTES, chunk_bytes))
        self.probe = probe
        self.probe_bytes = probe_bytes
        self.connect_timeout_s = connect_timeout_s
        self.plan_budget_s = plan_budget_s
        self.backoff_s = backoff_s
        self.pace = pace
        if not ue_slowdown >= 1.0:
            raise InputError(f"ue_slowdown must be >= 1, got {ue_slowdown!r}")
        self.slowdown = float(ue_slowdown)
        self.allow_fallback = fallback
        self.fixed_server_ops: frozenset[str] | None = None
        if server_ops is not None:  # a fixed partition: an iterable of op names, or k = first server op
            g = model.graph
            names = [op.name for op in g.ops[int(server_ops):]] if isinstance(server_ops, int) else list(server_ops)
            try:
                self.fixed_server_ops = g.split(names).server_ops
            except ModelGraphError as e:
                raise InputError(str(e)) from None
        self.estimator = _make_estimator()
        if horizon is not None and int(horizon) < 1:
            raise InputError(f"horizon must be >= 1 request, got {horizon!r}")
        self.horizon = None if horizon is None else int(horizon)
        """Requests this client will serve (None: unknown): ``auto`` invests in uploads only if they pay."""
        from partitioner.uecpu import UeCpu
        from profiler.link import SendCpuEstimator

        self.send_est = SendCpuEstimator(cpu_s_per_byte=send_cpu if isinstance(send_cpu, int | float) else None)
        self._send_cpu_fixed = send_cpu if isinstance(send_cpu, UeCpu) else None
        self._lost_ms = 0.0
        self._last_decision: tuple | None = None
        self._planned_with: tuple | None = None
        """(planning link, cost scales, send ms per byte) of the last decision: drift re-plans."""
        self._parked: list[UplinkItem] = []
        """Background weights held off the uplink while the UE computes (CPU-shared UE)."""
        self._scale = {"ue": 1.0, "server": 1.0}
        self._base_sum: tuple | None = None
        """(base cost graph, its UE ms sum): per-request calibration without rebuilding the scaled graph."""
        self._scaled: tuple | None = None
        self.base_costs: CostGraph | None = costs
        self.server_info: wire.ServerInfo | None = None
        self._channel = None
        self._stub = None
        self._session: SessionStream | None = None
        self._watch: QueueWatch | None = None
        self._query_held: set[str] = set()
        self._queued: dict[str, UplinkItem] = {}
        """sha256 -> its uplink item, for every weight put on this session's uplink."""
        self._slices: OrderedDict[frozenset[str], str] = OrderedDict()
        self._slice_seq = 0
        self._rid = 0
        self._n = 0
        self._failures = 0
        self._retry_at = 0.0
        self._target: frozenset[str] | None = None
        self._lock = threading.Lock()
        self._busy_mark: tuple[float, int] | None = None
        self._w_mark: dict[int, int] = {}
        self.weight_acks: list[wire.WeightAck] = []
        """Every WeightStored the server sent (already_present=True would mean a wasted upload)."""
        self._sha_names: dict[str, list[str]] = {}
        for w in self.graph.weights:
            self._sha_names.setdefault(self.graph.weight_sha256(w), []).append(w)
        self.local_reason = ""
        self._last_error: ServerError | None = None
        self.suspend_idle = suspend_idle
        """Close the session while plans stay local and nothing is queued (see ``_suspend``)."""
        self.refresh_s = float(refresh_s)
        """A suspended session is re-opened at least this often, to refresh what the server holds."""
        self._suspended: tuple[ServerState, float, float] | None = None
        """(server state, compute share, monotonic time) when the session was suspended."""
        self._probed = False
        self.suspensions = 0

    # ---- connection --------------------------------------------------------------------------------
    def _rate_bps(self) -> float | None:
        if not self.pace:
            return None
        # Paced at the link's rate, not at the CPU-bound rate: gRPC pulls the next message only when the
        # previous one was written, so a CPU-bound sender queues nothing inside gRPC, while pacing at an
        # estimated CPU rate that was too low (measured: half of what the UE could send) slowed every upload.
        # A little above the estimate: the estimate can grow, and the link's own queue absorbs the rest.
        return self.planning_link().uplink_mbps * 125_000.0 * 1.15

    def connect(self) -> None:
        """Hello (RTT), server costs (once), QueryWeights, open the session, optional upload probe."""
        if self._session is not None and self._session.alive:
            return
        self._teardown()
        self._suspended = None
        self._channel = wire.channel(self.address)
        self._stub = wire.stub(self._channel)
        try:
            info = wire.hello(self._stub, self.tenant, self.connect_timeout_s)
            rtts = [wire.ping(self._channel, self.connect_timeout_s) for _ in range(3)]
            for r in rtts:
                self.estimator.observe_rtt(r * 1e3)
            self.server_info = info
            if self.costs is None:
                self.costs = self._build_costs(info)
            shas = list(self._sha_names)
            self._query_held = wire.query_weights(self._stub, self.tenant, shas, self.connect_timeout_s * 4)
            self._queued = {}
            self._parked = []
            self._slices.clear()
            link = self.planning_link()
            profile = wire.UeProfile(self.costs.to_json(), link.uplink_mbps, link.rtt_ms)
            self._session = SessionStream(self._stub, self.tenant, self.graph.name, chunk_bytes=self.chunk_bytes,
                                          open_timeout_s=self.connect_timeout_s, rate_bps=self._rate_bps,
                                          on_weight_ack=self._on_weight_ack, profile=profile)
            lo = self.link_override
            if self.probe and not self._probed and self.policy != "local":
                # the send CPU cost; the uplink unless overridden (once: a re-opened session knows them)
                self._probe_uplink(link=lo is None or lo.uplink_mbps is None)
                self._probed = True
            if self.pace:
                ch = self._channel
                self._watch = QueueWatch(lambda: wire.ping(ch, 10.0), self._session.queue, min(rtts),
                                         on_idle_rtt=self.estimator.observe_rtt)
        except ServerError:
            self._teardown()
            raise
        if self._n == 0:
            self._plan_ahead()

    def _plan_ahead(self) -> None:
        """Make the first request's decision while connecting: its long part (``auto``'s warm-target
        search) is done once per link estimate, and on a CPU-throttled UE it takes several hundred ms
        that would otherwise land on the first request. The request reuses it when nothing changed."""
        if self.policy == "local" or self.costs is None:
            return
        try:
            self._decide(self.server_state(), Shares(compute=min(1.0, max(1e-3, self._session.share))))
        except Exception:  # the request plans again
            log.debug("planning ahead failed", exc_info=True)

    def _build_costs(self, info: wire.ServerInfo) -> CostGraph:
        from profiler import cost_graph, profile_model

        g = self.graph
        prof = profile_model(g, self.model.example_inputs, threads=self.threads, runs=self.profile_runs,
                             warmup=2)
        spec = make_slice(g, g.split(op.name for op in g.ops), with_hashes=False)
        server_costs = None
        try:
            sp = wire.profile_graph(self._stub, spec.to_json(), timeout_s=600.0)
            server_costs = dict(sp.ops)
        except RequestFailed as e:
            log.warning("server could not profile %s (%s); assuming server op time = UE op time", g.name, e)
        # A cached profile may come from a busier (or quieter) moment: check it against a few runs now.
        env0 = _bind(g, self.model.example_inputs)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            run_ue_part(g, g.split(()), dict(env0))
            runs.append((time.perf_counter() - t) * 1e3)
        if prof.sum_mean_ms > 0:
            # up to 16x: a cached profile may come from this machine without the CPU quota it has now
            self._scale["ue"] = min(16.0, max(0.25, sorted(runs)[1] / prof.sum_mean_ms))
        costs = cost_graph(g, prof, server_costs)
        if server_costs is None:
            costs = costs.with_server_speedup(1.0)
        costs = slow_costs(costs, self.slowdown)
        if info.allowed_ops:
            pinned = [op.name for op in g.ops if op.target not in info.allowed_ops]
            if pinned:
                log.info("%d ops are not on the server's allowlist; they stay on the UE", len(pinned))
                byname = set(pinned)
                costs = replace(costs, ops=tuple(replace(o, offloadable=o.offloadable and o.name not in byname)
                                                 for o in costs.ops))
        return costs

    def _probe_uplink(self, link: bool = True) -> None:
        """Time an upload of the weights nearest the output (any offloading plan needs some of them): the
        uplink rate (``link``) and the CPU time this process spends per byte sent (nothing else runs).

        The CPU of an empty upload call (stream set-up, headers, the answer) is subtracted: counted as
        per-byte cost it overstated a 1 MB probe's cost about 2x on a 10 % CPU quota, and the client then
        paced its uplink at half of what its CPU could send.
        """
        g = self.graph
        chosen, total, seen = [], 0, set()
        for op in reversed(g.ops):
            for w in op.weight_inputs:
                sha, nbytes = g.weight_sha256(w), g.weights[w].nbytes
                if sha in seen or (total >= 64 << 10 and total + nbytes > 8 * self.probe_bytes):
                    continue  # a huge weight would make the probe, not the model, the upload
                seen.add(sha)
                chosen.append((sha, w))
                total += nbytes
            if total >= self.probe_bytes:
                break
        if total < 64 << 10:
            return
        chunk = self._session.queue._chunk_size()  # the chunks the session would send at this rate

        def chunks():
            for sha, w in chosen:
                data = tensor_bytes(g.weight_values[w])
                meta = g.weights[w]
                for off, end in wire.chunk_spans(data.nbytes, chunk):
                    yield wire.weight_chunk(sha, meta.dtype, meta.shape, off, data.nbytes, data[off:end])

        sid = self._session.opened.session_id
        call_cpu = []
        for _ in range(2):
            c = time.process_time()
            wire.upload_weights(self._stub, self.tenant, sid, iter(()), timeout_s=self.connect_timeout_s)
            call_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        acks = wire.upload_weights(self._stub, self.tenant, sid, chunks(), timeout_s=60.0)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        self.send_est.observe(total, max(0.25 * dc, dc - min(call_cpu)))
        if link:
            self.estimator.observe_upload(total, dt, includes_rtt=True)
        for a in acks:
            self._query_held.add(a.sha256)
        log.info("uplink probe: %d bytes in %.1f ms (%.1f ms CPU, %.1f ms of it the call's own) -> %.1f Mbps",
                 total, dt * 1e3, dc * 1e3, min(call_cpu) * 1e3, self.estimator.link().uplink_mbps)

    def _teardown(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if self._session is not None:
            self._session.cancel()
            self._session = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _detach(self) -> tuple:
        """Take the session's pieces off the engine: (queue watch, session, channel), any of them None."""
        parts = (self._watch, self._session, self._channel)
        self._watch = self._session = self._channel = None
        return parts

    @staticmethod
    def _close_parts(watch, session, channel, timeout_s: float) -> None:
        """Close a detached session gracefully (half-close, wait for the server's end) and its channel."""
        if watch is not None:
            watch.stop()
        if session is not None:
            session.close(timeout_s)
        if channel is not None:
            channel.close()

    def _close_session(self, timeout_s: float = 5.0) -> None:
        self._close_parts(*self._detach(), timeout_s)

    def close(self) -> None:
        with self._lock:
            self._close_session()
            self._suspended = None

    # ---- estimates and state -----------------------------------------------------------------------
    @property
    def costs(self) -> CostGraph | None:
        """The cost graph planning uses: the profiled one with UE and server times rescaled by what
        requests actually took (profiles go stale: load, thermal state, a cached profile)."""
        if self.base_costs is None:
            return None
        key = (round(self._scale["ue"], 2), round(self._scale["server"], 2))
        if self._scaled is None or self._scaled[0] != key:
            su, ss = self._scale["ue"], self._scale["server"]
            c = self.base_costs
            ops = tuple(replace(o, ue_ms=o.ue_ms * su, ue_var=o.ue_var * su * su, server_ms=o.server_ms * ss,
                                server_var=o.server_var * ss * ss) for o in c.ops)
            samples = None if c.ue_samples_ms is None else tuple(tuple(x * su for x in r) for r in c.ue_samples_ms)
            self._scaled = (key, replace(c, ops=ops, ue_samples_ms=samples))
        return self._scaled[1]

    @costs.setter
    def costs(self, value: CostGraph | None) -> None:
        self.base_costs = value
        self._scaled = None

    def _base_ue_ms(self) -> float:
        """The profiled UE time of the whole model (cached per base cost graph)."""
        if self._base_sum is None or self._base_sum[0] is not self.base_costs:
            self._base_sum = (self.base_costs, sum(o.ue_ms for o in self.base_costs.ops))
        return self._base_sum[1]

    def _calibrate(self, side: str, measured_ms: float, base_ms: float, alpha: float = 0.3) -> None:
        if base_ms < 2.0 or measured_ms <= 0:
            return
        ratio = min(4.0, max(0.25, measured_ms / base_ms))
        self._scale[side] = (1 - alpha) * self._scale[side] + alpha * ratio


    def planning_link(self) -> Link:
        est = self.estimator.link(default_mbps=20.0, default_rtt_ms=1.0)
        return est if self.link_override is None else self.link_override.apply(est)

    def ue_cpu(self):
        """What sending costs this UE (``partitioner.uecpu.UeCpu``; None before it was measured).

        An emulated slow device (``ue_slowdown`` > 1) sleeps most of its compute time and sends on this
        machine's CPU: its sending is not modelled (None) unless a cost was given (``send_cpu``).
        """
        if self._send_cpu_fixed is not None:
            return self._send_cpu_fixed
        if self.slowdown > 1.0:
            return None
        return self.send_est.ue_cpu(self.threads or torch.get_num_threads())

    def _park_background(self) -> None:
        """Take the background weights off the uplink (the UE is about to compute)."""
        if self._session is None:
            return

        def bg(it: UplinkItem) -> bool:
            if it.kind == "weight" and it.key[0] == BACKGROUND:
                self._parked.append(it)
                return True
            return False

        self._session.queue.drop(bg)

    def _resume_background(self) -> None:
        """Put parked background weights back on the uplink (the UE waits or idles)."""
        parked, self._parked = self._parked, []
        if self._session is None:
            return
        for it in parked:
            if it.remaining > 0:
                self._session.queue.put(it)

    def upload_status(self) -> tuple[int, int]:
        """(weight bytes sent on this session, weight bytes still waiting): for progress bars."""
        s = self._session
        if s is None:
            return 0, 0
        return s.queue.sent.weight_bytes, sum(it.remaining for it in s.queue.pending() if it.kind == "weight")

    def _held_shas(self) -> set[str]:
        s = set(self._query_held)
        if self._session is not None:
            s |= self._session.held
        return s

    def server_state(self) -> ServerState:
        held = self._held_shas()
        names_held, in_flight = set(), {}
        for sha, names in self._sha_names.items():
            if sha in held:
                names_held.update(names)
            elif sha in self._queued:
                for n in names:
                    in_flight[n] = self._queued[sha].remaining
        return ServerState(held=frozenset(names_held), in_flight=in_flight)

    def wait_uploads(self, timeout_s: float) -> bool:
        """Wait until every queued weight was acknowledged by the server (tests, benchmarks)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            s = self._session
            if s is None and self._suspended is not None:
                return True  # suspended only after every queued weight was acknowledged
            if s is None or not s.alive:
                return False
            if all(sha in s.held for sha in self._queued):
                return True
            time.sleep(0.02)
        return False

    def _on_weight_ack(self, ack: wire.WeightAck, t: float) -> None:
        """Passive uplink estimate: bytes handed over in this busy period up to this weight's last chunk."""
        self.weight_acks.append(ack)
        q = self._session.queue if self._session is not None else None
        if q is None:
            return
        rec = q.busy_marks.get(ack.sha256)
        if rec is None:
            return
        start, nbytes = rec
        self._busy_mark = (t - start, nbytes)

    # ---- one request -------------------------------------------------------------------------------
    def infer(self, inputs) -> tuple[Any, RequestReport]:
        with self._lock:
            g = self.graph
            env = _bind(g, inputs)
            self._n += 1
            if self.policy == "local":
                return self._local(env, "local", fallback=False)
            now = time.monotonic()
            if now < self._retry_at:
                why = f"{self.local_reason} (retry in {self._retry_at - now:.1f} s)"
                return self._local(env, self.policy, reason=why, error=self._last_error)
            if self._suspended is not None:
                done = self._offline(env)
                if done is not None:
                    return done
            try:
                self.connect()
            except ServerError as e:
                self._note_failure(e)
                return self._local(env, self.policy, reason=f"{e.reason}: {e}", error=e)
            sess = self._session
            w0 = sess.queue.sent.weight_bytes
            try:
                out, rep = self._remote(env)
            except ServerError as e:  # raised before anything ran (e.g. the stream broke at begin)
                self._note_failure(e)
                return self._local(env, self.policy, reason=f"{e.reason}: {e}", error=e)
            w1 = sess.queue.sent.weight_bytes
            rep.uploaded_weight_bytes = w1 - w0
            rep.background_bytes = w0 - self._w_mark.get(id(sess), 0)
            self._w_mark = {id(sess): w1}
            return out, rep

    def _note_failure(self, e: ServerError) -> None:
        self._failures += 1
        lo, hi = self.backoff_s
        delay = min(hi, lo * 2 ** (self._failures - 1))
        self._retry_at = time.monotonic() + delay
        self.local_reason = f"{e.reason}"
        self._last_error = e
        if isinstance(e, ServerUnavailable | ProtocolError):
            self._teardown()
        (log.warning if self.allow_fallback else log.debug)("server trouble (%s); next try in %.1f s", e, delay)

    def _local(self, env, policy: str, *, reason: str = "", fallback: bool = True,
               error: ServerError | None = None) -> tuple[Any, RequestReport]:
        g = self.graph
        if fallback and not self.allow_fallback:
            raise error or ServerUnavailable(reason)
        t0 = time.perf_counter()
        out = run_whole(self.model, env, self.slowdown)
        ms = (time.perf_counter() - t0) * 1e3
        if self.base_costs is not None:  # not ``self.costs``: that would rebuild the rescaled graph per run
            self._calibrate("ue", ms, self._base_ue_ms())
        if fallback:
            log.info("request %d ran locally: %s", self._n, reason)
        return out, RequestReport(self._n, policy, 0, len(g.ops), 0, 0, None, ms, fallback=fallback,
                                  fallback_reason=reason)

    def _ensure_slice(self, split: Split) -> str:
        key = split.server_ops
        sid = self._slices.get(key)
        if sid is not None:
            self._slices.move_to_end(key)
            return sid
        if len(self._slices) >= MAX_SLICES:
            _, sid = self._slices.popitem(last=False)
        else:
            self._slice_seq += 1
            sid = f"s{self._slice_seq}"
        spec = make_slice(self.graph, split)
        self._session.define_slice(sid, spec.to_json(), tag=key)
        self._slices[key] = sid
        return sid

    def _rejection(self, server_ops: frozenset[str]) -> RequestFailed | None:
        """The server's refusal of this split's slice on this session, if it refused it."""
        rej = self._session.rejected.get(server_ops) if self._session is not None else None
        if rej is None:
            return None
        if self._slices.get(server_ops) is not None:  # the id names no slice on the server any more
            del self._slices[server_ops]
        return RequestFailed(f"server rejected the slice: code {rej.code}: {rej.message}", rej.code)

    def _schedule_uploads(self, split: Split, background: Sequence[str]) -> int:
        """Queue the weights this split needs (need order) and the background ones; re-key what waits.

        Returns the bytes of needed weights the server did not hold.
        """
        g = self.graph
        held = self._held_shas()
        pos: dict[str, int] = {}
        for k, name in enumerate(split.server_order):
            for w in g.op_by_name[name].weight_inputs:
                pos.setdefault(g.weight_sha256(w), 2 * k + 1)
        bg: dict[str, int] = {}
        for i, w in enumerate(background):
            bg.setdefault(g.weight_sha256(w), i)
        rid = self._rid

        def key(it: UplinkItem) -> tuple:
            if it.kind == "tensor":
                return (FOREGROUND if it.request_id == rid else BACKGROUND, -1, it.request_id)
            if it.name in pos:
                return (FOREGROUND, pos[it.name], 0)
            return (BACKGROUND, bg.get(it.name, len(bg)), 0)

        q = self._session.queue
        q.rekey(key)
        needed = 0
        for sha, p in pos.items():
            if sha in held:
                continue
            if sha in self._queued:
                needed += self._queued[sha].remaining
                continue
            needed += self._put_weight(sha, (FOREGROUND, p, 0))
        for sha, p in bg.items():
            if sha not in held and sha not in self._queued and sha not in pos:
                self._put_weight(sha, (BACKGROUND, p, 0))
        return needed

    def _put_weight(self, sha: str, key: tuple) -> int:
        name = self._sha_names[sha][0]
        meta = self.graph.weights[name]
        it = UplinkItem("weight", sha, meta.dtype, meta.shape, tensor_bytes(self.graph.weight_values[name]), key)
        self._queued[sha] = it
        self._session.queue.put(it)
        return it.total

    def _deadline_s(self, predicted_ms: float) -> float:
        if self.deadline_ms is not None:
            return self.deadline_ms / 1e3
        return max(predicted_ms * self.deadline_factor, predicted_ms + self.deadline_slack_ms) / 1e3

    def _decide(self, state: ServerState, share: Shares) -> planning.PlanChoice:
        """This request's plan: the previous decision when nothing it depends on changed, else a new one."""
        link = self.planning_link()
        ue_cpu = self.ue_cpu()
        drift = self._drifted(link, ue_cpu)
        if drift == "link":
            self._target = None
        key = self._decision_key(state, share)
        reused = None if drift else self._reusable_decision(key, state)
        if reused is not None:
            choice = reused
        elif self.fixed_server_ops is not None:
            choice = planning.fixed(self.fixed_server_ops, self.costs, link, state=state, share=share, ue_cpu=ue_cpu)
        else:
            choice = planning.choose(self.policy, self.costs, link, state=state, share=share,
                                     deadline_ms=self.deadline_ms, budget_s=self.plan_budget_s,
                                     target=self._target, ue_cpu=ue_cpu, horizon=self._remaining(),
                                     lost_ms=self._lost_ms)
        self._last_decision = (key, choice, self._remaining())
        self._planned_with = (link, dict(self._scale), None if ue_cpu is None else ue_cpu.send_ms_per_byte)
        if self.policy == "auto" and choice.warm_target is not None:
            self._target = choice.warm_target
        return choice

    def _report_link(self) -> dict[str, float]:
        link = self.planning_link()
        return {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms}

    def _planned_local(self, env, choice: planning.PlanChoice) -> tuple[Any, RequestReport]:
        out, rep = self._local(env, choice.policy, fallback=False)
        self._account_lost(choice, rep.measured_ms)
        rep.predicted_ms, rep.plan_ms, rep.link = choice.predicted_ms, choice.decision_ms, self._report_link()
        rep.fallback_reason = rep.plan_reason = choice.reason
        return out, rep

    # ---- suspension: no session while plans stay local -------------------------------------------------
    def _offline(self, env) -> tuple[Any, RequestReport] | None:
        """Plan with what the server held when the session was suspended; run locally if the plan stays
        local. None: the plan needs the server (or the state is too old): re-open the session."""
        state, share, since = self._suspended
        if time.monotonic() - since > self.refresh_s:
            return None
        try:
            choice = self._decide(state, Shares(compute=share))
        except Exception:  # planned again, with the session open
            log.debug("offline planning failed", exc_info=True)
            return None
        if choice.server_ops or choice.background or choice.invest:
            return None
        out, rep = self._planned_local(env, choice)
        rep.offline = True
        return out, rep

    def _suspend(self, choice: planning.PlanChoice) -> None:
        """Close the session after a local plan that left nothing to send.

        An open session costs the UE CPU even idle (the stream's receiver, HTTP/2 keepalive, RTT pings):
        measured ~0.5 % of a core, which on a 10 % CPU quota is enough to push a local run over one more
        100 ms quota period. Planning needs no server, so the session is re-opened only when a plan
        needs it (or after ``refresh_s``, to learn what the server holds now).
        """
        sess = self._session
        if (not self.suspend_idle or sess is None or choice.background or choice.invest or self._parked
                or sess.queue.pending() or sess.queue.busy or sess.pending_requests
                or any(sha not in sess.held for sha in self._queued)):
            return
        state = self.server_state()
        self._query_held = self._held_shas()
        share = min(1.0, max(1e-3, sess.share))
        # off the request's path: the half-close waits for the server's answer
        threading.Thread(target=self._close_parts, args=(*self._detach(), 2.0), name="coinfer-suspend",
                         daemon=True).start()
        self._suspended = (state, share, time.monotonic())
        self.suspensions += 1
        log.debug("session suspended after request %d (plans stay local)", self._n)

    def _remote(self, env: dict[str, torch.Tensor]) -> tuple[Any, RequestReport]:
        g = self.graph
        state = self.server_state()
        share = Shares(compute=min(1.0, max(1e-3, self._session.share)))
        try:
            choice = self._decide(state, share)
        except Exception as e:  # a planner failure must not cost the answer
            log.exception("planner failed; running locally")
            return self._local(env, self.policy, reason=f"planner failed: {type(e).__name__}: {e}")
        report_link = self._report_link()
        self._resume_background()
        if not choice.server_ops:
            if choice.idle_only:  # sending would slow the local run: background waits until it is done
                self._park_background()
            out, rep = self._planned_local(env, choice)
            if choice.background:  # progressive: stream the warm target (behind the run, or while idle)
                self._schedule_uploads(g.split(()), choice.background)
            self._resume_background()
            self._suspend(choice)
            return out, rep

        split = g.split(choice.server_ops)
        sess = self._session
        q = sess.queue
        rejected = self._rejection(split.server_ops)
        if rejected is not None:  # refused before on this session: run it here, without asking again
            out, rep = self._local(env, choice.policy, reason=f"{rejected.reason}: {rejected}", error=rejected)
            rep.predicted_ms, rep.plan_ms, rep.link = choice.predicted_ms, choice.decision_ms, report_link
            return out, rep
        slice_id = self._ensure_slice(split)
        self._rid += 1
        rid = self._rid
        needed = self._schedule_uploads(split, choice.background)
        if choice.idle_only:
            self._park_background()
        sent0_w, sent0_t = q.sent.weight_bytes, q.sent.tensor_bytes
        t0 = time.perf_counter()
        pending = sess.begin(rid, slice_id, split.cut_tensors)
        need_pos = {}
        for k, name in enumerate(split.server_order):
            for r in g.op_by_name[name].tensor_inputs:
                need_pos.setdefault(r, 2 * k)

        def on_cut(ref: str, t: torch.Tensor) -> None:
            meta = TensorMeta.of(t, keep_stride=False)
            q.put(UplinkItem("tensor", ref, meta.dtype, meta.shape, tensor_bytes(t), (FOREGROUND, need_pos[ref], rid),
                             request_id=rid, owner=t))

        env = run_prefix(g, split, env, on_cut_tensor=on_cut, slowdown=self.slowdown)
        base = self.base_costs
        idx = base.index
        self._calibrate("ue", (time.perf_counter() - t0) * 1e3, sum(base.ops[idx[n]].ue_ms for n in split.ue_order))
        self._resume_background()  # the UE now only waits: background weights may go
        deadline = self._deadline_s(choice.predicted_ms)
        left = deadline - (time.perf_counter() - t0)
        error: ServerError | None = None
        c0, b0 = time.process_time(), q.sent.weight_bytes + q.sent.tensor_bytes
        if not pending.done.wait(max(0.0, left)):
            sess.cancel_request(rid)
            error = DeadlineExceeded(f"no answer within {deadline * 1e3:.0f} ms (predicted {choice.predicted_ms:.0f})")
        else:
            # passive send-CPU sample: the UE computed nothing while it waited
            self.send_est.observe(q.sent.weight_bytes + q.sent.tensor_bytes - b0, time.process_time() - c0)
            if pending.error is not None:
                error = self._rejection(split.server_ops) or pending.error
        outputs = None
        if error is None:
            try:
                outputs = self._outputs(pending, split)
            except ProtocolError as e:
                error = e
        if error is not None:
            if split.server_ops not in sess.rejected:  # a refused slice says nothing about the server
                self._note_failure(error)
            if not self.allow_fallback:
                raise error
            _run_rest(g, split, env, self.slowdown)
        else:
            env.update(outputs)
            self._failures = 0
        out = collect_outputs(g, env)
        measured = (time.perf_counter() - t0) * 1e3
        self._observe_link()
        timings = None
        if pending.result is not None:
            t = pending.result.timings
            self._calibrate("server", t.compute_ms, sum(base.ops[idx[n]].server_ms for n in split.server_order))
            timings = {"total_ms": t.total_ms, "compute_ms": t.compute_ms, "input_wait_ms": t.input_wait_ms,
                       "weight_wait_ms": t.weight_wait_ms, "queue_ms": t.queue_ms}
        rep = RequestReport(
            self._n, choice.policy, len(split.server_order), len(split.ue_order),
            q.sent.weight_bytes - sent0_w, q.sent.tensor_bytes - sent0_t, choice.predicted_ms, measured,
            fallback=error is not None, fallback_reason="" if error is None else f"{error.reason}: {error}",
            needed_upload_bytes=needed, serial_ms=choice.serial_ms, warm_ms=choice.warm_ms,
            plan_ms=choice.decision_ms, link=report_link, server_timings=timings, invest=choice.invest,
            plan_reason=choice.reason)
        self._account_lost(choice, measured)
        if error is not None:
            log.warning("request %d fell back to local execution: %s", self._n, rep.fallback_reason)
        return out, rep

    def _decision_key(self, state: ServerState, share: Shares) -> tuple:
        """What a decision depends on exactly; the continuous estimates are compared with hysteresis
        (``_drifted``)."""
        return (self.policy, self.fixed_server_ops, state.held, bool(state.in_flight), round(share.compute, 3))

    def _drifted(self, link: Link, ue_cpu, rel: float = 0.25) -> str:
        """Which estimate moved enough since the last decision to plan again ('' if none): the link
        (then the warm target is searched again too), the UE or server cost scale, the send cost.

        Relative thresholds, not buckets: on a throttled UE one local run varies by +-20 % with the CPU
        quota's period, and re-planning after every such wobble is what drains the quota (each plan is
        tens of ms of CPU, i.e. hundreds of ms at a 10 % quota)."""
        last = self._planned_with
        if last is None:
            return "link"
        l0, scale0, send0 = last

        def far(a: float, b: float, r: float = rel) -> bool:
            return abs(a - b) > r * max(abs(b), 1e-9)

        if far(link.uplink_mbps, l0.uplink_mbps) or (far(link.rtt_ms, l0.rtt_ms) and abs(link.rtt_ms - l0.rtt_ms) > 2):
            return "link"
        if any(far(self._scale[k], scale0[k], 0.3) for k in scale0):
            return "scale"
        send = None if ue_cpu is None else ue_cpu.send_ms_per_byte
        if (send is None) != (send0 is None) or (send is not None and far(send, send0, 0.5)):
            return "send cost"
        return ""

    def _reusable_decision(self, key: tuple, state: ServerState) -> planning.PlanChoice | None:
        """The previous decision, when nothing it depends on changed: planning is CPU work, and on a
        CPU-throttled UE it spends the quota the request that follows needs (a cgroup period already
        used up before the request starts). A decision made while connecting is reused by the first
        request as it is (nothing happened in between). Otherwise it is reused only when it cannot flip:
        no background upload or investment pending, and either fewer requests left than when it was made
        (staying local or warm only gets more attractive) or the plan is warm (nothing left to invest in)."""
        last = self._last_decision
        if last is None or last[0] != key or state.in_flight:
            return None
        _, choice, horizon_then = last
        now = self._remaining()
        if now == horizon_then and self._n <= 1:  # made ahead, while connecting, for this very request
            return replace(choice, decision_ms=0.0, details={**choice.details, "planned_ahead": True})
        if choice.background or choice.invest:
            return None
        warm = self.base_costs is not None and planning.target_held(self.base_costs, choice.warm_target or frozenset(),
                                                                    state)
        if not (warm or (now is not None and horizon_then is not None and now <= horizon_then)):
            return None
        return replace(choice, decision_ms=0.0, details={**choice.details, "reused_decision": True})

    def _remaining(self) -> int | None:
        """Requests left including this one (None: no horizon given); before the first request (planning
        ahead) the first one is "this one"."""
        return None if self.horizon is None else max(1, self.horizon - max(1, self._n) + 1)

    def _account_lost(self, choice: planning.PlanChoice, measured_ms: float) -> None:
        """Rent-or-buy: latency lost to not being warm on the target, until the client invests."""
        if choice.invest:
            self._lost_ms = 0.0
            return
        warm = choice.details.get("target_warm_ms")
        if warm is not None:
            self._lost_ms += max(0.0, measured_ms - warm)

    def _outputs(self, pending, split: Split) -> dict[str, torch.Tensor]:
        g = self.graph
        res = pending.result
        missing = [o for o in split.server_outputs if o not in res.output_names]
        if missing:
            raise ProtocolError(f"server did not return outputs {missing[:3]}")
        out = {}
        for name in split.server_outputs:
            dtype, shape = pending.metas[name]
            meta = g.meta_of(name)
            if tuple(shape) != meta.shape or dtype != meta.dtype:
                raise ProtocolError(f"output {name!r} is {list(shape)} {dtype}; expected {list(meta.shape)} "
                                    f"{meta.dtype}")
            t = tensor_from_bytes(pending.buffers[name], TensorMeta(tuple(shape), dtype))
            out[name] = restore_layout(t, meta)
        return out

    def _observe_link(self) -> None:
        mark, self._busy_mark = self._busy_mark, None
        if mark is not None:
            seconds, nbytes = mark
            self.estimator.observe_upload(nbytes, seconds, includes_rtt=True)


# ---- the public client ---------------------------------------------------------------------------------
class CoinferClient:
    """Call it like the model. ``server=None`` or ``policy="local"`` runs in-process only.

    ``link`` (a ``partitioner.Link``, ``{"uplink_mbps", "rtt_ms"}`` or ``(uplink_mbps, rtt_ms)``)
    overrides the measured link estimates for planning. ``deadline_ms`` (explicit) or
    ``deadline_factor`` x predicted latency bound how long a request waits for the server before it
    completes locally. ``horizon`` (the number of requests this client will serve, if known) lets
    ``auto`` upload the model's weights only when that pays over the requests left. Other keyword
    options go to ``RemoteEngine``.
    """

    def __init__(self, model: str | torch.nn.Module | ModelGraph, example_inputs: Sequence[torch.Tensor] | None = None,
                 *, server: str | None = None, policy: str = "auto", link=None, name: str = "",
                 weights: str | None = None, **options: Any):
        self.model = prepare_model(model, example_inputs, name=name, weights=weights)
        self.graph = self.model.graph
        self.example_inputs = self.model.example_inputs
        if policy not in planning.POLICIES:
            raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(planning.POLICIES)}")
        self.policy = policy
        self.server = server
        if server is None:
            self.engine: LocalEngine | RemoteEngine = LocalEngine(self.model)
        else:
            self.engine = RemoteEngine(self.model, server, policy=policy, link=_as_link(link), **options)
        self.reports: list[RequestReport] = []
        self.last_report: RequestReport | None = None

    def __call__(self, *inputs: torch.Tensor):
        if len(inputs) == 1 and isinstance(inputs[0], list | tuple | dict):
            inputs = inputs[0]
        out, rep = self.engine.infer(inputs)
        self.last_report = rep
        self.reports.append(rep)
        return out

    def reference(self, *inputs: torch.Tensor):
        """The model's output computed entirely on this device (the correctness reference)."""
        if len(inputs) == 1 and isinstance(inputs[0], list | tuple | dict):
            inputs = inputs[0]
        g = self.graph
        return collect_outputs(g, run_ue_part(g, g.split(()), _bind(g, inputs)))

    @property
    def link(self) -> Link | None:
        return self.engine.planning_link() if isinstance(self.engine, RemoteEngine) else None

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> CoinferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_tenant() -> str:
    """A fresh tenant id (its own weight namespace: a cold server for this client)."""
    return f"ue-{uuid.uuid4().hex[:12]}"


__all__ = ["CoinferClient", "CoinferError", "LocalEngine", "PreparedModel", "RemoteEngine", "RequestReport",
           "new_tenant", "prepare_model"]
