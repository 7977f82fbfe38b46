"""What one request did, as the device runtime saw it (``CoinferClient.last_report``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RequestReport:
    """One request, as the runtime saw it. ``predicted_ms`` is the simulator's latency of what ran (its run:
    ``measured_ms``); ``call_predicted_ms`` the whole call's (``call_ms``)."""

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
    """Why the request fell back (or, when it did not, why its plan stayed local)."""
    fallback_kind: str = ""
    """The fallback's category: "unreachable", "server error", "deadline", "protocol error" or "planner
    failure" ("" without a fallback)."""
    fallback_code: str = ""
    """The gRPC status name behind a fallback, when there was one (e.g. "INVALID_ARGUMENT", "UNAVAILABLE")."""
    background_bytes: int = 0
    """Weight bytes uploaded between the previous request and this one (progressive offloading)."""
    needed_upload_bytes: int = 0
    """Weight bytes this request's split needed that the server did not hold when it was planned."""
    serial_ms: float | None = None
    """Simulated latency of the same split with serial uploading (weights first, then inference)."""
    warm_ms: float | None = None
    plan_ms: float = 0.0
    """Wall ms this request spent deciding its plan: the whole decision path on its clock (the inputs read, the
    decision or its reuse check, a wait for the background decision; ``RemoteEngine._remote``)."""
    plan_cpu_ms: float = 0.0
    """CPU ms (the deciding thread's) of that decision: on a CPU-quota'd UE ``plan_ms`` also counts waiting
    for the quota, which the process's other threads and the request's own work spend."""
    cpu_share: float = 1.0
    """The share of one core the UE's deciding thread had on average (``RemoteEngine.cpu_share``: its cgroup's
    CFS quota in cores, at most 1; 1 without a quota)."""
    plan_at_share_ms: float = 0.0
    """What the decision cost this request at that share: ``plan_cpu_ms`` / ``cpu_share`` (a 10 % UE spends
    1 ms of CPU in about 10 ms of wall time while the quota is the bottleneck). ``plan_ms`` on a quota'd UE is
    either about ``plan_cpu_ms`` or that plus a wait of up to one CFS period: the wait falls on whatever work
    runs when the period's quota is spent (the request's other threads and the work before it spent it), so a
    decision pays a whole wait with about the chance that its CPU crosses the end of the quota; this is its
    cost spread over the periods, ``plan_ms`` the one drawn (both are kept)."""
    link: dict[str, float] = field(default_factory=dict)
    server_timings: dict[str, float] | None = None
    max_abs_diff_vs_local: float | None = None
    """Max |result - captured graph run here| (``--verify``; 0 expected on CPU)."""
    max_abs_diff_vs_eager: float | None = None
    """Max |result - the user's eager module| (``--verify``; within ``ue_client.verify.TOLERANCES``)."""
    probe_bytes: int = 0
    """Weight bytes the connect-time uplink probe sent since the previous request's report."""
    invest: bool = False
    """The plan uploaded the warm target's weights in this request (horizon / rent-or-buy decision)."""
    plan_reason: str = ""
    plan_wait_ms: float = 0.0
    """Wall ms this request waited for the decision the background worker was still making for it
    (``ClientOptions.plan_background``): part of ``plan_ms``."""
    plan_bg: str = ""
    """What became of the decision made for this request on the background worker: '' (none was made),
    'taken' (its inputs were exactly those of this request: its decision, made earlier), 'stale: WHAT' (an
    input moved since, e.g. 'held'; the request decided itself), 'unused' (the request made no decision)."""
    plan_bg_ms: float = 0.0
    """Wall ms of that background decision (outside this request's clock, but for the part it waited:
    ``plan_wait_ms``)."""
    plan_bg_cpu_ms: float = 0.0
    """CPU ms (the worker thread's) of that background decision."""
    plan_why: str = ""
    """Why this request's plan was made or reused (``DecisionCache``): 'reused', 'planned ahead' (while
    connecting), 'planned after the previous request', 'followed' (a prefetch trajectory followed within its
    tolerance), 'first', a drift ('link', 'scale', ...) or 'changed: WHAT'; '' without a plan."""
    offline: bool = False
    """Planned and run without a session (suspended while plans stay local): no server traffic."""
    ue_compute_ms: float = 0.0
    """Time the UE spent computing this request's UE ops (its prefix, plus the rest on a fallback), ms."""
    predicted_parts: dict[str, float] | None = None
    """A split request's prediction in parts, ms, beside what was measured of each: ``ue_ms`` (the plan's UE
    compute), ``server_ms`` (the server's compute and queueing at the session's share), ``transport_ms``
    (the transport residual the plan added), ``setup_ms`` (measured: the request's set-up after planning)
    and ``validation_ms`` (measured, an upper bound: from the request's DefineSlice to the server's
    SliceDefined less one round trip; absent when the request defined no slice). None for requests without a
    server answer."""
    call_before_ms: float | None = None
    """Wall ms the call spent before its run started, measured when its plan was ready: binding the inputs, a
    capture of a new input signature, connecting, waiting for a background decision, planning (``plan_ms``).
    Measured, so not in ``call_predicted_ms`` (the next calls' forecasts hold it). None for a request without a
    prediction."""
    call_before_forecast_ms: float | None = None
    """Wall ms the call was expected to spend before its run: the mean of the earlier calls' of its kind
    (``call_mode``; ``calibration.CostModel.call_before_ms``). None without a prediction."""
    call_mode: str = ""
    """The call's kind, as the client told it when the call started (``calibration.CALL_MODES``: 'profile',
    'connect', 'offline', 'background', 'first' or 'plan'); '' without a prediction."""
    call_after_ms: float | None = None
    """Wall ms the call was expected to spend after its run (the report, the background decision handed off):
    the mean of the earlier calls' (``calibration.CostModel.call_after_ms``). None without a prediction."""
    call_predicted_ms: float | None = None
    """The call's predicted latency, ms: ``call_before_forecast_ms`` + ``predicted_ms`` + ``call_after_ms``, what
    the caller is predicted to wait from calling the client to its return (``call_ms``); every term a forecast
    from earlier calls (session 18 used the call's own measured ``call_before_ms``). None without a prediction
    (a fallback, a local policy)."""
    call_ms: float | None = None
    """Wall ms of the whole call as the client timed it (``CoinferClient.__call__``, entry to return)."""
    deadline_ms: float | None = None
    """The latency deadline D (``--deadline-ms``), ms; None when none was given."""
    met_deadline: bool | None = None
    """measured_ms <= deadline_ms (None without a deadline)."""
    predicted_mean_ms: float | None = None
    """The plan's predicted mean latency at the chosen frequency, ms."""
    predicted_std_ms: float | None = None
    """The plan's predicted standard deviation of latency (the robust policy's variance model), ms."""
    feasible: bool | None = None
    """``robust``: the plan met mean + k std <= D (False: no pair did, and the plan is the one with the least
    miss bound); None for other policies and requests run without a plan."""
    miss_bound: float | None = None
    """``robust``: Cantelli's bound on P(latency > D) of the plan (``partitioner.robust.cantelli_bound``)."""
    uplink_cv: float | None = None
    """The uplink rate's relative spread the plan hedged against (measured by the UE, or given)."""
    frequency_ghz: float | None = None
    """The CPU frequency the request ran at (chosen and applied, or the current one), GHz."""
    frequency_applied: bool = False
    """The frequency was set through a control (cpufreq or the testbed's quota emulation)."""
    uplink_mbps: float | None = None
    """The uplink bandwidth the plan used (the link estimate times the UE's uplink share), Mbit/s."""
    energy_j: float | None = None
    """Modelled UE energy of this request, J: ``partitioner.robust.request_energy_mj`` of the measured UE
    compute time at ``frequency_ghz``, the bytes this request sent at ``uplink_mbps``, and the rest waiting."""
    uplink_backlog_ms: float | None = None
    """A split request's uplink backlog when it was planned (ms of link: bytes handed over earlier and not yet
    carried, ``ue_client.backlog``); None for a local one."""
    uplink_backlog_added_ms: float | None = None
    """What that backlog added to ``predicted_ms`` (``ue_client.backlog.added_ms``), ms; None for a local one."""
    pinned: list[dict[str, Any]] = field(default_factory=list)
    """Ops off the server's allowlist, each ``{"op", "target", "kept_on_ue"}``: the op and how many ops
    (itself and its descendants) it kept on this device (``modelgraph.pinning``); [] when none."""

    server_op_times: tuple = field(default=(), repr=False, compare=False)
    """The server's per-op timings of this request (``protos.values.OpTime``: op name, start ms from the
    request's start on the server, run ms), in the order the ops ran; () without a server answer. Decoded
    only when read (``ue_client.wire.OpTimes``); not in :meth:`to_dict` (one entry per server op: 197 for
    googlenet's all-server split)."""

    def pinned_note(self) -> str:
        """One line, e.g. ``pinned: cumprod (aten.cumprod.default) kept 5 ops on the UE`` ("" when none)."""
        if not self.pinned:
            return ""
        return "pinned: " + "; ".join(f"{p['op']} ({p['target']}) kept {p['kept_on_ue']} op"
                                      f"{'s' if p['kept_on_ue'] != 1 else ''} on the UE" for p in self.pinned)

    def to_dict(self) -> dict[str, Any]:
        ops, self.server_op_times = self.server_op_times, ()  # (asdict would deep-copy them)
        try:
            d = asdict(self)
        finally:
            self.server_op_times = ops
        del d["server_op_times"]
        return d


