"""The cost model the device plans with: the profiled cost graph, rescaled by what requests took.

Profiles go stale (machine load, thermal state, a cached profile from another moment), so every
request's measured UE prefix time and the server's reported compute time update a per-side scale
(EWMA of measured / profiled, clamped to [0.25, 4]); ``costs`` is the profiled graph times those
scales. The UE side is affine: a request's UE time is ``overhead_ms`` + scale x profiled, the
overhead (what every request costs the UE besides its ops: the begin message, thread hand-offs and, on a
CPU-quota'd UE, the stall they cause at the start) fitted by least squares over recent requests of
different sizes (``fit_overhead``). The transport of a split request (uplink, downlink and the UE's
sending and receiving) is predicted from the link estimate (RTT from pings, rate from timed transfers)
and corrected by the mean of what the last ``SPREAD_WINDOW`` split requests measured beyond it
(``transport_ms``): on a CPU-quota'd UE sending and receiving wait for the quota, which no link
measurement separates from the link. The spread of that residual over the same requests
(``transport_sd_ms``) is the transport's spread the link model does not see (a link whose rate drops for
short spells, seen by transfers too small for a rate sample); the robust policy hedges against it. A
window mean, not an EWMA: on a link with rare slow spells one slow request moved an EWMA (alpha 0.3) by
0.3 x its excess, enough to make a mean-only plan run local, after which no split request ever corrected
it; the window's mean is the transport's mean over recent requests, and mean and spread are moments of
the same sample. The residuals outlive the client: a new client of the same process for the same server,
model and planning link starts from the window the earlier ones left (``TransportMemory``), as it starts
from their cached profile; a fresh client knew none, and its first requests were predicted on the link
model alone (session 12's warm scenario, a new client per round: 2 of every 3 recorded requests, median
error 16-17 % against 11 % once the residual was in). A
purely multiplicative scale learned on small prefixes charged that
fixed cost to every op: in the robust scenario (10 % of a core, 40 ms CFS period) prefixes of 17 / 33 /
50 ms profiled took 46 / 59 / 76 ms and the whole model 174 (measured = 33 + 0.79 x profiled), so a
client that ran the 17 ms prefix predicted local at 427 ms and preferred splits that were slower than
local. The call around a request costs the UE too: what it spends before the run (binding the inputs,
connecting, planning) is forecast by the mean of what the last ``SPREAD_WINDOW`` calls of the same kind
spent there (``call_before_ms``: a call that profiles, one that connects, one planned offline, one with a
background decision, an engine's first, or an ordinary one; ``CALL_MODES``), and what it spends after the run
(the report, the next request's background decision handed off) by the mean of what the last
``SPREAD_WINDOW`` calls spent there (``call_after_ms``); both are kept with the residuals in
``TransportMemory``, and a request's report adds both to its plan's prediction
(``RequestReport.call_predicted_ms``). Session 18 added the call's own measured time before its run instead:
a prediction that was partly a measurement of the call it predicted (review 18; session 19 made it a
forecast, docs/results/accuracy/session19). Session 17's 10 % / 400 Mbit/s row: the calls
took 28 ms (median) beyond the run and its set-up, 9 of them planning, on requests of 130-270 ms that no
prediction counted (warm median error 14 %, all of it under-prediction;
docs/results/accuracy/session18).

``measure_costs`` builds the profiled graph once per client: the UE's per-op profile and the server's
per-op times (``ProfileGraph``), for the graph the engine plans (the model's head: ops off the server's allowlist
are cut off beforehand, ``modelgraph.pinning``).

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``).
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from dataclasses import replace

from modelgraph import ModelGraph, make_slice, run_ue_part
from modelgraph.graph import split_ref
from partitioner import CostGraph
from profiler.link import relative_spread, sample_std
from ue_client import wire
from ue_client.errors import InputError, RequestFailed, ServerUnavailable
from ue_client.model import PreparedModel, bind, slow_costs

log = logging.getLogger(__name__)

SPREAD_WINDOW = 32
"""Recent UE parts (profiled, measured) kept for the UE's run-time spread (``CostModel.ue_cv``) and overhead."""
MIN_CALIBRATION_MS = 2.0
"""Profiled ms of a part below which its measured time does not move that side's cost scale (a part this
small is mostly the fixed cost of the request around it)."""
MIN_SPREAD_SAMPLES = 4
SERVER_STEP = 1.5
"""One request's server time moves the server's cost scale as if it were at most this many times (or at least
1 / this of) what the scale predicts now (``CostModel.calibrate_server``): each step then moves the scale by at
most +15 % / -10 % (alpha 0.3), and a persistent change is followed over a few requests. On the testbed's shared
cores the server's compute has heavy tails (p90 1.5-2.9x its median, session 14's srvnoise) and a slice's first
request computes slower (session 17's 10 % / 400 row: resnet18 132 ms vs ~83 warm): with the plain EWMA one
221 ms request among ~40 ms ones put the next four predictions 58-102 % over (session 18's resnet18 cell). A
replay of sessions 16-17's logs and session 18's before-runs with the ratio clipped at 1.5x: coinfer's stream
requests 9.7 -> 5.8 % (session 16), 8.2 -> 7.4 % (17), 8.2 -> 10.0 % in one of session 18's before-runs; the
median |pred / lat - 1| of the stream's and the warm scenario's warm requests together no worse in any of the five
sets (``docs/results/accuracy/session18/replay_warm.py``)."""
PROFILE_TIMEOUT_S = 120.0
"""How long ``measure_costs`` waits for the server's ProfileGraph; past it the client plans with its own op times as
the server's (as when the server cannot profile), and does not ask again. The server bounds a tenant's profiling to
``ServerConfig.profile_cpu_s`` (10 CPU s by default); 120 s leaves it 12x that in wall time on a loaded host. Before
session 25 the wait was 600 s and a timeout failed the connect: a server that never answered ProfileGraph blocked the
user's call 600 s at every connect attempt (one per back-off period) (``tests/test_hostile_server25.py``)."""
_NOT_YET = object()
"""``CostModel``'s transport std before it was asked for."""
MIN_TRANSPORT_SAMPLES = 2
"""Transport residuals needed before ``transport_ms`` is used (0 until then: the link model alone). One
residual is one request's, and on a CPU-quota'd UE one request's transport wanders by +-100 ms: the first
warm request of a 10 % UE measured -247 ms and the next ones -105, -77, -75 (mobilenet_v2, 20 Mbit/s planned,
session 11), and a mean that started from the first one moved past the re-plan threshold four times."""
TRANSPORT_REPLAN_SE = 2.0
"""The transport residual's mean must move by more than this many standard errors of the mean
(``CostModel.transport_se_ms``), and at least 10 ms, for a decision to be made again
(``ue_client.decisions.DecisionCache.drift``): a move within the estimate's own noise changes no decision
worth its CPU."""
MEMORY_KEYS = 64
"""(server, model, link) keys whose transport residuals ``TRANSPORT_MEMORY`` keeps (least recently used out)."""
CALL_MODES = ("profile", "connect", "offline", "uploading", "background", "first", "plan")
"""The kinds of call whose times before their runs are kept apart (``CostModel.note_call_before``), as the
client tells them when a call starts, before it measures anything of it (``ue_client.call_forecast``):
``profile``, a call that connects and profiles the model first (seconds); ``connect``, one that connects with a
profile at hand (a session re-opened); ``offline``, one planned with the session suspended; ``uploading``, one
that starts with weights still queued or going up (their sender shares the UE's CPU with its planning: 19-20 ms
before the run of the stream's second request at 10 % / 400 Mbit/s, 0.2-10 ms for the warm ones);
``background``, one whose decision was made (or is being made) on the background worker; ``first``, an engine's
first request on a connection opened before it; ``plan``, any other (it decides itself, or reuses the last
decision)."""
AFTER_KINDS = ("upload", "plan")
"""The kinds of call whose times after their runs are kept apart (``CostModel.note_call_after``), as the plan
tells them when it is made (``ue_client.call_forecast``): ``upload``, a plan that puts weights on the uplink
(the weights a split lacks, a prefetch, a background stream), whose sender shares the UE's CPU with what the call
does after its run; ``plan``, any other."""
LIGHT_CALL_MODES = ("offline", "background", "first", "plan")
"""The kinds of call that neither connect nor profile: a kind with no time kept yet is forecast by the mean of
these kinds' times (``CostModel.call_before_ms``)."""
MIN_FIT_SAMPLES = 8
"""UE parts (profiled, measured) needed before the per-request overhead is fitted (``fit_overhead``)."""
MIN_FIT_RANGE = 1.5
"""The largest profiled UE part of the window over the smallest: below it sizes do not tell a fixed cost
from a per-op one, and the overhead stays 0."""


