"""The single adapter between the runtime and the partitioner: one call, one small result.

Why a wrapper: the runtime needs only the server set, the need-ordered uploads, the simulated latency
of exactly what it will do (parallel need-ordered upload with what the server holds) and, for
progressive offloading, the warm target. Keeping the partitioner's API behind this function makes a
change there a one-place change here.

The UE's CPU cost of sending (``ue_cpu``, a :class:`partitioner.uecpu.UeCpu` measured by the client):
every policy plans with the effective uplink ``min(link rate, CPU-bound send rate)`` and every
prediction is the CPU-corrected one (:func:`partitioner.uecpu.simulate_cpu`: bytes sent while the UE
computes delay it when sending and computing share the CPU budget).

``auto`` = CPU- and horizon-aware progressive offloading:

- this request: mjoa's plan (parallel need-ordered upload of what the server lacks), kept only if its
  corrected prediction is below local execution's (the request-level guard); else local;
- the warm target (mjoa's) is the investment. On a UE whose CPU is shared between sending and
  computing, uploading it slows whatever the UE computes meanwhile, so it is not streamed behind
  requests: either the investment is made in one request (the target split, cold: its weights go up in
  need order inside that request) or nothing is uploaded for it at all (idle-time uploads were tried:
  on a 10 % CPU quota the transport work and the spent quota period still slowed the next local run by
  about 20 %). Weights left from an investment go up only while the UE waits for the server or
  between requests. The investment is made when it
  pays over the remaining ``horizon`` (requests including this one): cold target + (horizon - 1) warm
  target < (1 - margin) x horizon x this request's guarded prediction (margin 0.2: on a throttled UE a
  local run varies by +-20 % with the CPU quota's period, and a wrong investment costs more than a missed
  one). Without a horizon, rent-or-buy:
  invest once the latency already lost to not being warm (``lost_ms``, kept by the client) reaches the
  investment's extra latency over this request's plan. With horizon 1 nothing is uploaded for later.
- with a horizon, a third way (``_prefetch_best``): this request runs locally while the warm target's
  weights go up in need order (the CPU they take slows it: l + s x), for m = 1 .. horizon - 1 requests, then
  the target cold with what is then held, warm after; it is taken when its predicted total is below
  investing now and below never investing by the same margin (``PlanChoice.prefetch``; the runtime parks
  what is left when the local run ends, so nothing goes up while the UE idles). The same strategy space as
  ``partitioner.streambound``'s lower bound.
- with a horizon, a fourth way (``_gradual_best``, IONN's gradual offloading): the target's weights go up from
  its last op back (a suffix of the op order runs on the server once its weights are up), during local runs
  as a prefetch does and, once an intermediate split is held and faster, while the UE waits for the server on
  it; each request runs local or the best held split, and the stream may switch to the target cold at any
  request. Taken when its predicted total is ``GRADUAL_MARGIN`` (5 %) below prefetching and investing now
  and below never investing by the investment margin (``PlanChoice.gradual``); its space has its own bound,
  ``partitioner.streambound.gradual_bound``.
- on a UE whose sending does not slow its computation, the target's remaining weights stream as
  lowest-priority background uploads behind every request (unless horizon is 1), as before.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from partitioner import CostGraph, Link
from partitioner import online as _online
from partitioner.errors import PartitionerError
from partitioner.planners import plan  # imported here, not inside a request: it loads scipy
from partitioner.prep import SCALE_FREE, prepare
from partitioner.robust import EnergyModel, Spread, latency_moments
from partitioner.simulate import Rates, server_mask, simulate, split_costs, with_transport
from partitioner.state import ServerState, Shares
from partitioner.uecpu import SEND_SHARE, UeCpu, effective_link, simulate_cpu

log = logging.getLogger(__name__)

SCALE_FREE.add("_planning_masks")  # name sets <-> bitmasks: the structure's, the same for a calibrated copy

POLICIES = ("auto", "local", "offload", "neurosurgeon", "dads", "cic", "mjoa", "robust", "optimal", "ionn")


@dataclass(frozen=True)
class PlanChoice:
    policy: str
    """The policy that decided (``auto`` resolves to mjoa)."""
    server_ops: frozenset[str]
    predicted_ms: float
    """Simulated latency of this partition as the runtime runs it: parallel, need-ordered upload of what
    the server lacks (the same ruler for every policy)."""
    warm_ms: float
    serial_ms: float
    """Simulated latency with every missing weight uploaded first (the serial-upload baseline)."""
    upload_order: tuple[str, ...] = ()
    warm_target: frozenset[str] | None = None
    background: tuple[str, ...] = ()
    """Weights (by name) to stream at the lowest priority for later requests (progressive offloading)."""
    decision_ms: float = 0.0
    feasible: bool = True
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    local_ms: float = 0.0
    """Predicted latency of running the whole model on the UE."""
    invest: bool = False
    """``auto`` chose to upload the warm target's weights in this request (a horizon/rent-or-buy decision)."""
    idle_only: bool = False
    """Send ``background`` only while the UE is idle (sending would slow the UE's computation)."""
    prefetch: bool = False
    """``auto`` runs this request locally and sends ``background`` (the warm target's weights, need order)
    while it computes, to go remote on the target at a later request (``_prefetch_best``); what is left when
    the run ends waits for the next request."""
    gradual: bool = False
    """``auto`` offloads gradually (``_gradual_best``, IONN's strategy): ``background`` is the target's weights
    from its last op back, this request runs locally (``prefetch`` too) or on an intermediate split the server
    holds, whose background goes up while the UE waits for the server."""


_CHOICE_FIELDS = frozenset(f.name for f in fields(PlanChoice))
if hasattr(PlanChoice, "__post_init__") or hasattr(PlanChoice, "__slots__"):  # (what ``evolve`` relies on)
    raise TypeError("PlanChoice must stay a plain frozen dataclass: ue_client.planning.evolve copies its dict")


def refresh_transport(choice: PlanChoice, transport_ms: float) -> PlanChoice:
    """``choice`` with its prediction moved to the transport residual ``transport_ms`` (ms; the one
    ``CostModel.transport_ms`` has now) instead of the one it was planned with: what ``choose`` would have
    predicted for the same partition with it, for a decision that is reused (``DecisionCache``) while the
    residual moved less than its re-plan threshold. Changes ``predicted_ms``, ``details["transport_ms"]``
    and ``details["mean_ms"]`` where it was the prediction; a choice without server ops, or planned before
    the transport's base was recorded, comes back as it is."""
    if not choice.server_ops:
        return choice
    predicted, details = _transport_moved(choice.predicted_ms, choice.details, transport_ms)
    return choice if details is None else replace(choice, predicted_ms=predicted, details=details)


def _transport_moved(predicted: float, d: dict, transport_ms: float) -> tuple[float, dict | None]:
    """``refresh_transport``'s arithmetic for a split's ``predicted_ms`` and ``details`` ``d``: (the new
    prediction, the new details), or (``predicted``, None) when nothing moves."""
    base, floor = d.get("transport_base_ms"), d.get("transport_floor_ms")
    if base is None or floor is None:
        return predicted, None

    def term(t: float) -> float:  # what ``choose`` added to the base (``partitioner.simulate.with_transport``)
        return max(t, floor) if t else 0.0

    old = d.get("transport_ms", 0.0)
    if transport_ms == old:
        return predicted, None
    moved = predicted + term(transport_ms) - term(old)
    details = {**d, "transport_ms": transport_ms}
    if not transport_ms:
        details.pop("transport_ms")
    if d.get("mean_ms") == predicted:
        details["mean_ms"] = moved
    return moved, details


def refresh_ue_scale(choice: PlanChoice, then: float | None, now: float | None) -> PlanChoice:
    """A local ``choice`` (no server ops, nothing uploading in its background, a mean prediction) planned
    when the UE's cost scale was ``then`` (``CostModel.scale["ue"]``), with its prediction at ``now``: the
    UE's per-request overhead (``details["ue_overhead_ms"]``) as it was, the rest x now / then, which is what
    ``choose`` predicts for running locally at that scale (every UE op's time is profiled x scale). For a
    decision reused while the scale moved less than its re-plan threshold (30 %, ``DecisionCache.drift``):
    before, its prediction stayed the one it was made with (session 12's warm scenario: local requests at 25 %
    of a core predicted +11 % median, signed, 19 % absolute, for three requests per client while each of them
    moved the scale). Changes ``predicted_ms``, ``local_ms``, ``warm_ms`` and ``serial_ms`` (each the local
    prediction) and ``details["mean_ms"]`` / ``details["ue_finish_ms"]``; any other choice, or a scale not a
    positive number, comes back as it is."""
    if (choice.server_ops or choice.background or choice.prefetch or choice.gradual or not then or not now
            or then <= 0 or now <= 0 or then == now or choice.details.get("mean_ms") != choice.predicted_ms):
        return choice
    oh = choice.details.get("ue_overhead_ms", 0.0)
    r = now / then

    def moved(x: float) -> float:
        return oh + (x - oh) * r

    details = {**choice.details, "mean_ms": moved(choice.predicted_ms)}
    if "ue_finish_ms" in details:
        details["ue_finish_ms"] = moved(details["ue_finish_ms"])
    return replace(choice, predicted_ms=moved(choice.predicted_ms), local_ms=moved(choice.local_ms),
                   warm_ms=moved(choice.warm_ms), serial_ms=moved(choice.serial_ms), details=details)


def refresh_server_scale(choice: PlanChoice, then: float | None, now: float | None) -> PlanChoice:
    """A split ``choice`` (a mean prediction that records its server part, ``details["server_ms"]``: the
    server's time at the compute share it was planned with) planned when the server's cost scale was
    ``then`` (``CostModel.scale["server"]``), with its prediction at ``now``: the server part x now / then,
    its change added to ``predicted_ms``, ``warm_ms`` and ``serial_ms``. Exact when the server's ops follow
    the UE's (a chain split, everything on the server); otherwise the prediction moves by at most that much
    (the server runs its ops one after another, so their total bounds the move of its finish). For a
    decision reused while the scale moved by less than its re-plan threshold (30 %, ``DecisionCache.drift``):
    before, its prediction kept the server time it was made with while the transport residual was computed
    against the server time of now, so a stale server part went into the residual (a 10 % UE under load,
    googlenet, 400 Mbit/s, session 13: a server profiled at 283 ms that ran in 55, residuals -35 to -92 ms).
    Any other choice, or a scale not a positive number, comes back as it is."""
    if not choice.server_ops:
        return choice
    changes = _server_moved(choice.predicted_ms, choice.warm_ms, choice.serial_ms, choice.details, then, now)
    return choice if changes is None else replace(choice, **changes)