def miss_rate_ci(misses: int, n: int, confidence: float = 0.9) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a miss probability from ``misses`` of ``n`` requests,
    at ``confidence`` (two-sided; ``scipy.stats.binomtest(...).proportion_ci``). Raises ValueError when
    not 0 <= misses <= n, n >= 1 and 0 < confidence < 1. Source: Clopper & Pearson, Biometrika 1934."""
    if not (isinstance(n, int) and isinstance(misses, int) and n >= 1 and 0 <= misses <= n):
        raise ValueError(f"need 0 <= misses <= n and n >= 1, got {misses} of {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    from scipy.stats import binomtest

    ci = binomtest(misses, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values`` (linear interpolation, numpy's default)."""
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def run_summary(reports: list[RequestReport], deadline_ms: float | None, eps: float | None = None,
                confidence: float = 0.9) -> dict[str, Any]:
    """A run's summary: requests, mean and p99 latency (ms), mean modelled energy (J) and, with a
    deadline, the measured miss rate and its ``confidence`` interval (``miss_rate_ci``). Empty runs give
    None values."""
    lat = [r.measured_ms for r in reports]
    energy = [r.energy_j for r in reports if r.energy_j is not None]
    out: dict[str, Any] = {
        "requests": len(reports), "deadline_ms": deadline_ms, "eps": eps,
        "mean_ms": sum(lat) / len(lat) if lat else None, "p99_ms": percentile(lat, 99) if lat else None,
        "energy_j_mean": sum(energy) / len(energy) if energy else None,
        "fallbacks": sum(1 for r in reports if r.fallback),
        "infeasible": sum(1 for r in reports if r.feasible is False),
        "misses": None, "miss_rate": None, "miss_rate_ci": None, "ci_confidence": confidence,
    }
    if deadline_ms is not None and lat:
        misses = sum(1 for x in lat if x > deadline_ms)
        out.update(misses=misses, miss_rate=misses / len(lat), miss_rate_ci=list(miss_rate_ci(misses, len(lat),
                                                                                                  confidence)))
    return out


def format_summary(s: dict[str, Any]) -> str:
    """One line of ``run_summary``'s result for the terminal."""
    if not s["requests"]:
        return "no requests finished"
    line = (f"{s['requests']} requests: mean {s['mean_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms"
            + ("" if s["energy_j_mean"] is None else f", modelled UE energy {s['energy_j_mean']:.3f} J/request"))
    if s["miss_rate"] is not None:
        lo, hi = s["miss_rate_ci"]
        eps = "" if s["eps"] is None else f" (eps {s['eps']:g})"
        line += (f"; deadline {s['deadline_ms']:g} ms missed {s['misses']}/{s['requests']} = {s['miss_rate']:.3f}, "
                 f"{s['ci_confidence']:.0%} CI [{lo:.3f}, {hi:.3f}]{eps}")
    return line