def fit_overhead(pairs, *, min_samples: int = MIN_FIT_SAMPLES, min_range: float = MIN_FIT_RANGE) -> float:
    """The fixed part o (ms) of measured = o + s x profiled, by ordinary least squares over ``pairs`` of
    (profiled ms, measured ms) of UE parts of different sizes; 0 with fewer than ``min_samples`` pairs,
    profiled sizes spanning less than ``min_range`` (largest / smallest), fewer than ``min_samples // 2``
    pairs on either side of the sizes' geometric middle, a slope <= 0 or a negative intercept. Clamped to
    the least measured time of the window (the fixed part cannot exceed a whole
    request's UE time)."""
    pairs = [(b, m) for b, m in pairs if b > 0 and m > 0]
    if len(pairs) < min_samples:
        return 0.0
    bs = [b for b, _ in pairs]
    if max(bs) < min_range * min(bs):
        return 0.0
    mid = math.sqrt(max(bs) * min(bs))
    small = sum(1 for b in bs if b < mid)
    if min(small, len(bs) - small) < min_samples // 2:  # a few points at one end would set the intercept alone
        return 0.0
    mb = sum(bs) / len(bs)
    mm = sum(m for _, m in pairs) / len(pairs)
    var = sum((b - mb) ** 2 for b in bs)
    if var <= 0:
        return 0.0
    slope = sum((b - mb) * (m - mm) for b, m in pairs) / var
    if slope <= 0:
        return 0.0
    return min(max(0.0, mm - slope * mb), min(m for _, m in pairs))