def _server_moved(predicted: float, warm: float, serial: float, d: dict, then: float | None,
                  now: float | None) -> dict | None:
    """``refresh_server_scale``'s arithmetic for a split's predictions and ``details`` ``d``: the changed
    fields, or None when nothing moves."""
    srv = d.get("server_ms")
    if (srv is None or not then or not now or then <= 0 or now <= 0 or then == now
            or d.get("mean_ms") != predicted):
        return None
    delta = srv * (now / then - 1.0)
    details = {**d, "server_ms": srv + delta, "mean_ms": predicted + delta}
    if "transport_base_ms" in details:
        details["transport_base_ms"] += delta
    return {"predicted_ms": predicted + delta, "warm_ms": warm + delta, "serial_ms": serial + delta,
            "details": details}


def evolve(choice: PlanChoice, **changes: Any) -> PlanChoice:
    """``dataclasses.replace(choice, **changes)`` for a ``PlanChoice`` (a frozen dataclass with no
    ``__post_init__`` and no slots, whose fields are its instance dict) without the per-field ``__init__``: a
    copy of the dict with ``changes`` (0.5 us instead of 3.4 at a full core; a reused warm decision is copied
    on every request, on its clock). Raises TypeError for a field ``PlanChoice`` does not have."""
    unknown = changes.keys() - _CHOICE_FIELDS
    if unknown:
        raise TypeError(f"PlanChoice has no field(s) {sorted(unknown)}")
    out = object.__new__(PlanChoice)
    d = out.__dict__
    d.update(choice.__dict__)
    d.update(changes)
    return out


def refresh_reused(choice: PlanChoice, transport_ms: float, ue_then: float | None, ue_now: float | None,
                   server_then: float | None, server_now: float | None) -> PlanChoice:
    """A reused decision's prediction at the estimates of now: exactly ``refresh_server_scale(refresh_ue_scale(
    refresh_transport(choice, transport_ms), ue_then, ue_now), server_then, server_now)`` (the same floating-point
    operations in the same order), built with at most one copy instead of up to three (``evolve``: a warm split
    request moves its transport residual and its server scale every time: two copies of the choice per request
    on the UE's clock). ``ue_*`` / ``server_*``: the UE's / the server's cost scale the decision was planned with
    and the one of now (``CostModel.scale``). ``tests/test_quick_reuse.py`` checks the equality."""
    if not choice.server_ops:  # (neither the transport nor the server's scale moves a local prediction)
        return refresh_ue_scale(choice, ue_then, ue_now)
    predicted, details = _transport_moved(choice.predicted_ms, choice.details, transport_ms)
    changes = _server_moved(predicted, choice.warm_ms, choice.serial_ms,
                            choice.details if details is None else details, server_then, server_now)
    if changes is None:
        return choice if details is None else evolve(choice, predicted_ms=predicted, details=details)
    return evolve(choice, **changes)


def choose(policy: str, costs: CostGraph, link: Link, *, state: ServerState | None = None,
           share: Shares | None = None, deadline_ms: float | None = None, budget_s: float = 0.3,
           target: frozenset[str] | None = None, ue_cpu: UeCpu | None = None, horizon: int | None = None,
           lost_ms: float = 0.0, invest_margin: float = 0.2, online: bool = True, eps: float = 0.05,
           energy: EnergyModel | None = None, uplink_cv: float = 0.0, ue_cv: float = 0.0,
           ue_overhead_ms: float = 0.0, transport_ms: float = 0.0, transport_sd_ms: float = 0.0,
           exclude: frozenset[frozenset[str]] = frozenset(),
           allow: frozenset[frozenset[str]] | None = None) -> PlanChoice:
    """Plan one request.

    ``exclude``: server sets whose slice the server refused (``ue_client.refusals``); ``allow``: when not
    None, the only server sets it may use (the server refused too many others). A policy's choice or warm
    target outside them is replaced by the best permitted partition by the same prediction
    (:func:`next_best`), and ``auto`` invests only in permitted targets; local is always permitted.

    ``auto`` = CPU- and horizon-aware progressive offloading (module docstring); ``target`` keeps the
    target of earlier requests (None: take mjoa's). ``ue_cpu``: the UE's CPU cost of sending (None:
    free); ``horizon``: requests left including this one (None: unknown, rent-or-buy); ``lost_ms``:
    latency lost so far to not being warm (rent-or-buy). ``online`` (auto, mjoa): decide among the
    candidates precomputed once per model and device pair (:mod:`partitioner.online`; the first call
    for a graph builds them, normally while connecting) instead of running mjoa's tree search; False:
    the full search within ``budget_s``.

    ``robust`` needs ``deadline_ms`` (raises ``PartitionerError`` without it) and plans P(latency >
    deadline) <= ``eps`` with ``energy``'s frequency levels (default ``EnergyModel()``) and an uplink of
    relative spread ``uplink_cv`` and a UE of run-time relative spread ``ue_cv`` (``partitioner.robust``);
    its choice carries ``details["frequency_ghz"]`` and the predictions
    are at that frequency. Every choice's ``details`` has ``mean_ms``/``std_ms`` (``moments``).

    ``ue_overhead_ms`` (>= 0): the UE's per-request overhead at the profile's frequency
    (``ue_client.calibration.CostModel.overhead_ms``), the same for every plan: added to every prediction
    (latency, warm, serial, local, the mean robust checks against its deadline), so it moves no ranking
    between plans but moves every plan toward or past a deadline. ``transport_ms``: what split requests'
    transport measured beyond the link model (``CostModel.transport_ms``; may be negative), added to every
    plan that uses the server (before mjoa's local guard and robust's deadline check; ``auto`` adds it to
    its choice's prediction only), never making the plan's own transport negative
    (``partitioner.simulate.with_transport``); ``transport_sd_ms`` (>= 0): that
    residual's spread over recent split requests (``CostModel.transport_sd_ms``), in the std of every plan
    that uses the server (robust's deadline check, every choice's reported ``std_ms``).
    """
    t0 = time.perf_counter()
    name = "mjoa" if policy == "auto" else policy
    plan_link = effective_link(link, ue_cpu)
    background: tuple[str, ...] = ()
    score = _scorer(costs, link, ue_cpu, state, share,
                    True if online and name == "mjoa" else "predict" if name in COMPILED_PREDICTIONS else False)
    if name == "mjoa" and online:
        P = prepare(costs)
        table = score.table
        r_plan = Rates.of(plan_link, share)
        details: dict[str, Any] = {"online": True, "candidates": len(table.candidates),
                                   "precompute_ms": table.precompute_ms}
        tmask = None
        if policy == "auto":
            tmask = table.decide(P, r_plan, None, "warm")[0] if target is None else score.mask(frozenset(target))
            target = score.names(tmask)
        if policy == "auto" and state is not None and tmask and _all_held(table._compiled(P, tmask), state.held,
                                                                         state):
            # The warm optimum is on the server: no plan beats it.
            smask = tmask
            details["warm_target_held"] = True
            reason = "warm target held"
        else:
            # on a UE whose sending slows its compute, each split is weighed with the CPU its upload takes
            # from its UE prefix (``OnlineTable.decide``'s shared evaluation, on the link's rates): the plain
            # one let a prefix hide behind an upload it in fact shared the CPU with (resnet18, 10 % UE,
            # 400 Mbit/s: a 26-op split beside 13 MB of upload predicted 406 ms, took 626)
            s_cpu = (ue_cpu.send_ms_per_byte if ue_cpu is not None and ue_cpu.shared
                     and ue_cpu.send_ms_per_byte > 0 else 0.0)
            smask = (table.decide(P, score.r, state, "cold", send_ms_per_byte=s_cpu, evals=score.evals)[0] if s_cpu
                     else table.decide(P, r_plan, state, "cold")[0])
            reason = ""
            if policy == "mjoa":
                tmask = table.decide(P, r_plan, None, "warm")[0]
        server = score.names(smask)
        warm_target = score.names(tmask) if tmask is not None else None
        if policy == "auto" and not details.get("warm_target_held"):
            background = table.background(P, tmask, smask, state)
        feasible, uncorrected = True, None
    else:
        if policy == "auto":
            from partitioner.progressive import next_request

            if target is None:
                # The target is fixed once per link estimate: give its (warm) search a real budget so a
                # busy CPU does not leave it at a heuristic incumbent.
                target = plan("mjoa", costs, plan_link, share=share,
                                    budget_s=max(1.0, 3 * budget_s)).warm_target
            if state is not None and target and target_held(costs, frozenset(target), state):
                # The warm optimum is on the server: no plan beats it, so no search (on a throttled UE the
                # search costs more than the warm request itself).
                p, background = _held_plan(costs, plan_link, frozenset(target), state, share), ()
            else:
                step = next_request(costs, plan_link, state, share=share, target=target, budget_s=budget_s)
                p, background = step.plan, tuple(step.background)
            warm_target = frozenset(target)
        else:
            opts: dict[str, Any] = {}
            if name == "mjoa":
                opts["budget_s"] = budget_s
            elif name == "robust":
                if deadline_ms is None:
                    raise PartitionerError("policy 'robust' needs a deadline (coinfer-ue run --deadline-ms D)")
                opts.update(deadline_ms=deadline_ms, eps=eps, energy=energy, uplink_cv=uplink_cv,
                            budget_s=max(budget_s, 0.3), ue_cpu=ue_cpu, ue_cv=ue_cv, fixed_ms=ue_overhead_ms,
                            transport_ms=transport_ms, transport_sd_ms=transport_sd_ms)
            elif name == "optimal":
                opts["budget_s"] = max(budget_s, 1.0)
            # robust models the send CPU itself (at each frequency): it gets the link, not the capped one
            p = plan(name, costs, link if name == "robust" else plan_link, state=state, share=share,
                     table=score.table, **opts)
            warm_target = p.warm_target
            if name == "ionn":  # its pieces stream behind every query, whatever the UE computes
                background = tuple(p.details.get("background", ()))
        server = frozenset(p.server_ops)
        reason, feasible, details, uncorrected = p.reason, p.feasible, dict(p.details), p.cold_ms
        if p.frequency_ghz is not None:
            details["frequency_ghz"] = p.frequency_ghz
    if not feasible and name == "robust":
        reason = reason or "no partition meets the deadline"
    factor = float(details.get("ue_time_factor", 1.0))
    if factor != 1.0:  # robust chose a frequency below the profile's: predict at that frequency (its ops
        # and its sending: one CPU)
        score = _scorer(scaled_ue(costs, factor), link, None if ue_cpu is None else ue_cpu.at_factor(factor),
                        state, share, False)
    local_ms = score.local_ms
    if exclude or allow is not None:
        server, warm_target, background, reason = _avoid_refused(
            score, exclude, allow, server, warm_target, background, reason, details, policy == "auto")

    # Every prediction below is of what the runtime does (parallel need-ordered upload of what the server
    # lacks, the UE's CPU shared with sending), from one simulator call per partition and mode.
    cold = score(server)
    predicted = cold.latency_ms
    warm_ms = score(server, "warm").latency_ms if server else local_ms

    phi = share.compute if share is not None else 1.0

    def transport(latency: float, ops: frozenset[str], ue_finish: float) -> float:
        if not (ops and transport_ms):
            return latency
        srv = score.server_ms(ops) / phi
        return with_transport(latency, ue_finish, srv, transport_ms)

    def keep_base(latency: float, ops: frozenset[str], ue_finish: float) -> None:
        """The prediction before its transport residual and that residual's floor (``refresh_transport``)."""
        if ops:
            srv = score.server_ms(ops) / phi
            details.update(transport_base_ms=latency, transport_floor_ms=min(0.0, ue_finish + srv - latency))

    if policy != "auto":
        keep_base(predicted, server, cold.ue_finish_ms)
        predicted = transport(predicted, server, cold.ue_finish_ms)
        warm_ms = transport(warm_ms, server, cold.ue_finish_ms)
    if ue_cpu is not None:
        details.update(uncorrected_ms=score.uncorrected(server) if uncorrected is None else uncorrected,
                       send_steal_ms=cold.steal_ms, effective_uplink_mbps=plan_link.uplink_mbps,
                       send_ms_per_byte=ue_cpu.send_ms_per_byte)
    if name == "mjoa" and server and predicted >= local_ms:  # the request-level guard
        details["guarded_ms"] = predicted
        reason = f"offloading predicted {predicted:.0f} ms >= local {local_ms:.0f} ms: local"
        if policy == "auto" and warm_target:
            # this request now uploads nothing: what the warm target lacks, the cold plan's share included, is
            # the investment to weigh over the horizon (the background held only what the cold plan did not
            # upload; when that was nothing, a UE holding part of the target stayed local for good: 355 ms
            # investing vs 300 ms local, with 7 warm requests of 51 ms after it)
            background = score.weight_order(frozenset(warm_target))
        server, predicted, warm_ms = frozenset(), local_ms, local_ms
    upload_order = score.order(server)
    invest = idle_only = prefetch = gradual = False
    P_n = score.P.n
    if policy == "auto":
        shared = ue_cpu is not None and ue_cpu.shared and ue_cpu.send_ms_per_byte > 0
        idle_only = shared  # also for weights queued by earlier requests
        if horizon is not None and horizon <= 1:
            background = ()  # no later request to upload for
        elif shared and background and warm_target:
            from partitioner.progressive import suffix_targets

            # the warm optimum, or a cheaper tail of the model that pays sooner (IONN's insight)
            cands = [frozenset(warm_target)]
            tails = (score.table.suffix_targets(score.P, Rates.of(plan_link, share), state)
                     if score.table is not None else suffix_targets(costs, plan_link, state, share=share))
            cands += [t for t in tails if t not in cands and t != server]  # this request's split buys nothing more
            cands = [t for t in cands if _permitted(t, exclude, allow)]  # (the warm target is)
            invest, why, tgt = _invest_best(score, cands, predicted, horizon, lost_ms, invest_margin, details)
            # prefetching only for the warm target: it does not move with what the server holds, so the next
            # request re-plans the same strategy (a tail's worth moves with it: a walk that prefetched for a
            # tail and then switched to the whole model lost more than it saved, in the property test)
            inv_ms = details.get("horizon_invest_ms", math.inf) if invest else math.inf
            # (not below investing now, a prefetch decides nothing: it is skipped or cut short there, and made in full
            # only if the gradual reason below names its total)
            pf = (_prefetch_best(score, cands[:1], predicted, horizon, invest_margin, limit=inv_ms)
                  if horizon is not None and not _prefetch_cannot_beat(score, cands[:1], predicted, horizon, inv_ms)
                  else None)
            pf_later = horizon is not None and inv_ms < math.inf and (pf is None or not pf["total_ms"] < inv_ms)
            # IONN's gradual offloading: intermediate splits while the target goes up, last op first
            pf_ms = pf["total_ms"] if pf is not None else math.inf
            beat = (1 - GRADUAL_MARGIN) * min(inv_ms, pf_ms)
            gd = (_gradual_best(score, cands[0], predicted, horizon, invest_margin, Rates.of(plan_link, share),
                                beat=beat) if horizon is not None and cands else None)
            if gd is not None and gd["total_ms"] < beat:
                if pf_later:  # (its total, at least investing now's: ``beat`` is the same with it)
                    pf = _prefetch_best(score, cands[:1], predicted, horizon, invest_margin)
                    pf_ms = pf["total_ms"] if pf is not None else math.inf
                k = gd["split_k"]
                details.update(gradual_total_ms=gd["total_ms"], gradual_requests=gd["requests"],
                               gradual_stay_ms=horizon * predicted,
                               gradual_bytes=gd["bytes"], gradual_split_ops=P_n - k,
                               gradual_target_ops=len(gd["target"]))
                reason = (f"gradual: {horizon} requests {gd['total_ms']:.0f} ms on intermediate splits while the "
                          f"target goes up last op first ({P_n - k} ops on the server now, {gd['bytes'] / 1e6:.1f} MB "
                          f"up in this one) vs {pf_ms:.0f} ms prefetching, {inv_ms:.0f} ms investing now, "
                          f"{horizon * predicted:.0f} ms never")
                gradual, invest = True, False
                background = gd["background"]
                if k >= P_n:  # local, the order's weights up while it computes (as a prefetch)
                    prefetch = True
                    server, upload_order, predicted, warm_ms = frozenset(), (), gd["now_ms"], score.local_ms
                else:  # a held suffix: its background goes up while the UE waits for the server
                    server = score.names(((1 << P_n) - 1) & ~((1 << k) - 1))
                    predicted, upload_order = score(server).latency_ms, score.order(server)
                    warm_ms = score(server, "warm").latency_ms
            elif pf is not None and pf["total_ms"] < inv_ms:
                details.update(prefetch_total_ms=pf["total_ms"], prefetch_bytes=pf["bytes"],
                               prefetch_requests=pf["requests"], prefetch_target_ops=len(pf["target"]),
                               prefetch_tail_bytes=pf["tail_bytes"])
                tail = (f", {pf['tail_bytes'] / 1e6:.1f} MB left for the first remote request" if pf["tail_bytes"]
                        else "")
                reason = (f"prefetch: {horizon} requests {pf['total_ms']:.0f} ms with {pf['requests']} local "
                          f"while {pf['bytes'] / 1e6:.1f} MB of the target go up in this one{tail} vs "
                          f"{inv_ms:.0f} ms investing now, {horizon * predicted:.0f} ms never")
                prefetch, invest = True, False
                server, upload_order, predicted, warm_ms = frozenset(), (), pf["now_ms"], score.local_ms
                background = pf["background"]
            elif invest and tgt != server:
                tc = score(tgt)
                server, predicted, upload_order = tgt, tc.latency_ms, score.order(tgt)
                warm_ms = score(server, "warm").latency_ms
                reason = why
            # The rest of the warm target goes up only if the warm target itself was bought. Declined: no
            # idle-time uploads either. On a CPU-shared UE "idle" sending still leaves transport work and a
            # spent quota period for the next request (measured: local runs 1.2x slower), and the rule
            # just said the upload does not pay (yet).
            bought_all = invest and tgt == frozenset(warm_target)
            sent_now = set(upload_order)  # once: a set per weight made this quadratic (~20 ms on densenet121)
            if not (prefetch or gradual):
                background = tuple(w for w in background if w not in sent_now) if bought_all else ()
    serial = transport(score(server, "serial").latency_ms, server, 0.0) if server else predicted
    if policy == "auto" and server:
        keep_base(predicted, server, 0.0)
        predicted, warm_ms = transport(predicted, server, 0.0), transport(warm_ms, server, 0.0)
    if server and transport_ms:
        details["transport_ms"] = transport_ms
    if server:  # the server's part of the prediction (``refresh_server_scale``, the transport residual's)
        details["server_ms"] = score.server_ms(server) / phi
    details.setdefault("ue_finish_ms", cold.ue_finish_ms if server else local_ms)
    if ue_overhead_ms:  # the same for every plan (at the chosen frequency): added after every comparison
        oh = ue_overhead_ms * factor
        predicted, warm_ms, serial, local_ms = predicted + oh, warm_ms + oh, serial + oh, local_ms + oh
        details["ue_overhead_ms"] = oh
        details["ue_finish_ms"] += oh
    if name != "robust" or "std_ms" not in details:
        details["mean_ms"] = predicted
        details["std_ms"] = score.std(server, uplink_cv, ue_cv, ue_overhead_ms, transport_sd_ms)
    return PlanChoice(policy=name, server_ops=server, predicted_ms=predicted, warm_ms=warm_ms, serial_ms=serial,
                      upload_order=upload_order, warm_target=warm_target, background=background,
                      decision_ms=(time.perf_counter() - t0) * 1e3, feasible=feasible, reason=reason,
                      details=details, local_ms=local_ms, invest=invest, idle_only=idle_only, prefetch=prefetch,
                      gradual=gradual)