class TransportMemory:
    """The transport residuals (ms) the clients of this process measured, the last ``SPREAD_WINDOW`` per key
    (a client's server address, model hash and planning link: ``ue_client.client.RemoteEngine``), for the
    ``MEMORY_KEYS`` keys used last. A residual is what this UE's sending and receiving, under its CPU
    quota, and the server's work around its ops' compute took beyond the link model (module docstring):
    a property of this device, that server and the link, like the link estimate, not of one client
    object. A ``CostModel`` made with a key starts from what is kept for it and adds its own residuals
    here as it measures them. Thread-safe (clients of several threads).

    Since session 14 it also keeps the server's cost scale per key (``CostModel.scale["server"]``, the last
    one a client of that key reached): before, each new client started it at 1.0 while its residuals were
    kept. A replay of session 13's warm rows (a client per round of 3 requests; the recorded server parts
    reproduced exactly, 528 of 528) gave a median |pred - meas| / meas of the remote warm requests of 9.0 %
    reset, 8.6 % kept (first request of a client 9.7 -> 9.2 %; session 12's rows 16.2 -> 13.0 %;
    ``docs/results/accuracy/session14/replay_scales.py``). The UE's scale is not kept: it pairs with the
    per-request overhead fitted over the client's own window (``fit_overhead``), and no replay measured it.

    Since session 18 it also keeps the last ``SPREAD_WINDOW`` calls' times after their runs per key
    (``CostModel.note_call_after``): a new client's first call predicts with the earlier clients' mean; since
    session 19 per kind (``AFTER_KINDS``), and also their times before their runs, per key and kind of call
    (``CostModel.note_call_before``)."""

    def __init__(self, keys: int = MEMORY_KEYS, window: int = SPREAD_WINDOW):
        self._keys = int(keys)
        self._window = int(window)
        self._lock = threading.Lock()
        self._res: OrderedDict[tuple, deque[float]] = OrderedDict()
        self._server_scale: OrderedDict[tuple, float] = OrderedDict()
        self._after: OrderedDict[tuple, dict[str, deque[float]]] = OrderedDict()
        self._before: OrderedDict[tuple, dict[str, deque[float]]] = OrderedDict()

    def recall(self, key: tuple) -> list[float]:
        """The residuals kept for ``key``, oldest first (empty: none)."""
        with self._lock:
            got = self._res.get(key)
            if got is None:
                return []
            self._res.move_to_end(key)
            return list(got)

    def note(self, key: tuple, residual_ms: float) -> None:
        """Keep one residual (ms, already clamped by ``CostModel.calibrate_transport``) for ``key``."""
        with self._lock:
            got = self._res.get(key)
            if got is None:
                got = self._res[key] = deque(maxlen=self._window)
                while len(self._res) > self._keys:
                    self._res.popitem(last=False)
            else:
                self._res.move_to_end(key)
            got.append(float(residual_ms))

    def recall_server_scale(self, key: tuple) -> float | None:
        """The server cost scale kept for ``key`` (None: none)."""
        with self._lock:
            got = self._server_scale.get(key)
            if got is not None:
                self._server_scale.move_to_end(key)
            return got

    def note_server_scale(self, key: tuple, scale: float) -> None:
        """Keep the server cost scale a client of ``key`` reached (a positive finite number; else ignored)."""
        if not (scale > 0 and math.isfinite(scale)):
            return
        with self._lock:
            self._server_scale[key] = float(scale)
            self._server_scale.move_to_end(key)
            while len(self._server_scale) > self._keys:
                self._server_scale.popitem(last=False)

    def recall_after(self, key: tuple) -> dict[str, list[float]]:
        """The calls' times after their runs (ms) kept for ``key``, per kind (``AFTER_KINDS``), oldest first
        (``CostModel.note_call_after``); kinds with none left out."""
        return self._recall(self._after, key)

    def note_after(self, key: tuple, ms: float, kind: str = "plan") -> None:
        """Keep one call's time after its run (ms, >= 0) for ``key`` and kind ``kind``."""
        self._note(self._after, key, kind, ms)

    def recall_before(self, key: tuple) -> dict[str, list[float]]:
        """The calls' times before their runs (ms) kept for ``key``, per kind of call (``CALL_MODES``), oldest
        first (``CostModel.note_call_before``); kinds with none left out."""
        return self._recall(self._before, key)

    def note_before(self, key: tuple, mode: str, ms: float) -> None:
        """Keep one call's time before its run (ms, >= 0) for ``key`` and kind ``mode``."""
        self._note(self._before, key, mode, ms)

    def _recall(self, store: OrderedDict, key: tuple) -> dict[str, list[float]]:
        with self._lock:
            got = store.get(key)
            if got is None:
                return {}
            store.move_to_end(key)
            return {kind: list(xs) for kind, xs in got.items()}

    def _note(self, store: OrderedDict, key: tuple, kind: str, ms: float) -> None:
        with self._lock:
            got = store.get(key)
            if got is None:
                got = store[key] = {}
                while len(store) > self._keys:
                    store.popitem(last=False)
            else:
                store.move_to_end(key)
            got.setdefault(kind, deque(maxlen=self._window)).append(float(ms))

    def forget(self) -> None:
        """Drop everything kept (tests; a device that moved to another network)."""
        with self._lock:
            self._res.clear()
            self._server_scale.clear()
            self._after.clear()
            self._before.clear()


TRANSPORT_MEMORY = TransportMemory()
"""The process's ``TransportMemory`` (``ClientOptions.transport_memory``)."""


class CostModel:
    """The profiled cost graph (``base``), the UE/server scales measured since and the UE's per-request
    overhead (``overhead_ms``: not in ``costs``, whose UE times stay a uniform multiple of the profile so the
    partitioner's precomputed tables still apply; planning adds it to every plan's prediction,
    ``ue_client.planning.choose``)."""

    def __init__(self, base: CostGraph | None = None, *, memory_key: tuple | None = None,
                 memory: TransportMemory | None = None):
        """``memory_key``: where this model's transport residuals are kept in ``memory`` (default
        ``TRANSPORT_MEMORY``) between clients: it starts from those kept there, and from the server cost
        scale kept there, and adds its own (None: it starts from none and 1.0 and keeps its own to itself)."""
        self.scale = {"ue": 1.0, "server": 1.0}
        self._base = base
        self._scaled: tuple | None = None
        self._base_sum: tuple | None = None
        """(base cost graph, its UE ms sum): per-request calibration without rebuilding the scaled graph."""
        self._ue_pairs: deque[tuple[float, float]] = deque(maxlen=SPREAD_WINDOW)
        self.overhead_ms = 0.0
        """The UE's fixed cost per request, ms at the profile's frequency (``fit_overhead``; module docstring)."""
        self._transport_res: deque[float] = deque(maxlen=SPREAD_WINDOW)
        """The last ``SPREAD_WINDOW`` transport residuals (ms): ``transport_ms`` and ``transport_sd_ms``."""
        self._after: dict[str, deque[float]] = {}
        """Per kind (``AFTER_KINDS``), the last ``SPREAD_WINDOW`` calls' times after their runs (ms):
        ``call_after``."""
        self._before: dict[str, deque[float]] = {}
        """Per kind of call (``CALL_MODES``), the last ``SPREAD_WINDOW`` calls' times before their runs (ms):
        ``call_before_ms``."""
        self._transport_stats: list | None = None
        """[mean, sample std or None (``_NOT_YET`` until asked)] of ``_transport_res``, cached until the next
        residual."""
        self._memory = (memory if memory is not None else TRANSPORT_MEMORY) if memory_key is not None else None
        self._memory_key = memory_key
        if self._memory is not None:
            self._transport_res.extend(self._memory.recall(memory_key))
            kept = self._memory.recall_server_scale(memory_key)
            if kept is not None:
                self.scale["server"] = kept
            for kind, xs in self._memory.recall_after(memory_key).items():
                self._after[kind] = deque(xs, maxlen=SPREAD_WINDOW)
            for mode, xs in self._memory.recall_before(memory_key).items():
                self._before[mode] = deque(xs, maxlen=SPREAD_WINDOW)
        self._sums: dict[tuple, float] = {}
        """(side, attribute, op names) -> the profiled sum over those ops, for ``_sums_of`` (this ``base``)."""
        self.version = 0
        """Counts the changes of what planning reads here (``base``, a calibration, a transport residual); with
        ``scale``'s two values (a dict others may write) the background decision's exact key
        (``ue_client.background.Lookahead``)."""

    def ue_cv(self, min_samples: int = MIN_SPREAD_SAMPLES) -> float | None:
        """The UE's run-time relative spread: sample std / mean of the last ``SPREAD_WINDOW`` requests'
        measured / predicted UE time (predicted by the model now: ``overhead_ms`` + scale x profiled; each
        at the frequency it ran at), or None with fewer than ``min_samples`` (>= 2). It sees what the
        profile's short runs may not: other work on the UE's CPU (bursts), a quota's period. Unitless."""
        o, s = self.overhead_ms, self.scale["ue"]
        return relative_spread([m / (o + s * b) for b, m in self._ue_pairs], min_samples)

    @property
    def base(self) -> CostGraph | None:
        """The profiled cost graph (None before the first connection measured it)."""
        return self._base

    @base.setter
    def base(self, value: CostGraph | None) -> None:
        self._base = value
        self.version += 1
        self._scaled = None
        self._sums = {}

    @property
    def costs(self) -> CostGraph | None:
        """The cost graph planning uses: the profiled one with UE and server times rescaled by what
        requests actually took (rebuilt only when a scale moved by 0.01 or more)."""
        if self._base is None:
            return None
        key = (round(self.scale["ue"], 2), round(self.scale["server"], 2))
        if self._scaled is None or self._scaled[0] != key:
            # the base's structure and prepared arrays are kept (``CostGraph.scaled``): a new copy per moved
            # scale cost googlenet's re-plans 0.70 ms CPU to build and more to prepare again (x10 at 10 % of a core)
            self._scaled = (key, self._base.scaled(ue=self.scale["ue"], server=self.scale["server"]))
        return self._scaled[1]

    def base_ue_ms(self) -> float:
        """The profiled UE time of the whole model, ms (cached per base cost graph)."""
        if self._base_sum is None or self._base_sum[0] is not self._base:
            self._base_sum = (self._base, sum(o.ue_ms for o in self._base.ops))
        return self._base_sum[1]

    def base_ms(self, side: str, names) -> float:
        """Profiled ms of the ops ``names`` on ``side`` (``ue`` or ``server``); cached per tuple of names (a
        split's ``ue_order`` / ``server_order``: the same ones on every request of a plan)."""
        return self._sum("ue_ms" if side == "ue" else "server_ms", names)

    def _sum(self, attr: str, names) -> float:
        """The profiled ``attr`` (an ``OpCost`` field) summed over the ops ``names`` of ``base``."""
        if not isinstance(names, tuple):
            idx, ops = self._base.index, self._base.ops
            return sum(getattr(ops[idx[n]], attr) for n in names)
        key = (attr, names)
        got = self._sums.get(key)
        if got is None:
            idx, ops = self._base.index, self._base.ops
            got = sum(getattr(ops[idx[n]], attr) for n in names)
            if len(self._sums) >= 256:
                self._sums.clear()
            self._sums[key] = got
        return got

    def split_spread(self, ue_order: tuple[str, ...], server_order: tuple[str, ...]) -> tuple[float, float]:
        """(variance of the split's op times in ms^2, its server ops' time in ms) at the scales of now: the
        profiled sums (cached per split) x scale^2 and x scale. What ``ue_client.deadline.patience_of``
        needs, without the rescaled cost graph (``costs``), which a moving scale rebuilt per request."""
        return self.spread_of(*self.variances(ue_order, server_order), self._sum("server_ms", server_order))

    def variances(self, ue_order: tuple[str, ...], server_order: tuple[str, ...]) -> tuple[float, float]:
        """(profiled variance of the ops ``ue_order`` on the UE, of ``server_order`` on the server), ms^2 each."""
        return self._sum("ue_var", ue_order), self._sum("server_var", server_order)

    def spread_of(self, ue_var: float, server_var: float, server_ms: float) -> tuple[float, float]:
        """``split_spread`` from a split's profiled sums (``variances``; ``server_ms``: ``base_ms("server",
        ...)``), which a caller may keep per split: (variance ms^2, server ms) at the scales of now."""
        su, ss = self.scale["ue"], self.scale["server"]
        return ue_var * su * su + server_var * ss * ss, server_ms * ss

    def calibrate(self, side: str, measured_ms: float, base_ms: float, alpha: float = 0.3) -> None:
        """Move ``side``'s scale toward measured / profiled (ignored under ``MIN_CALIBRATION_MS`` profiled); for the
        UE, (measured - ``overhead_ms``) / profiled, after the pair joined the window of the overhead's
        fit (``fit_overhead``) and of ``ue_cv``."""
        if base_ms < MIN_CALIBRATION_MS or measured_ms <= 0:
            return
        self.version += 1
        fixed = 0.0
        if side == "ue":
            self._ue_pairs.append((base_ms, measured_ms))
            self.overhead_ms = fixed = fit_overhead(self._ue_pairs)
        ratio = min(4.0, max(0.25, (measured_ms - fixed) / base_ms))
        self.scale[side] = (1 - alpha) * self.scale[side] + alpha * ratio
        if side == "server" and self._memory is not None:
            self._memory.note_server_scale(self._memory_key, self.scale["server"])

    def calibrate_server(self, measured_ms: float, base_ms: float, share: float, alpha: float = 0.3) -> None:
        """Move the server's scale from one request's server-side time: ``measured_ms`` = its ops' compute
        plus its scheduler queueing (``ServerTimings.compute_ms + queue_ms``), ``base_ms`` the profiled time
        of those ops, ``share`` (0 < share <= 1) the compute share the session had (``SessionOpened.share``).

        The planner predicts that time as profiled x scale / share (``partitioner.simulate``: server ops at
        rate ``phi``), the share being what the session gets when every session computes at once. The
        server's fair queue is work-conserving, so with the other sessions idle a request gets the whole
        server: its measured time is the profiled one, and a scale of measured / profiled then counted the
        share twice (one UE with five sessions open: 9 ms measured, 45 ms predicted). The scale therefore
        moves toward measured / profiled x share (clamped to [0.25 x share, 4]: between idle and full
        contention it lies in [share, 1]), which
        predicts the measured time back at that share, and under full contention (measured = profiled /
        share) is the plain ratio. One request's ratio counts at most ``SERVER_STEP`` times the scale of now
        (or 1 / it): a robust EWMA. Raises ValueError on a share outside (0, 1]."""
        if not 0 < share <= 1:
            raise ValueError(f"compute share must be in (0, 1], got {share!r}")
        if base_ms < MIN_CALIBRATION_MS or measured_ms <= 0:
            return
        self.version += 1
        s = self.scale["server"]
        ratio = min(4.0, max(0.25 * share, measured_ms * share / base_ms))
        ratio = min(s * SERVER_STEP, max(s / SERVER_STEP, ratio))
        self.scale["server"] = (1 - alpha) * s + alpha * ratio
        if self._memory is not None:
            self._memory.note_server_scale(self._memory_key, self.scale["server"])

    def calibrate_transport(self, measured_ms: float, predicted_ms: float) -> None:
        """Add one split request's transport residual: ``measured_ms`` is its latency less the UE's compute
        and the server's compute and queueing (what the uplink, the downlink and the UE's sending and
        receiving took), ``predicted_ms`` the same part of the plan's prediction (latency - UE finish -
        server time; without ``transport_ms``). The residual is clamped to +-1000 ms; ``transport_ms``
        becomes the mean of the last ``SPREAD_WINDOW`` residuals."""
        r = min(1000.0, max(-1000.0, measured_ms - predicted_ms))
        self._transport_res.append(r)
        self._transport_stats = None
        self.version += 1
        if self._memory is not None:
            self._memory.note(self._memory_key, r)

    def _transport(self) -> tuple[float, float | None]:
        """(mean, sample std or None below two) of the residual window, each computed once per residual and
        the std only when asked (a reused decision reads the mean alone: ``DecisionCache.reuse``)."""
        mean = self._transport_mean()
        st = self._transport_stats
        if st[1] is _NOT_YET:
            xs = list(self._transport_res)
            st[1] = sample_std(xs, mean) if len(xs) >= 2 else None
        return mean, st[1]

    def _transport_mean(self) -> float:
        """The residual window's mean (0.0 when empty), computed once per residual."""
        st = self._transport_stats
        if st is None:
            xs = list(self._transport_res)
            st = self._transport_stats = [statistics.fmean(xs) if xs else 0.0, _NOT_YET]
        return st[0]

    @property
    def transport_ms(self) -> float:
        """What a split request's transport took beyond the link model's prediction, ms: the mean of the
        last ``SPREAD_WINDOW`` residuals (``calibrate_transport``; 0 before ``MIN_TRANSPORT_SAMPLES`` of
        them); planning adds it to every plan that uses the server. A mean, not a median: the plan predicts
        the request's expected latency, rare slow transports included (module docstring); what makes it
        robust to its first, noisy samples is that it waits for two and that a decision is made again only
        when it moved beyond its standard error (``transport_se_ms``, ``TRANSPORT_REPLAN_SE``)."""
        if len(self._transport_res) < MIN_TRANSPORT_SAMPLES:
            return 0.0
        return self._transport_mean()

    def transport_se_ms(self) -> float | None:
        """The standard error of ``transport_ms`` (ms): the residuals' sample std / sqrt(their number), or
        None below ``MIN_TRANSPORT_SAMPLES`` (and two) residuals. How far the mean may move by chance alone
        (``DecisionCache.drift`` re-plans only beyond ``TRANSPORT_REPLAN_SE`` of it)."""
        n = len(self._transport_res)
        if n < max(2, MIN_TRANSPORT_SAMPLES):
            return None
        sd = self._transport()[1]
        return None if sd is None else sd / math.sqrt(n)

    def transport_sd_ms(self, min_samples: int = MIN_SPREAD_SAMPLES) -> float | None:
        """The transport residual's spread: sample standard deviation (ms) of the last ``SPREAD_WINDOW``
        residuals (``calibrate_transport``), or None with fewer than ``min_samples`` (>= 2) of them. What
        the transport of a split request varies by beyond the link model (module docstring)."""
        if len(self._transport_res) < max(2, min_samples):
            return None
        return self._transport()[1]

    def note_call_after(self, ms: float, kind: str = "plan") -> None:
        """Add what one call spent after its run ended, ms (from the end of the run, ``RequestReport.measured_ms``,
        to the call's return: the report, the deadline and energy fields, the next request's background decision
        handed off), as a call of kind ``kind`` (``AFTER_KINDS``). Raises ValueError on an unknown kind or a
        value that is not a finite number >= 0. Not a planning input: no decision reads it (``version`` stays)."""
        if kind not in AFTER_KINDS:
            raise ValueError(f"unknown kind of call {kind!r} (one of {', '.join(AFTER_KINDS)})")
        ms = float(ms)
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"a call's time after its run must be a finite number of ms >= 0, got {ms!r}")
        self._after.setdefault(kind, deque(maxlen=SPREAD_WINDOW)).append(ms)
        if self._memory is not None:
            self._memory.note_after(self._memory_key, ms, kind)

    def call_after(self, kind: str = "plan") -> float:
        """The time a call of kind ``kind`` (``AFTER_KINDS``) is expected to spend after its run, ms: the mean of
        the last ``SPREAD_WINDOW`` such calls' (``note_call_after``; of this model's earlier clients too, through
        ``TransportMemory``); an ``upload`` call with none of its kind yet, the ``plan`` calls' mean; 0.0 with
        none. A mean, as ``transport_ms``: on a CPU-quota'd UE this time is mostly the quota's stalls (at 10 % of
        a core with a 10 ms period, 0.5, 9.5 or 19 ms for the same work), and the prediction is the expected
        latency. Kept apart by kind since session 19: a cold request's time after its run (57 ms at 10 % / 400
        Mbit/s, its weights going up beside it, against 0.1-0.4 ms for a warm one) was in the mean every warm call
        of the stream predicted with. Raises ValueError on an unknown kind."""
        if kind not in AFTER_KINDS:
            raise ValueError(f"unknown kind of call {kind!r} (one of {', '.join(AFTER_KINDS)})")
        got = self._after.get(kind) or self._after.get("plan")
        return statistics.fmean(got) if got else 0.0

    @property
    def call_after_ms(self) -> float:
        """``call_after("plan")``: the time an ordinary call (one whose plan puts no weights on the uplink) is
        expected to spend after its run, ms."""
        return self.call_after("plan")

    def note_call_before(self, mode: str, ms: float) -> None:
        """Add what one call of kind ``mode`` (``CALL_MODES``) spent before its run, ms (from the call's start,
        ``CoinferClient.__call__``, until its plan was ready: binding, a capture, connecting, waiting for a
        background decision, planning). Noted after the call's own prediction was made: a call's prediction never
        holds its own time (``call_before_ms``). Raises ValueError on an unknown kind or a value that is not a
        finite number >= 0. Not a planning input (``version`` stays)."""
        if mode not in CALL_MODES:
            raise ValueError(f"unknown kind of call {mode!r} (one of {', '.join(CALL_MODES)})")
        ms = float(ms)
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"a call's time before its run must be a finite number of ms >= 0, got {ms!r}")
        self._before.setdefault(mode, deque(maxlen=SPREAD_WINDOW)).append(ms)
        if self._memory is not None:
            self._memory.note_before(self._memory_key, mode, ms)

    def call_before_ms(self, mode: str) -> float:
        """The time a call of kind ``mode`` (``CALL_MODES``) is expected to spend before its run, ms: the mean of
        the last ``SPREAD_WINDOW`` such calls' (``note_call_before``; of this model's earlier clients too, through
        ``TransportMemory``); with none of that kind yet, the mean over the kinds that neither connect nor profile
        (``LIGHT_CALL_MODES``), 0.0 with none of those either. A forecast from earlier calls only, as
        ``call_after_ms``: on a CPU-quota'd UE this time is one quota stall or none (0.3 or ~10 ms at 10 % of a
        core with a 10 ms period, session 18's cell) and the mean is the expected one. Raises ValueError on an
        unknown kind."""
        if mode not in CALL_MODES:
            raise ValueError(f"unknown kind of call {mode!r} (one of {', '.join(CALL_MODES)})")
        got = self._before.get(mode)
        if got:
            return statistics.fmean(got)
        light = [x for m in LIGHT_CALL_MODES for x in self._before.get(m, ())]
        return statistics.fmean(light) if light else 0.0

    @property
    def transport_residuals(self) -> list[float]:
        """The recent transport residuals (ms, clamped), oldest first."""
        return list(self._transport_res)

    def seed_transport(self, residuals) -> None:
        """Start from transport residuals (ms) measured before, e.g. by another client of this UE over the same
        link (the testbed's calibration phase): they replace the window (what ``TransportMemory`` gave this
        model included), clamped as ``calibrate_transport`` clamps, so ``transport_ms`` and
        ``transport_sd_ms`` are what that client had; they are not added to the memory (that client's own
        residuals are there already when it had the same key). Raises ValueError on a value that is not a
        finite number."""
        xs = [float(x) for x in residuals]
        if not all(math.isfinite(x) for x in xs):
            raise ValueError("transport residuals must be finite numbers (ms)")
        self._transport_res.clear()
        self._transport_res.extend(min(1000.0, max(-1000.0, x)) for x in xs)
        self._transport_stats = None
        self.version += 1

    def fresh(self) -> bool:
        """Whether nothing was learned from requests yet: no transport residual, no call's time before or after
        its run (neither this client's nor, through ``TransportMemory``, its process's earlier clients')."""
        return not self._transport_res and not any(self._after.values()) and not any(self._before.values())

    def snapshot(self) -> dict:
        """What this model learned from requests, for ``ue_client.transport_cache``: the residual window (ms,
        oldest first), the server's cost scale (None unless a split request was measured: the residuals say so),
        and per kind the calls' times after and before their runs (ms)."""
        res = list(self._transport_res)
        return {"residuals": res, "server_scale": self.scale["server"] if res else None,
                "after": {k: list(v) for k, v in self._after.items() if v},
                "before": {k: list(v) for k, v in self._before.items() if v}}

    def seed(self, snapshot: dict) -> bool:
        """Start from ``snapshot`` (``snapshot``'s form, as ``transport_cache.load`` validates it) when ``fresh``:
        its residuals, server scale and call times become this model's windows (not added to ``TransportMemory``:
        this client's own measurements go there). Returns whether it was taken."""
        if not self.fresh():
            return False
        self._transport_res.extend(snapshot["residuals"])
        self._transport_stats = None
        if snapshot["server_scale"] is not None:
            self.scale["server"] = float(snapshot["server_scale"])
        for field, store in (("after", self._after), ("before", self._before)):
            for kind, xs in snapshot[field].items():
                store[kind] = deque(xs, maxlen=SPREAD_WINDOW)
        self.version += 1
        return True

    def measure(self, model: PreparedModel, stub, info: wire.ServerInfo, *, threads: int | None, runs: int,
                slowdown: float) -> None:
        """Profile ``model`` here and on the server (``stub``) and set ``base``; see ``measure_costs``."""
        self.base = measure_costs(model, stub, info, self.scale, threads=threads, runs=runs, slowdown=slowdown)