NEXT_BEST_SUFFIXES = 16
"""Suffix splits of the op order :func:`next_best` evaluates (those of least additive cost)."""


def _permitted(ops: frozenset[str], exclude: frozenset[frozenset[str]],
               allow: frozenset[frozenset[str]] | None) -> bool:
    return not ops or (ops not in exclude and (allow is None or ops in allow))


def next_best(score: _Score, exclude: frozenset[frozenset[str]], allow: frozenset[frozenset[str]] | None = None,
              mode: str = "cold") -> tuple[frozenset[str], float]:
    """The best partition permitted by ``exclude`` / ``allow`` (see :func:`choose`) by ``score``'s prediction
    (ms, ``mode`` cold or warm), among: local (cold only), the ``NEXT_BEST_SUFFIXES`` suffix splits of the op
    order of least additive cost (``partitioner.simulate.split_costs``, plus the weight bytes the server
    lacks over the uplink when cold), the online table's candidates when the scorer has one, and ``allow``'s
    sets. Returns (server set, latency); (frozenset(), inf) in warm mode when no server set is permitted."""
    P, r = score.P, score.r
    T = split_costs(P, r)
    held = score.state.held if score.state is not None else frozenset()
    ranked, seen, nbytes = [], set(), 0
    for k in range(P.n - 1, -1, -1):
        if P.pinned[k]:
            break
        if mode == "cold":
            for w in P.op_weights[k]:
                if w not in seen and w not in held:
                    seen.add(w)
                    nbytes += P.weight_bytes[w]
        ranked.append((T[k] + nbytes / r.up, k))
    ranked.sort()
    cands: list[frozenset[str]] = [frozenset(P.names[k:]) for _, k in ranked[:NEXT_BEST_SUFFIXES]]
    if score.table is not None:
        cands += [score.names(cp.mask) for cp in score.table.candidates]
    cands += sorted(allow or (), key=len)
    best, best_v = frozenset(), (score.local_ms if mode == "cold" else math.inf)
    for ops in dict.fromkeys(cands):
        if ops and _permitted(ops, exclude, allow):
            v = score(ops, mode).latency_ms
            if v < best_v:
                best, best_v = ops, v
    return best, best_v