def measure_costs(model: PreparedModel, stub, info: wire.ServerInfo, scale: dict[str, float], *,
                  threads: int | None, runs: int, slowdown: float) -> CostGraph:
    """The model's cost graph: this device's profile (``profiler.profile_model``, possibly cached), the
    server's per-op times (``ProfileGraph``; the UE's times when the server cannot profile), UE times x
    ``slowdown``. ``model.graph`` is what the engine plans: ops off the server's allowlist were cut off
    beforehand (``modelgraph.pinning``, ``RemoteEngine``). Sets ``scale["ue"]`` from three
    whole-model runs now vs the profile (a cached profile may come from another load or CPU quota)."""
    from profiler import cost_graph, profile_model
    from ue_client.heap import retain_freed_buffers

    retain_freed_buffers()  # profiled with the heap every request runs with (``CoinferClient``)
    g = model.graph
    example = model.bound_example()
    prof = profile_model(g, example, threads=threads, runs=runs, warmup=2)
    spec = make_slice(g, g.split(op.name for op in g.ops), with_hashes=False)
    server_costs = None
    try:
        sp = wire.profile_graph(stub, spec.to_json(), timeout_s=PROFILE_TIMEOUT_S)
        server_costs = dict(sp.ops)
    except RequestFailed as e:
        log.warning("server could not profile %s (%s); assuming server op time = UE op time", g.name, e)
    except ServerUnavailable as e:
        if getattr(e, "code", "") != "DEADLINE_EXCEEDED":
            raise
        log.warning("server did not profile %s within %.0f s; assuming server op time = UE op time", g.name,
                    PROFILE_TIMEOUT_S)
    # A cached profile may come from a busier (or quieter) moment: check it against a few runs now.
    env0 = bind(g, example)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run_ue_part(g, g.split(()), dict(env0))
        times.append((time.perf_counter() - t) * 1e3)
    if prof.sum_mean_ms > 0:
        # up to 16x: a cached profile may come from this machine without the CPU quota it has now
        scale["ue"] = min(16.0, max(0.25, sorted(times)[1] / prof.sum_mean_ms))
    costs = cost_graph(g, prof, server_costs)
    if server_costs is None:
        costs = costs.with_server_speedup(1.0)
    return slow_costs(costs, slowdown)


def head_costs(costs: CostGraph, head: ModelGraph) -> CostGraph:
    """A cost graph measured for the whole model (``ClientOptions.costs``) restricted to the ops of
    ``head`` (``modelgraph.pinning``: the ops the server may run), with the head's outputs (which
    include every tensor the pinned tail reads). Raises ``InputError`` when ``costs`` lacks a head op."""
    names = {op.name for op in head.ops}
    missing = names - {o.name for o in costs.ops}
    if missing:
        raise InputError(f"the given cost graph lacks {len(missing)} ops of this model (e.g. {sorted(missing)[0]!r})")
    keep = [i for i, o in enumerate(costs.ops) if o.name in names]
    ops = tuple(costs.ops[i] for i in keep)
    # a tensor the pinned tail reads comes back dense: a whole-model graph priced it as a cut tensor, compact when
    # its layout has stride-0 dimensions (``ModelGraph.used_out_bytes``)
    outs = set(head.outputs)
    dense = {op.name: head.used_out_bytes(op) for op in head.ops
             if any(r in outs and op.output_meta(r).wire_nbytes != op.output_meta(r).nbytes for r in op.output_refs())}
    if dense:
        ops = tuple(replace(o, out_bytes=max(o.out_bytes, dense[o.name])) if o.name in dense else o for o in ops)
    used_w = {w for o in ops for w in o.weights}
    samples = None if costs.ue_samples_ms is None else tuple(
        tuple(row[i] for i in keep) for row in costs.ue_samples_ms)
    return replace(costs, ops=ops, outputs=tuple(dict.fromkeys(split_ref(o)[0] for o in head.outputs)),
                   weights={w: b for w, b in costs.weights.items() if w in used_w}, ue_samples_ms=samples)