def _avoid_refused(score: _Score, exclude, allow, server: frozenset[str], warm_target, background: tuple[str, ...],
                   reason: str, details: dict, auto: bool):
    """(server, warm target, background, reason) with a refused server set or warm target replaced by the
    best permitted one (:func:`next_best`); the background of a replaced target is what the new one lacks."""
    if warm_target and not _permitted(frozenset(warm_target), exclude, allow):
        details["refused_target_ops"] = len(warm_target)
        new = next_best(score, exclude, allow, "warm")[0]
        warm_target = new or None
        if auto:
            held = score.state.held if score.state is not None else frozenset()
            up = set(score.order(server))
            background = tuple(w for w in score.weight_order(new) if w not in held and w not in up) if new else ()
    if not _permitted(server, exclude, allow):
        details["refused_ops"] = len(server)
        old, (server, _) = server, next_best(score, exclude, allow, "cold")
        reason = f"the server refused the slice of {len(old)} ops: the best other plan has {len(server)}"
        if auto and warm_target and background:
            up = set(score.order(server))
            background = tuple(w for w in background if w not in up)
    return server, warm_target, background, reason


def scaled_ue(costs: CostGraph, factor: float) -> CostGraph:
    """``costs`` with every UE time x ``factor`` (variance x factor^2): the UE at another frequency
    (``CostGraph.scaled``)."""
    return costs.scaled(ue=factor)


def moments(costs: CostGraph, server_ops: frozenset[str], link: Link, share: Shares | None = None,
            uplink_cv: float = 0.0, *, ue_cpu: UeCpu | None = None, state: ServerState | None = None,
            mode: str = "cold", ue_cv: float = 0.0, transport_sd_ms: float = 0.0) -> float:
    """Standard deviation (ms) of a partition's latency in the robust policy's variance model
    (:func:`partitioner.robust.latency_moments`, the one model for every policy's reported std): the UE
    ops' run-to-run spread (per-run sample sums when the profile has them, else summed per-op variances),
    the send CPU time's spread (``ue_cpu``: what sending costs this UE), the server ops' variances /
    share^2 and (bytes sent / R x ``uplink_cv``)^2; ``ue_cv``: the UE's run-time relative spread;
    ``transport_sd_ms``: the transport residual's spread (ms; partitions that use the server).
    Raises CostGraphError on an op name not in ``costs``."""
    P = prepare(costs)
    smask = server_mask(costs, server_ops)
    return latency_moments(P, smask, Rates.of(link, share), state, mode=mode, ue_cpu=ue_cpu,
                           uplink_cv=uplink_cv, ue_cv=ue_cv, transport_sd_ms=transport_sd_ms).std_ms


COMPILED_PREDICTIONS = frozenset(("ionn", "dads", "neurosurgeon", "cic", "offload", "local"))
"""Policies that choose their split themselves and whose predictions (:func:`choose`'s, and ``plan``'s of their
split) come from compiled partitions (``partitioner.online.predictor``: no offline search) instead of the Python
simulator: the same numbers to float rounding (tests/test_compiled_predictions.py). Session 17: IONN's re-plans
were ~5 simulations, 1.3-4.3 ms of a UE's CPU each."""


class _Score:
    """Prediction of one partition as the runtime runs it: the compiled partitions of the online table
    (O(uplink items) per call) when the policy uses one, else :func:`partitioner.uecpu.simulate_cpu`; the
    same numbers either way (tests/test_partitioner_online.py). ``use_table``: True, the online table
    (:func:`online_table`: built or loaded if need be); "predict", the compiled partitions alone
    (``partitioner.online.predictor``: the table when one is cached, else one without candidates); False,
    the simulator."""

    def __init__(self, costs: CostGraph, link: Link, ue_cpu: UeCpu | None, state: ServerState | None,
                 share: Shares | None, use_table: bool | str) -> None:
        self.costs, self.link, self.ue_cpu, self.state, self.share = costs, link, ue_cpu, state, share
        self.P = prepare(costs)
        self.table = (online_table(costs) if use_table is True else _online.predictor(costs) if use_table == "predict"
                      else None)
        self.r = Rates.of(link, share)
        local = self.P.__dict__.get("_planning_local")  # (the sum over the ops, kept on the prepared graph)
        if local is None:
            local = self.P.__dict__["_planning_local"] = float(sum(self.P.a))
        self.local_ms = local
        self._memo: dict = {}
        if state is not None and self.table is not None and "_lack" in state.__dict__:  # (what the state lacks of
            # the table's weights: made once per state, and the first state a client plans with sees whether the
            # table's weights lie within the ones its maker knows, off the requests' clock: session 34)
            names = _online.weight_names(self.table.weight_bytes)
            state.lacking(names, names)
        self.evals: dict = {}
        """The online table's shared cold evaluations in this scorer's inputs (``OnlineTable.decide``'s ``evals``,
        given by ``choose``): mask -> ``evaluate_shared``'s answer, read by the cold predictions (session 34)."""
        # name sets <-> bitmasks, kept on the prepared graph across decisions (the same few sets recur); a
        # calibrated copy shares its base's (SCALE_FREE carries it when the base had one already)
        masks = self.P.__dict__.get("_planning_masks")
        if masks is None:
            src = costs.scaled_from()
            holder = prepare(src[0]) if src is not None else self.P
            masks = self.P.__dict__["_planning_masks"] = holder.__dict__.setdefault("_planning_masks", {})
        self._masks: dict = masks
        if len(self._masks) > 1024:
            self._masks.clear()

    def mask(self, ops: frozenset[str]) -> int:
        got = self._masks.get(ops)
        if got is None:
            got = self._masks[ops] = self.P.mask_of(ops)
        return got

    def names(self, mask: int) -> frozenset[str]:
        got = self._masks.get(mask)
        if got is None:
            got = self._masks[mask] = self.P.names_of(mask)
            self._masks.setdefault(got, mask)
        return got

    def __call__(self, ops: frozenset[str], mode: str = "cold"):
        key = (ops, mode)
        got = self._memo.get(key)
        if got is None:
            if self.table is not None:
                cpu = self.ue_cpu
                got = self.table.predict(self.P, self.mask(ops), self.r, mode, self.state,
                                         0.0 if cpu is None else cpu.send_ms_per_byte,
                                         True if cpu is None else cpu.shared, order=False, plain=False,
                                         shared_evals=self.evals)
            else:
                got = simulate_cpu(self.costs, self.link, ops, self.ue_cpu, mode=mode, state=self.state,
                                   share=self.share)
            self._memo[key] = got
        return got

    def server_ms(self, ops: frozenset[str]) -> float:
        """Server time (ms, full share) of the ops ``ops``: the compiled partition's total (its server time
        from need position 0) when the policy uses the online table, else the sum over the ops."""
        if self.table is not None and ops:
            cp = self.table._compiled(self.P, self.mask(ops))
            return cp.csuf[0] * self.table.scales(self.P)[1] if cp.csuf else 0.0
        c, idx = self.P.c, self.costs.index
        return sum(c[idx[n]] for n in ops)

    def with_state(self, ops: frozenset[str], state: ServerState, mode: str = "cold", groups: tuple | None = None):
        """Like calling it, with the server holding ``state`` instead of this scorer's (not memoised). ``groups``
        (with the table only): the weight groups' bytes in that state, when the caller has them
        (``partitioner.online.PrefixSent``: ``state`` is then not read)."""
        cpu = self.ue_cpu
        if self.table is not None:
            return self.table.predict(self.P, self.mask(ops), self.r, mode, state,
                                      0.0 if cpu is None else cpu.send_ms_per_byte,
                                      True if cpu is None else cpu.shared, order=False, plain=False,
                                      groups=groups)
        return simulate_cpu(self.costs, self.link, ops, cpu, mode=mode, state=state, share=self.share)

    def uncorrected(self, ops: frozenset[str]) -> float:
        """Cold latency of ``ops`` on the effective uplink with sending free of compute (``CpuSim.sim_ms``)."""
        if self.table is None:
            return self(ops).sim_ms
        cpu = self.ue_cpu
        return self.table.predict(self.P, self.mask(ops), self.r, "cold", self.state,
                                  0.0 if cpu is None else cpu.send_ms_per_byte, False, order=False).latency_ms

    def std(self, ops: frozenset[str], uplink_cv: float = 0.0, ue_cv: float = 0.0, fixed_ms: float = 0.0,
            transport_sd_ms: float = 0.0) -> float:
        """:func:`moments` of ``ops`` (cold, at the profile's frequency) from numbers this scorer already has:
        :meth:`partitioner.robust.Spread.std_parts` (the formula of ``latency_moments``) with the bytes the
        partition sends taken from its scored prediction (they do not depend on the rates) instead of a
        second simulation, and the graph's ``Spread`` built once. The same number (tested against
        ``moments``)."""
        P = self.P
        spread = P.__dict__.get("_planning_spread")
        if spread is None:
            src = P.graph.scaled_from()
            if src is not None:  # a calibrated copy: its base's spread, scaled (the base's built once)
                bp = prepare(src[0])
                base = bp.__dict__.get("_planning_spread")
                if base is None:
                    base = bp.__dict__["_planning_spread"] = Spread(bp)
                spread = base.scaled(src[1], src[2])
            else:
                spread = Spread(P)
            P.__dict__["_planning_spread"] = spread
        smask = self.mask(ops)
        sent = 0
        if smask:
            res = self(ops)
            sent = res.upload_bytes + res.sent_tensor_bytes
        cpu = self.ue_cpu
        s = cpu.send_ms_per_byte if cpu is not None and cpu.send_ms_per_byte > 0 else 0.0
        return spread.std_parts(smask, sent, self.r, send_ms_per_byte=s, uplink_cv=uplink_cv, ue_cv=ue_cv,
                                fixed_ms=fixed_ms, transport_sd_ms=transport_sd_ms)[0]

    def order(self, ops: frozenset[str]) -> tuple[str, ...]:
        """The cold upload order of ``ops`` (need order of what the server lacks); computed only for the
        partitions a plan keeps, not for every one the decision scores."""
        if not ops:
            return ()
        if self.table is not None:
            return self.table._compiled(self.P, self.mask(ops)).need_order(self.state, "cold")
        return tuple(self(ops).upload_order)

    def weight_order(self, ops: frozenset[str]) -> tuple[str, ...]:
        """:meth:`order` without the tensor sources (the weights alone): what a background stream sends. The
        need order also names the cut tensors a request would send (the model's input ``x`` when the first op
        is on the server), which are no weights: a background list holding one made the uploader look up a
        weight ``'x'`` (``KeyError`` in ``UploadScheduler.schedule``; session 13's concurrent-clients test)."""
        weights = self.costs.weights
        return tuple(w for w in self.order(ops) if w in weights)


def online_table(costs: CostGraph) -> _online.OnlineTable:
    """The partitioner's offline step for this model and device pair (:func:`partitioner.online.precompute`):
    from memory, else from the profile cache's ``online/`` folder (stored beside the profiles, so a run with
    a cached profile finds it too), else computed now and stored there."""
    got = _online.cached(costs)
    if got is not None:
        return got
    from profiler.cache import cache_dir

    key = _online.table_key(costs)
    path = cache_dir() / "online" / f"{key}.json"
    got = None
    try:
        got = _online.from_json(costs, path.read_text()) if path.exists() else None
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
    if got is not None:
        return got
    got = _online.precompute(costs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(_online.to_json(got))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs the next run the precompute, nothing else
        log.warning("cannot store the online table in %s: %s", path, e)
    return got


def _scorer(costs: CostGraph, link: Link, ue_cpu: UeCpu | None, state: ServerState | None, share: Shares | None,
            use_table: bool | str) -> _Score:
    return _Score(costs, link, ue_cpu, state, share, use_table)


def _all_held(cp, held: frozenset[str], state: ServerState | None = None) -> bool:
    """Every weight of compiled partition ``cp`` is in ``held``; remembered on ``cp`` for the last ``held`` set
    (by identity: the runtime's held set is one frozenset until something is acknowledged). ``state``: the state
    ``held`` is of, whose ``lacking`` then answers (session 34)."""
    memo = cp.__dict__.get("_planning_held")
    if memo is not None and memo[0] is held:
        return memo[1]
    ws = cp.__dict__.get("_planning_wset")
    if ws is None:  # its weights as one set, made once per compiled partition: a C-level subset test per held set
        ws = cp.__dict__["_planning_wset"] = frozenset(w for _, group, _ in cp.groups for w in group)
    got = not state.lacking(ws, cp.__dict__.get("_within")) if state is not None else ws <= held
    cp.__dict__["_planning_held"] = (held, got)
    return got


def target_held(costs: CostGraph, target: frozenset[str], state: ServerState) -> bool:
    """Every weight the ops of ``target`` read is on the server (an empty target holds trivially)."""
    if not target:
        return True
    held = state.held
    return all(w in held for op in costs.ops if op.name in target for w in op.weights)


def target_weights(costs: CostGraph, target: frozenset[str]) -> frozenset[str]:
    """The weights the ops of ``target`` read (``target_held`` is: these within ``state.held``)."""
    return frozenset(w for op in costs.ops if op.name in target for w in op.weights)


def _held_plan(costs: CostGraph, link: Link, target: frozenset[str], state: ServerState, share: Shares | None):
    from partitioner.plan import Plan

    res = simulate(costs, link, target, mode="cold", state=state, share=share, timeline=False)
    return Plan(policy="mjoa", server_ops=target, predicted_ms=res.latency_ms, cold_ms=res.latency_ms,
                warm_ms=res.latency_ms, decision_ms=0.0, upload_bytes=res.upload_bytes,
                sent_tensor_bytes=res.sent_tensor_bytes, upload_order=tuple(res.upload_order), warm_target=target,
                reason="warm target held", details={"warm_target_held": True})


def _invest_best(score, targets: list[frozenset[str]], now_ms: float, horizon: int | None, lost_ms: float,
                 margin: float, details: dict[str, Any]) -> tuple[bool, str, frozenset[str]]:
    """The candidate target whose investment pays best: (invest?, why, target). With a horizon the
    lowest total latency over it; rent-or-buy, the best warm latency among the investments already paid
    for. ``details`` describe the chosen target (the first candidate, the warm optimum, if none pays)."""
    results = []
    paid = math.inf  # the least horizon total of a paying target so far
    stay = (1 - margin) * horizon * now_ms if horizon is not None else math.inf
    for t in targets:
        if results and horizon is not None and _invest_cannot_win(score, t, now_ms, horizon, min(stay, paid)):
            continue  # it would neither pay nor beat a paying one: its evaluations decide nothing
        det: dict[str, Any] = {}
        ok, why = _invest(score, t, now_ms, horizon, lost_ms, margin, det, full=not results)
        merit = det.get("horizon_invest_ms", det.get("target_warm_ms", 0.0))
        results.append((ok, merit, why, t, det))
        if ok:
            paid = min(paid, merit)
    paying = [r for r in results if r[0]]
    ok, _, why, t, det = min(paying, key=lambda r: r[1]) if paying else results[0]
    details.update(det, investment_candidates=len(targets))
    return ok, why, t


PRUNE = True
"""Skip a strategy's search when a bound from per-op prefix / suffix sums shows it cannot beat what the decision
already has (session 29c): a tail's investment in :func:`_invest_best` (:func:`_invest_cannot_win`, before its
partition is compiled or evaluated), the whole walk of :func:`_gradual_best` (:func:`_gradual_bound`), and the
prefetch candidates of :func:`_prefetch_best` whose bound is not below the margin's bar (before, the first was
evaluated whatever its bound). The same answers as the unpruned searches (False; tests/test_strategy_bounds.py
compares the two)."""

_SAFE = 1.0 - 1e-9
"""A bound is lowered by this factor before it is compared: its sums are added in another order than the
evaluations' (float rounding), and the gradual walk rounds its bytes up to the whole stream within 1e-12."""


class _SuffixBounds:
    """Lower bounds of the scorer's predictions of suffix splits (server = ops k..n-1) from sums over the op order,
    no compiled partition: warm (and cold) latency >= the UE's finish ``su x fin[k]`` and >= the server's time of
    the suffix + a round trip (``partitioner.online.evaluate`` / ``evaluate_shared``: the latency is at least the
    UE's finish and at least the server's start + its time + 2L + results over the downlink, and the UE's ops run
    one after another, no faster when sending shares their CPU); cold also >= the suffix's missing weight bytes at
    the CPU-capped uplink ``min(R, 1 / s)`` + 2L (no sender is faster, shared or not: the bound of
    ``OnlineTable.prefetch_bounds``). Only with the online table (the scorer's compiled predictions)."""

    def __init__(self, score) -> None:
        table = score.table
        P = score.P
        self.base = base = table.__dict__.get("_base_P") or P
        self.n = base.n
        self.fin, self.csum = _online.suffix_sums(base)
        self.su, ss = table.scales(P)
        r = score.r
        self.sphi = ss / r.phi
        self.L2 = 2 * r.L
        cpu = score.ue_cpu
        s = 0.0 if cpu is None else cpu.send_ms_per_byte
        self.up = min(r.up, 1.0 / s) if s > 0 else r.up
        self.score = score
        self._left: list[float] | None = None

    def suffix_k(self, ops: frozenset[str]) -> int | None:
        """k when ``ops`` is ops k..n-1 of the op order (k < n), else None."""
        mask = self.score.mask(ops)
        n = self.n
        k = n - mask.bit_count()
        return k if k < n and mask == ((1 << n) - 1) & ~((1 << k) - 1) else None

    def warm(self, k: int) -> float:
        """A lower bound of the warm (or cold) latency of suffix split k."""
        a = self.su * self.fin[k]
        b = self.csum[k] * self.sphi + self.L2
        return a if a > b else b

    def cold_weights(self, k: int) -> float:
        """A lower bound of the cold latency of suffix split k from its missing weight bytes."""
        left = self._left
        if left is None:
            left = self._left = self._missing()
        if type(left) is tuple:  # (the sparse form: positions in ``rev`` of what the server lacks, sums before each)
            pos, before, upto = left
            return before[bisect.bisect_left(pos, upto[k])] / self.up + self.L2
        return left[k] / self.up + self.L2

    def _missing(self) -> list[float] | tuple:
        """Bytes the server lacks of the weights read by ops k..n-1, for every k (each weight once); or, with weights
        held or in flight and every count a whole number (``partitioner.online._missing_left``), the same sums in a
        sparse form: (ascending positions in the weights' last-op-first order of those the server lacks, the sum of
        their bytes before each position and in all, the position bound of each k): sums of whole numbers, the same
        floats in any order (session 34: a pass over every weight was ~0.03 ms of a real client's search)."""
        table, base = self.score.table, self.base
        wb = table.weight_bytes
        pre = table.__dict__.get("_planning_suffix_w")
        if pre is None or pre[0] is not wb:
            rev: list[str] = []
            seen: set[str] = set()
            upto = [0] * (self.n + 1)
            for k in range(self.n - 1, -1, -1):
                for w in base.op_weights[k]:
                    if w not in seen:
                        seen.add(w)
                        rev.append(w)
                upto[k] = len(rev)
            pre = table.__dict__["_planning_suffix_w"] = (wb, rev, upto, {"pos": {w: i for i, w in enumerate(rev)}})
        _, rev, upto, memo = pre
        st = self.score.state
        if st is not None and (st.held or st.in_flight) and _online.SPARSE:
            miss = _online._missing_left(wb, st)
            if miss is not None:
                where = memo.get("pos")
                if where is None:
                    where = memo["pos"] = {w: i for i, w in enumerate(rev)}
                items = sorted((where[w], b) for w, b in miss.items() if w in where)
                before = [0.0]
                acc = 0.0
                for _, b in items:
                    acc += b
                    before.append(acc)
                return [i for i, _ in items], before, upto
        key = None if st is None or not (st.held or st.in_flight) else (st.held, tuple(sorted(
            st.in_flight.items())))
        got = memo.get(key)
        if got is None:
            if key is None:
                left = [float(wb[w]) for w in rev]
            else:
                held, infl = st.held, st.in_flight
                left = [0.0 if w in held else float(infl.get(w, wb[w])) for w in rev]
            cum = [0.0] * (len(rev) + 1)
            acc = 0.0
            for i, b in enumerate(left):
                acc += b
                cum[i + 1] = acc
            got = [cum[u] for u in upto]
            if len(memo) > 16:
                memo.clear()
            memo[key] = got
        return got


def _suffix_bounds(score) -> _SuffixBounds:
    got = score.__dict__.get("_suffix_lb")
    if got is None:
        got = score.__dict__["_suffix_lb"] = _SuffixBounds(score)
    return got


def _gradual_bound(score, front: list[tuple[float, int, float]], W: float, ell: float, s: float, x_max: float,
                   both: float, up_wait: float, warm_t: float, horizon: int) -> float:
    """A lower bound of every total :func:`_gradual_best` weighs (its front's first entry needs bytes up first, so
    its first request runs locally and sends ``x0 = min(W, x_max)``, ``lat0 = ell + s x0``, whatever the walk).
    Each later request before the switch takes at least ``mu1`` (request 1: local, >= ell, or a split whose bytes
    are up by then, >= its :class:`_SuffixBounds` warm bound) or ``mu2`` (any split whose bytes are up before the
    last byte) and sends at most its latency x max(both, up_wait) bytes (a local run sends x <= both (ell + s x),
    a held split only while the UE waits); the cold request at a switch is >= the warm target and >= its bytes
    left at ``up_wait`` + 2L (the walk's own bound, ``lb_at``); the requests after it are warm. So a switch at m
    totals >= lat0 + max(P(m-1) + warm, U + 2L) + (h-m-1) warm, a walk whose last byte is up before request i
    >= lat0 + max(P(i-1), U) + (h-i) warm, one that never gets there >= lat0 + P(h-1), with P(q) the least q
    requests after the first and U the bytes left after it at the faster rate."""
    sb = _suffix_bounds(score)
    x0 = min(W, x_max)
    lat0 = ell + s * x0
    mu1 = mu2 = ell
    for b, k, t in front:
        if t < ell and b < W:
            w = sb.warm(k)
            if w < mu2:
                mu2 = w
            if b <= x0 and w < mu1:
                mu1 = w
    U = max(0.0, W - x0) / max(both, up_wait)
    L2 = 2 * score.r.L
    h = horizon

    def P(q: int) -> float:
        return 0.0 if q <= 0 else mu1 + (q - 1) * mu2

    lb = lat0 + P(h - 1)
    for m in range(1, h):
        v = lat0 + max(P(m - 1) + warm_t, U + L2) + (h - m - 1) * warm_t
        if v < lb:
            lb = v
    for i in range(1, h + 1):
        v = lat0 + max(P(i - 1), U) + (h - i) * warm_t
        if v < lb:
            lb = v
    return lb


def _invest_cannot_win(score, t: frozenset[str], now_ms: float, horizon: int, limit: float) -> bool:
    """Whether investing in target ``t`` (not the first candidate of :func:`_invest_best`) over ``horizon``
    requests totals at least ``limit`` ms for sure, so that its cold evaluation can be skipped: ``limit`` is the
    least of the margin's bar (``(1 - margin) x horizon x now_ms``: not below it, it does not pay) and the least
    total of a paying target found before it (not below it, ``min`` keeps the earlier one). The cold request is
    bounded from below by :meth:`partitioner.online.OnlineTable.prefetch_bounds` at zero bytes prefetched (the
    UE's finish; each sent tensor alone on the uplink; the missing weights back to back at the CPU-capped
    rate), valid shared or not (``tests/test_prefetch_decision.py``); the warm requests are the scorer's own.
    False when there is no table or the target is not faster warm (``_invest`` then skips the cold evaluation
    itself). Session 19: in a real client, ``auto``'s search after its last prefetch spent ~0.3 ms of its
    1.3-2 ms in ``_invest_best``, two evaluations per tail."""
    table = score.table
    if table is None:
        return False
    if PRUNE:
        sb = _suffix_bounds(score)
        k = sb.suffix_k(t)
        if k is not None:  # a suffix of the op order (the tails are): bounds from sums, nothing compiled
            w = sb.warm(k)
            if (max(w, sb.cold_weights(k)) + (horizon - 1) * w) * _SAFE >= limit:
                return True
    warm_t = score(t, "warm").latency_ms
    if now_ms - warm_t <= 0:
        return False
    cpu = score.ue_cpu
    s = 0.0 if cpu is None else cpu.send_ms_per_byte
    lb = float(table.prefetch_bounds(score.P, score.mask(t), score.r, score.state, s, (0.0,))[0])
    return lb + (horizon - 1) * warm_t >= limit


def prefetched_state(state: ServerState | None, sizes: list[tuple[str, int]], sent: float) -> ServerState:
    """``state`` after ``sent`` bytes of the (weight, bytes left) list ``sizes`` went up in order: the weights
    covered are held, the one cut mid-way is in flight with its bytes left."""
    st = state if state is not None else ServerState()
    held, infl, acc = set(), dict(st.in_flight), 0.0
    for w, b in sizes:
        if acc + b <= sent:
            held.add(w)
        elif acc < sent:
            infl[w] = math.ceil(acc + b - sent)
        acc += b
    return st.with_held(held) if not infl else ServerState(held=st.held | held, in_flight={
        k: v for k, v in infl.items() if k not in held})


PREFIX_SENT = True
"""Evaluate the target cold after X bytes went up ahead from ``partitioner.online.PrefixSent`` (the groups' bytes
left, straight from the list and X) instead of building ``prefetched_state`` and its vectors per evaluation, and
keep the prefetch search's need order, bytes left and total per target when nothing is held (:func:`_prefetch_prep`;
the search made while connecting fills it). Session 30; False: the old path, for the tests that compare the two."""


def _prefetch_prep(score, t: frozenset[str]) -> tuple[tuple[str, ...], list[tuple[str, int]], float,
                                                       _online.PrefixSent | _online.StateSent | None]:
    """(weight order, (weight, bytes left) in it, their total, :class:`partitioner.online.PrefixSent` of the
    list or None without the table) of target ``t`` for :func:`_prefetch_best`: the target's weights the server
    lacks in need order. None of it depends on the link, the shares or the UE's speed, only on the target and
    what the server holds: with nothing held it is kept per target on the table (the same tuple for every
    search; the search made while connecting builds it)."""
    state = score.state
    table = score.table
    empty = state is None or not (state.held or state.in_flight)
    weights = score.costs.weights
    memo = table.__dict__.setdefault("_prefetch_prep", {}) if table is not None and empty and PREFIX_SENT else None
    mask = score.mask(t)
    if memo is not None:
        got = memo.get(mask)
        if got is not None and got[0] is weights:
            return got[1]
    order = score.weight_order(t)
    st = state if state is not None else ServerState()
    held, infl = st.held, st.in_flight  # (``ServerState.remaining_bytes``, inline: one pass)
    sizes = [(w, 0 if w in held else int(infl.get(w, weights[w]))) for w in order]
    W = float(sum(b for _, b in sizes))
    ps = (_online.prefix_sent(table._compiled(score.P, mask), state, table.weight_bytes, sizes)
          if table is not None and PREFIX_SENT and W > 0 else None)
    got = (order, sizes, W, ps)
    if memo is not None:
        if len(memo) > 16:
            memo.clear()
        memo[mask] = (weights, got)
    return got


PREFETCH_TAILS = 3
"""Tails of the target's need order ``_prefetch_best`` may leave for the first remote request (whole weights, at
most one warm request's worth of the uplink), besides sending everything the local requests can carry."""


def _tail_cuts(sizes: list[tuple[str, int]], cap: float) -> list[float]:
    """Bytes ``y`` of the last weights of ``sizes`` ((weight, bytes left), need order) at weight boundaries with
    ``0 < y <= cap``, ascending: each at least 1.25x the one before (of a run of small weights, a batch norm's
    few kB, only the first boundary: leaving more of the order's earlier-needed weights delays the server
    more), at most ``PREFETCH_TAILS`` of them, the largest."""
    cuts: list[float] = []
    y = 0.0
    for _, b in reversed(sizes):
        if b <= 0:
            continue
        y += b
        if y > cap:
            break
        if not cuts or y >= 1.25 * cuts[-1]:
            cuts.append(y)
    return cuts[-PREFETCH_TAILS:] if PREFETCH_TAILS > 0 else []


def _prefetch_cannot_beat(score, targets: list[frozenset[str]], now_ms: float, horizon: int, limit: float) -> bool:
    """Whether every strategy :func:`_prefetch_best` weighs for its one target totals at least ``limit`` (ms: what
    investing now totals, ``choose``'s ``inv_ms``) for sure, so that it decides nothing there (``choose`` takes a
    prefetch only below investing now, and the gradual search's limit is the same with it). Each strategy runs m >= 1
    requests locally (each >= the local time ``ell``, sending only slows it), then the target cold (>= its warm
    latency: weights only delay it, the bound ``_gradual_bound`` uses too), then h - m - 1 warm requests: >= m ell +
    (h - m) warm, least at m = 1 since warm < now <= ell (``_prefetch_best`` skips a target not faster warm than this
    request, and this request's guarded prediction is at most local). Session 34: in a real client's search that
    invests (resnet18's request 2: the target's weights held but five in flight), the prefetch search was ~0.15 ms of
    its 1.2 ms, for a plan one local request behind investing now."""
    if not PRUNE or not targets or limit == math.inf:
        return False
    warm_t = score(targets[0], "warm").latency_ms
    if warm_t >= now_ms:  # (``_prefetch_best`` skips it at once)
        return False
    return (score.local_ms + (horizon - 1) * warm_t) * _SAFE >= limit


def _target_left(score, t: frozenset[str]) -> float:
    """:func:`_prefetch_prep`'s W of target ``t`` (the bytes left of its weights the server lacks, each in flight
    counted as ``int`` of its bytes left, those with none left out) from what the state lacks of its weights
    (``ServerState.lacking``): whole numbers, the same sum in any order."""
    cp = score.table._compiled(score.P, score.mask(t))
    state = score.state
    infl, weights = state.in_flight, score.costs.weights
    lack = state.lacking(_online._weight_set(cp), cp.__dict__.get("_within"))
    return float(sum(int(infl[w] if w in infl else weights[w]) for w in lack if infl.get(w, 1) > 0))


def _prefetch_bound(score, W: float, warm_t: float, horizon: int) -> float:
    """A lower bound of every total :func:`_prefetch_best` weighs for a target with ``W`` bytes left and warm
    latency ``warm_t`` (its ``limit``'s bound): ell + (h - 2) warm + the least over X in [0, W] of
    s X + max(warm, (W - X) / u + 2L), u = min(R, 1 / s) (s <= 1 / u, so that least is where the two terms of the
    max meet, or at an end)."""
    s = score.ue_cpu.send_ms_per_byte
    u = min(score.r.up, 1.0 / s)
    L2 = 2 * score.r.L
    if warm_t <= L2:
        least = s * W + L2
    else:
        X = W - u * (warm_t - L2)
        least = warm_t if X <= 0 else s * X + warm_t
    return score.local_ms + (horizon - 2) * warm_t + least


def _prefetch_best(score, targets: list[frozenset[str]], now_ms: float, horizon: int,
                   margin: float, limit: float = math.inf) -> dict[str, Any] | None:
    """The best "local first, the target's weights up in the background meanwhile, then remote" strategy
    over the ``horizon`` requests left (this one included), when it beats never investing by the investment
    margin (as ``_invest``): None otherwise.

    For each candidate target and m = 1 .. horizon - 1 requests run locally while the target's missing
    weights go up in need order (the sender at ``partitioner.uecpu``'s processor-sharing rate,
    ``min(R, SEND_SHARE / s)`` bytes/ms, the compute slowed by the CPU the sending takes: a local run of
    l ms that sends x bytes takes l + s x), request m + 1 is cold on the target with what is then held
    (the simulator's prediction, ``_Score.with_state``), the rest warm. The bytes sent ahead, X, are either
    all the m local runs carry (``min(W, m x_max)``) or, the stream bound's other kink
    (``partitioner.streambound``: the first remote request sends what it can hide behind the server's work),
    everything but a tail of the need order (``_tail_cuts``: whole weights, at most one warm request's time at
    the uplink) that the cold request sends itself, with the fewest local requests that carry X; the runtime
    then sends only ``background`` (the order up to X). Session 19's full grid: resnet18 and mobilenet_v2 at
    10 % / 400 Mbit/s, the bound left 2.3 and 2.8 MB for the first remote request; a plan that sent the whole
    target ahead could not. The same strategy space as ``partitioner.streambound`` (whose bound it approaches
    from above; the bound's X may cut a weight), with this UE's predictions. Returns the least total's
    ``total_ms``, ``now_ms`` (this request, local with its share of the upload), ``bytes`` sent during it,
    ``requests`` (m), ``target``, ``tail_bytes`` (W - X) and ``background`` (the target's weights up to X,
    need order); ties go to the first target, the fewest local requests, sending all they carry ahead, and
    the least tail.

    With the online table, the candidates are evaluated in the order of a lower bound of their totals (the
    cold request's from ``OnlineTable.prefetch_bounds``: the weights left back to back at the CPU-capped uplink
    rate), stopping once the bound exceeds the best total found: the same answer as evaluating every candidate
    (branch and bound with a valid bound; tests/test_prefetch_decision.py compares the two), in a few
    evaluations where the upload decides the cold request (googlenet, UE 10x, 20 Mbit/s, horizon 100: 1 instead
    of 24).

    ``limit`` (ms; ``choose`` gives what investing now totals): a strategy not below it decides nothing there, so
    a target whose every strategy totals at least it for sure is skipped, and the evaluations stop at it too (the
    answer below ``limit`` is the same; at or above it, None or another one at or above it). The bound: m >= 1 local
    requests take m ell + s X with X bytes sent ahead, the cold request at least the warm one and at least the
    W - X bytes left at the fastest send rate min(R, 1 / s) plus a round trip (every weight of the target is on
    its uplink), the h - m - 1 after it warm; least at m = 1 (warm < now <= ell) and at the X where those two
    meet (session 34: resnet18's request 2 in a real client, the target's weights held but 21 MB in flight,
    bounded its prefetch at 712 ms against 709 investing now; it took ~0.13 ms of a 1.1 ms decision)."""
    cpu = score.ue_cpu
    s = cpu.send_ms_per_byte
    R = score.r.up
    both = min(R, SEND_SHARE / s)
    ell = score.local_ms
    x_max = both * ell / (1.0 - both * s)
    state = score.state if score.state is not None else ServerState()
    stay = horizon * now_ms
    bar = (1 - margin) * stay  # a total not below it is not taken (the last check)
    table = score.table
    best = None
    best_key: tuple = (math.inf, 0, 0, 0.0)
    for ti, t in enumerate(targets):
        warm_t = score(t, "warm").latency_ms
        if warm_t >= now_ms:
            continue
        if PRUNE and limit < math.inf and score.table is not None and state.held:  # (W from what the state lacks,
            # without the preparation: the same sum of whole numbers)
            W = _target_left(score, t)
            if W <= 0 or _prefetch_bound(score, W, warm_t, horizon) * _SAFE >= limit:
                continue
        order, sizes, W, ps = _prefetch_prep(score, t)
        if W <= 0:
            continue
        if PRUNE and limit < math.inf and _prefetch_bound(score, W, warm_t, horizon) * _SAFE >= limit:
            continue
        # every m's prefetched bytes and local time (the same arithmetic whatever is evaluated)
        pres, sents = [], []
        pre = sent = 0.0
        for _ in range(1, horizon):
            x = min(W - sent, x_max)
            pre += ell + s * x
            sent += x
            pres.append(pre)
            sents.append(sent)
            if sent >= W:
                break
        # (m, X, the local requests' total): all they carry, or all but a tail, on the fewest that carry it
        cands = [(m, sents[m - 1], pres[m - 1], False) for m in range(1, len(pres) + 1)]
        for y in _tail_cuts(sizes, warm_t * min(R, 1.0 / s)):
            X = W - y
            for m in range(1, len(pres) + 1):
                if sents[m - 1] >= X:
                    if (sents[m - 2] if m > 1 else 0.0) < X < sents[m - 1]:
                        cands.append((m, X, pres[m - 1] - s * (sents[m - 1] - X), True))
                    break
        if table is not None:  # exact evaluations in the order of a lower bound, until it reaches the best
            lbs = table.prefetch_bounds(score.P, score.mask(t), score.r, score.state, s,
                                        [c[1] for c in cands]).tolist()
            todo = sorted((c[2] + lb + (horizon - c[0] - 1) * warm_t, i) for i, (c, lb) in enumerate(zip(cands, lbs)))
        else:
            todo = [(-math.inf, i) for i in range(len(cands))]
        cut = min(bar, limit)
        for lb, i in todo:
            if lb > best_key[0] or (PRUNE and lb >= cut):  # (not below the margin's bar: it is not taken)
                break
            m, X, p, tail = cands[i]
            cold = (score.with_state(t, state, groups=ps.at(X)) if ps is not None
                    else score.with_state(t, prefetched_state(state, sizes, X))).latency_ms
            total = p + cold + (horizon - m - 1) * warm_t
            key = (total, ti, m, W - X if tail else 0.0)  # ties: the first target, the fewest local requests,
            # everything they carry ahead, the least tail
            if key < best_key:
                best_key = key
                bg = order
                if tail:  # the runtime sends the order up to X (the tail ends at a weight boundary)
                    acc, n = 0.0, 0
                    for _, b in sizes:
                        if acc + b > X + 0.5:
                            break
                        acc += b
                        n += 1
                    bg = tuple(order[:n])
                first = min(X, x_max)
                best = {"total_ms": total, "now_ms": ell + s * first, "bytes": first, "requests": m,
                        "target": t, "background": bg, "tail_bytes": W - X if tail else 0.0}
    if best is None or not best["total_ms"] < bar:
        return None
    return best


GRADUAL_MARGIN = 0.05
"""``auto`` offloads gradually only when that predicts a stream total at least this much below prefetching and
investing now (it leans on more of the model than they do: background bytes while the UE waits, a request's
split re-chosen as bytes arrive); on the captured zoo at the testbed's cells its best win was 0.4 %."""

GRADUAL_SUFFIXES = 12
"""Intermediate splits :func:`_gradual_best` keeps per decision: the suffixes of the op order on the Pareto
front of (bytes still to upload, additive warm latency), thinned evenly when longer (the cheapest and the
best always kept)."""


def _gradual_front(score, tmask: int, r_plan: Rates, state: ServerState) -> tuple[list[tuple[str, int]],
                                                                                    list[tuple[float, int, float]]]:
    """The gradual upload order of the target ``tmask``'s missing weights, (weight, bytes left), from its last
    op back to its first (IONN's suffix pieces: a suffix of the op order runs on the server once its weights
    are all up), and the Pareto front of the intermediate splits it opens: (bytes of the order that must be up
    first, k, additive warm cost in ms) for the suffix splits k (server = ops k..n-1, all in the target, none
    pinned) that beat every later one by the additive warm cost (``partitioner.simulate.split_costs`` at
    ``r_plan``), at most ``GRADUAL_SUFFIXES`` (the cheapest, the best and evenly spaced ones between), bytes
    ascending. The order's structure is kept per target on the online table (or the prepared graph)."""
    P = score.P
    n = P.n
    holder = score.table.__dict__ if score.table is not None else P.__dict__
    memo = holder.setdefault("_gradual_orders", {})
    pre = memo.get(tmask)
    if pre is None:
        weights = score.costs.weights
        rev: list[tuple[str, int]] = []
        seen: set[str] = set()
        upto = [0] * (n + 1)  # upto[k]: entries of rev read by ops k..n-1
        stop = n  # the least k whose suffix is in the target, none pinned
        usable = True
        for k in range(n - 1, -1, -1):
            if tmask >> k & 1:
                for w in P.op_weights[k]:
                    if w not in seen:
                        seen.add(w)
                        rev.append((w, weights[w]))
            else:
                usable = False
            if P.pinned[k]:
                usable = False
            if usable:
                stop = k
            upto[k] = len(rev)
        if len(memo) > 16:
            memo.clear()
        pre = memo[tmask] = (rev, upto, stop)
        where = holder.setdefault("_gradual_pos", {})  # (the sparse pass's maps, made here: session 34)
        if len(where) > 16:
            where.clear()
        where[tmask] = (rev, {w: i for i, (w, _) in enumerate(rev)}, frozenset(w for w, _ in rev))
    rev, upto, stop = pre
    empty = not (state.held or state.in_flight)
    got = holder.setdefault("_gradual_empty", {}).get(tmask) if empty else None
    sparse = None
    if got is not None and got[0] is rev:  # nothing held: the same bytes left for every search (kept per target)
        _, cum, order = got
    elif not empty and _online.SPARSE:  # (session 34) only the weights the server lacks: their bytes (whole numbers,
        # ``int`` as below) summed in the order's positions, the same floats in any order; ``cum`` read where asked
        where = holder.setdefault("_gradual_pos", {}).get(tmask)
        if where is None or where[0] is not rev:
            where = holder["_gradual_pos"][tmask] = (rev, {w: i for i, (w, _) in enumerate(rev)},
                                                    frozenset(w for w, _ in rev))
        _, pos, names = where
        infl = state.in_flight
        items = sorted((pos[w], w, int(infl[w] if w in infl else rev[pos[w]][1]))
                       for w in state.lacking(names, None if score.table is None else
                                              _online.weight_names(score.table.weight_bytes)))
        order = [(w, b) for _, w, b in items if b > 0]
        sparse = ([i for i, _, _ in items], list(itertools.accumulate((b for _, _, b in items), initial=0.0)))
        cum = None
    else:
        if not empty:
            held, infl = state.held, state.in_flight  # (``ServerState.remaining_bytes``, inline: one pass)
            left = [0 if w in held else int(infl.get(w, b)) for w, b in rev]
        else:
            left = [b for _, b in rev]
        cum = [0.0] * (len(rev) + 1)
        acc = 0.0
        for i, b in enumerate(left):
            acc += b
            cum[i + 1] = acc
        order = [(w, b) for (w, _), b in zip(rev, left, strict=True) if b > 0]
        if empty:
            em = holder["_gradual_empty"]
            if len(em) > 16:
                em.clear()
            em[tmask] = (rev, cum, order)  # (read only: the walk and ``prefetched_state`` do not change them)
    T = score.table.split_ms(P, r_plan) if score.table is not None else split_costs(P, r_plan)
    kept = holder.get("_gradual_ks")  # (the front's splits depend on the split costs and the target only: kept for
    # the last ones, the bytes read per state; session 34)
    if kept is not None and kept[0] is T and kept[1] == tmask and kept[2] is upto:
        ks = kept[3]
    else:
        ks = []
        best = T[n]
        for k in range(n - 1, stop - 1, -1):
            if T[k] < best - 1e-9:
                best = T[k]
                ks.append(k)
        if len(ks) > GRADUAL_SUFFIXES:
            idx = {round(i * (len(ks) - 1) / (GRADUAL_SUFFIXES - 1)) for i in range(GRADUAL_SUFFIXES)}
            ks = [ks[i] for i in sorted(idx)]
        holder["_gradual_ks"] = (T, tmask, upto, ks)  # (keeps T alive: identity is reliable)
    if cum is not None:
        front = [(cum[upto[k]], k, T[k]) for k in ks]
    else:
        pos, before = sparse
        front = [(before[bisect.bisect_left(pos, upto[k])], k, T[k]) for k in ks]
    return order, front


def _gradual_best(score, target: frozenset[str], now_ms: float, horizon: int, margin: float,
                  r_plan: Rates, beat: float = math.inf, exhaustive: bool = False) -> dict[str, Any] | None:
    """IONN's gradual offloading in ``auto``'s space: the best "intermediate splits while the target's weights
    go up, last op first" strategy over the ``horizon`` requests left (this one included), when it beats never
    investing by the investment margin (as :func:`_prefetch_best`); None otherwise.

    The target's missing weights go up in :func:`_gradual_front`'s order (IONN, SoCC 2018: a suffix of the op
    order is usable once its weights are all up). A local request sends up to its share of the uplink,
    ``min(R, SEND_SHARE / s)`` bytes/ms, slowed to l + s x (as in :func:`_prefetch_best`); a request on an
    intermediate split already held (its warm latency by ``score``, the runtime's ruler) sends background
    weights only while the UE waits for the server (``min(R, 1 / s)`` bytes/ms over its latency after the UE's
    finish, less its cut tensors: the runtime parks the background while the UE computes), so it buys its
    lower latency with a slower upload. The strategies weighed: for each entry f of the front whose split is
    faster than local (and f = -1), requests run locally until the bytes of entry f are up, then each runs the
    faster of local and the best split held (the front's last entry whose bytes are up); at any request
    m >= 1 the stream may switch to the target, cold with what is then held (``_Score.with_state``), warm
    after; or it never switches and the last weights arrive in the background (then the target runs warm).
    Returns the least total's ``total_ms``, ``requests`` (m, or the requests until the target is held),
    ``split_k`` (this request's split: ops k.. on the server; n: local), ``now_ms`` (this request's latency),
    ``bytes`` (sent during it), ``target`` and ``background`` (the order's weights); ties: the fewest local
    requests first (f ascending), then the earliest switch.

    A walk advances by runs of identical requests (the same split and bytes until the next front entry, the
    goal or the target's last byte is up). The switch points are evaluated in the order of a lower bound of
    their totals (the cold request is no faster than the warm target, nor than its weights left at
    ``min(R, 1 / s)`` plus a round trip; a run's points share the least bound of the run until it is taken
    apart), stopping once the bound exceeds the best total found or reaches ``beat`` (ms: the caller's best
    other strategy; a total not below it is not taken): the same answer as evaluating every one
    (``exhaustive=True``; tests/test_gradual.py compares the two)."""
    cpu = score.ue_cpu
    s = cpu.send_ms_per_byte
    R = score.r.up
    both = min(R, SEND_SHARE / s)
    up_wait = min(R, 1.0 / s)
    ell = score.local_ms
    x_max = both * ell / (1.0 - both * s)
    state = score.state if score.state is not None else ServerState()
    warm_t = score(target, "warm").latency_ms
    if warm_t >= now_ms:
        return None
    P = score.P
    n = P.n
    order, front = _gradual_front(score, score.mask(target), r_plan, state)
    holder = score.table.__dict__ if score.table is not None else P.__dict__
    kept = holder.get("_gradual_W")
    if kept is not None and kept[0] is order:  # nothing held: the same list every search (``_gradual_front``)
        W = kept[1]
    else:
        W = float(sum(b for _, b in order))
        holder["_gradual_W"] = (order, W)  # (keeps the list alive: identity is reliable)
    if W <= 0 or not front:
        return None
    if (PRUNE and not exhaustive and score.table is not None and front[0][0] > 0
            and _gradual_bound(score, front, W, ell, s, x_max, both, up_wait, warm_t, horizon) * _SAFE
            >= min(beat, (1 - margin) * horizon * now_ms)):
        return None  # no walk can total below the limit: the walk would return None
    full = (1 << n) - 1
    held_memo: dict[int, tuple[float, float, int]] = {}

    def held(fi: int) -> tuple[float, float, int]:
        """Front entry ``fi``'s split: (warm latency, background bytes while the UE waits, k)."""
        got = held_memo.get(fi)
        if got is None:
            kk = front[fi][1]
            ev = score(score.names(full & ~((1 << kk) - 1)), "warm")
            got = held_memo[fi] = (ev.latency_ms, max(0.0, up_wait * (ev.latency_ms - ev.ue_finish_ms)
                                                      - ev.sent_tensor_bytes), kk)
        return got

    L2 = 2 * score.r.L

    def lb_at(i: int, pre: float, sent: float) -> float:
        return pre + max(warm_t, (W - sent) / up_wait + L2) + (horizon - i - 1) * warm_t

    runs: list[tuple[float, int, int, int, float, float, float, float, tuple]] = []
    # (least lower bound, f, first m, count, pre, sent, latency, bytes per request, this request's step)
    best = (math.inf, 0, 0, None)  # (total, f, m, this request's step)
    goals = [-1] + [f for f in range(len(front)) if front[f][2] < ell]  # the additive cost says it beats local
    for f in goals:
        goal = front[f][0] if f >= 0 else 0.0
        pre = sent = 0.0
        first = None
        fi = -1
        i = 0
        while i < horizon:
            if sent >= W:  # every weight up: the target runs warm from here
                total = pre + (horizon - i) * warm_t
                if (total, f, i) < best[:3]:
                    best = (total, f, i, first)
                break
            while fi + 1 < len(front) and front[fi + 1][0] <= sent:
                fi += 1
            x = min(W - sent, x_max)
            lat, k = ell + s * x, n
            if fi >= 0 and sent >= goal and front[fi][2] < ell and held(fi)[0] < lat:
                hl, hx, k = held(fi)
                lat, x = hl, min(W - sent, hx)
            if first is None:
                first = (k, lat, x)
            # requests like this one until the next front entry, the goal or the last byte is up
            q = horizon - i
            if x > 0 and not exhaustive:
                for t in (front[fi + 1][0] if fi + 1 < len(front) else W, goal if sent < goal else W):
                    q = min(q, max(1, math.ceil((t - sent) / x - 1e-9)))
                q = min(q, max(1, math.floor((W - sent) / x + 1e-9)))
            elif exhaustive:
                q = 1
            j0 = 1 if i == 0 else 0  # no switch at this request (investing now is weighed elsewhere)
            if q > j0:
                js = {j0, q - 1}
                if x > 0:
                    jk = (W - sent - (warm_t - L2) * up_wait) / x
                    js |= {min(q - 1, max(j0, math.floor(jk))), min(q - 1, max(j0, math.ceil(jk)))}
                lb = min(lb_at(i + j, pre + j * lat, sent + j * x) for j in js)
                runs.append((lb, f, i + j0, q - j0, pre + j0 * lat, sent + j0 * x, lat, x, first))
            pre += q * lat
            sent = min(W, sent + q * x) if sent + q * x >= W * (1 - 1e-12) else sent + q * x
            i += q
        else:
            if (pre, f, horizon) < best[:3]:
                best = (pre, f, horizon, first)
    heap = list(runs)
    heapq.heapify(heap)
    colds: dict[float, float] = {}  # walks share their first requests: one evaluation per bytes up
    ps = None
    limit = min(beat, (1 - margin) * horizon * now_ms)
    while heap:
        lb, f, m, cnt, pre_m, sent_m, lat, x, first = heapq.heappop(heap)
        if (lb > best[0] or lb >= limit) and not exhaustive:
            break
        if cnt > 1:  # take the run apart: each of its points with its own bound
            for j in range(cnt):
                p, sn = pre_m + j * lat, sent_m + j * x
                heapq.heappush(heap, (lb_at(m + j, p, sn), f, m + j, 1, p, sn, lat, x, first))
            continue
        cold = colds.get(sent_m)
        if cold is None:
            if ps is None and PREFIX_SENT and score.table is not None:  # once per walk, when a switch is weighed
                ps = _online.prefix_sent(score.table._compiled(P, score.mask(target)), score.state,
                                        score.table.weight_bytes, order)
            cold = colds[sent_m] = (score.with_state(target, state, groups=ps.at(sent_m)) if ps is not None else
                                    score.with_state(target, prefetched_state(state, order, sent_m))).latency_ms
        total = pre_m + cold + (horizon - m - 1) * warm_t
        if (total, f, m) < best[:3]:
            best = (total, f, m, first)
    total, _, m, first = best
    if first is None or not total < limit:
        return None
    return {"total_ms": total, "requests": m, "split_k": first[0], "now_ms": first[1], "bytes": first[2],
            "target": target, "background": tuple(w for w, _ in order)}


def _invest(score, target: frozenset[str], now_ms: float, horizon: int | None, lost_ms: float, margin: float,
            details: dict[str, Any], full: bool = True) -> tuple[bool, str]:
    """Whether uploading the warm target now pays (horizon rule, or rent-or-buy without a horizon).
    ``full``: fill ``details`` also when the warm target is no faster than this request (then the cold
    latency, the dearer evaluation, decides nothing and is skipped unless asked for)."""
    warm_t = score(target, "warm").latency_ms
    gain = now_ms - warm_t
    if gain <= 0 and not full:
        details.update(target_warm_ms=warm_t)
        return False, ""
    cold_t = score(target).latency_ms
    extra = cold_t - now_ms
    details.update(target_cold_ms=cold_t, target_warm_ms=warm_t, invest_extra_ms=extra)
    if gain <= 0:
        return False, ""
    if horizon is not None:
        with_inv = cold_t + (horizon - 1) * warm_t
        stay = horizon * now_ms
        details.update(horizon=horizon, horizon_invest_ms=with_inv, horizon_stay_ms=stay)
        ok = with_inv < (1 - margin) * stay
        return ok, (f"invest: {horizon} requests {with_inv:.0f} ms with the warm target's upload vs "
                    f"{stay:.0f} ms without")
    details.update(lost_ms=lost_ms)
    return lost_ms >= extra, f"invest (rent-or-buy): lost {lost_ms:.0f} ms >= upload's extra {extra:.0f} ms"


def predict(costs: CostGraph, link: Link, server_ops: frozenset[str], *, state: ServerState | None = None,
            share: Shares | None = None, mode: str = "cold", ue_cpu: UeCpu | None = None) -> float:
    """Simulated latency of one partition (used to re-score a plan after the link estimate moved)."""
    if ue_cpu is not None:
        return simulate_cpu(costs, link, server_ops, ue_cpu, mode=mode, state=state, share=share).latency_ms
    return simulate(costs, link, server_ops, mode=mode, state=state, share=share, timeline=False).latency_ms


def fixed(server_ops: frozenset[str], costs: CostGraph, link: Link, *, state: ServerState | None = None,
          share: Shares | None = None, ue_cpu: UeCpu | None = None) -> PlanChoice:
    """A partition the caller chose (e.g. from ``coinfer-ue plan``), scored like any plan."""
    t0 = time.perf_counter()
    server = frozenset(server_ops)
    cold = simulate_cpu(costs, link, server, ue_cpu, mode="cold", state=state, share=share)
    warm = predict(costs, link, server, state=state, share=share, mode="warm", ue_cpu=ue_cpu)
    serial = predict(costs, link, server, state=state, share=share, mode="serial", ue_cpu=ue_cpu)
    return PlanChoice(policy="fixed", server_ops=server, predicted_ms=cold.latency_ms, warm_ms=warm,
                      serial_ms=serial, upload_order=cold.upload_order,
                      decision_ms=(time.perf_counter() - t0) * 1e3,
                      local_ms=sum(op.ue_ms for op in costs.ops))
