"""The decision cache of one device client: plan a request, or reuse the last plan when nothing it
depends on changed, with drift detection on the continuous estimates.

Planning is CPU work, and on a CPU-throttled UE it spends the quota the request that follows needs.
A decision is keyed exactly on the discrete inputs (policy, fixed split, what the server holds,
whether uploads are in flight, the compute share) and compared with hysteresis on the continuous
ones (link, cost scales, send cost; ``drift``). ``auto``'s warm target is kept across decisions and
searched again only when the link drifted. Rent-or-buy bookkeeping (``lost_ms``: latency lost to not
being warm on the target) feeds ``auto``'s investment rule.

Owned by the caller's thread (see ``ue_client.client.RemoteEngine``), and by the background planner's worker
while its job holds the engine's lock (on a shallow copy: ``ue_client.background.speculate``). That copy is why
every piece of the cache's state stays an attribute here, rebound and never mutated: the rules it applies live in
``ue_client.drift`` (the re-plan thresholds) and ``ue_client.held_shortcut`` (the held target's answer without a
search), as functions of what this cache passes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from partitioner import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import planning
from ue_client.drift import estimate_drift, moved_scales, raw_drift, scale_detail, spread_moved
from ue_client.held_shortcut import held_follows, held_plan
from ue_client.trajectory import Trajectory


class DecisionCache:
    """Plans requests for one client (``decide``), reusing a decision while it cannot change."""

    def __init__(self, policy: str, *, fixed_server_ops: frozenset[str] | None, deadline_ms: float | None,
                 plan_budget_s: float, horizon: int | None, eps: float = 0.05, energy=None,
                 uplink_cv: float | None = None, held_shortcut: bool = True):
        self.policy = policy
        self.held_shortcut = held_shortcut
        """``auto``'s re-plans of a held warm target without a search (``held_answer``; session 15). False: every
        re-plan searches (kept to compare: ``tests/test_held_shortcut.py``)."""
        self.held_miss = ""
        """Why the last ``held_answer`` with its target held had no answer ('' when it had one, or was not asked
        with the target held): per candidate, what differed ('ue overhead', 'send cost', 'link', 'ue scale',
        'downlink', 'guard', 'upload left', 'not a held plan of this key'; 'no held plan': no candidate). A
        search it sends a request to names it in ``plan_why`` ('held answer: ...')."""
        self._held_ahead: tuple | None = None
        """(key, choice, planned with) of the decision ``auto`` will make once its warm target is held, made
        beside a full decision that planned towards it (``_plan_held_ahead``)."""
        self._searched: tuple | None = None
        """(planning link, UE scale, UE overhead ms, send ms per byte) the last decision's prediction was made at:
        a reuse moves it to the transport residual and server scale of now, not to these (``held_answer``)."""
        self.drift_keys: frozenset[str] = frozenset()
        """For a 'scale' drift: the ``scale`` entries that moved (``drift``)."""
        self.fixed_server_ops = fixed_server_ops
        self.deadline_ms = deadline_ms
        self.eps, self.energy, self.uplink_cv = eps, energy, uplink_cv
        """``robust``'s miss probability, energy model (``partitioner.robust.EnergyModel``) and uplink spread
        (None: the measured one each ``decide`` is given)."""
        self.plan_budget_s = plan_budget_s
        self.horizon = horizon
        self.last: tuple | None = None
        """(key, choice, requests remaining then) of the last decision."""
        self._planned_with: tuple | None = None
        """(planning link, cost scales, send ms per byte) of the last decision: drift re-plans."""
        self._target: frozenset[str] | None = None
        self.lost_ms = 0.0
        self._spread: tuple[float, float] | None = None
        """(uplink cv, UE cv) the last decision planned with (robust re-plans when either moved)."""
        self._held_memo: tuple | None = None
        """(base, target, held, ``planning.target_held`` of them) of the last ``_target_held``."""
        self._key_memo: tuple | None = None
        """(state, share, exclude, allow, ``key`` of them) of the last ``key``."""
        self._weights_memo: tuple | None = None
        """(base, target, the weights its ops read) of the last ``_target_weights``."""
        self.exclude: frozenset[frozenset[str]] = frozenset()
        self.allow: frozenset[frozenset[str]] | None = None
        """Server sets the planner leaves out (their slice was refused) / the only ones it may use (None: any):
        ``ue_client.refusals.RefusedSlices.exclusion``, set by the engine before each ``decide``."""
        self.why = ""
        """Why the last ``decide`` planned: '' when it reused the previous decision, else 'first',
        'changed' (a discrete input of ``key`` moved, or the previous plan could flip) or the drift
        that forced it ('link', 'scale', 'send cost', 'spread')."""
        self._made_for = -1
        """The request (``n``) the last full decision was made for."""
        self.drift_detail = ""
        """For a 'scale' drift: which scale moved, from what to what (``drift``)."""
        self.trajectory: Trajectory | None = None
        """The last full decision's prefetch trajectory (``ue_client.trajectory``): followed without a search
        while the state stays on it."""
        self.follow_miss = ""
        """Why the last ``decide`` with a trajectory did not follow it ('' when it did, or had none)."""
        self._search_memo: tuple | None = None
        """(inputs, answer) of the last ``search`` in ``decide``: its every input, the calibrated graph by identity,
        and the choice it returned (before ``decide`` stamps its time and reasons on it). A second full decision in
        the same request with the same inputs takes that answer instead of searching again: the search is a
        function of them (``tests/test_decisions_repeat.py``). Session 29: a suspended client's offline decision
        that needed the server (a prefetch) was searched again once the session re-opened, with every input the
        same (resnet18, 400 Mbit/s: request 2 paid two searches, 4.1-6.2 ms at a full core)."""
        self.why_detail = ""
        """For 'changed': what changed (``_changed``): 'held', 'in flight', 'share', 'refusals', 'policy',
        'background' (the previous plan uploads for later requests), 'horizon' (a local plan with more requests
        left than when it was made)."""

    def decide(self, state: ServerState, share: Shares, *, costs: CostGraph | Callable[[], CostGraph],
               base: CostGraph, link: Link, ue_cpu: UeCpu | None, scale: dict[str, float], n: int,
               measured_cv: float | Callable[[], float | None] | None = None,
               ue_cv: float | Callable[[], float | None] | None = None) -> planning.PlanChoice:
        """Request ``n``'s plan (n = 0 while connecting, ahead of the first request): the previous
        decision when nothing it depends on changed, else a new one from ``planning`` on ``costs`` (the
        calibrated graph, or a function that builds it: called only when a new plan is made, since
        rebuilding it costs ~0.6 ms of UE CPU per request for mobilenet_v2's 150 ops once every local
        request moves the UE scale; ``base`` is the profiled one; ``scale``: the cost scales and, as
        ``ue_overhead_ms``, ``transport_ms`` and ``transport_sd_ms``, the UE's per-request overhead, the
        transport residual and its spread (``ue_client.calibration.CostModel``)). ``measured_cv``: the
        uplink rate's measured relative spread (used unless ``uplink_cv`` overrides it; None: 0); ``ue_cv``:
        the UE's measured run-time relative spread (``CostModel.ue_cv``; None: 0); each may be a function that
        gives it, called only when it is used: by ``robust`` (its spread drift) and by a new decision (its
        prediction's spread), never by a reuse of another policy's decision. A new decision's
        ``decision_ms`` (a request's ``plan_ms``) is this whole call's wall time, the calibrated graph's
        rebuild included, and ``details["plan_cpu_ms"]`` its CPU time (this thread's); a reused one's are 0
        (a key comparison)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        got: list[tuple[float, float]] = []

        def spreads() -> tuple[float, float]:  # (uplink cv, UE cv), read once and only when used
            if not got:
                got.append((self.cv(_value(measured_cv)), _value(ue_cv) or 0.0))
            return got[0]

        drift = self.drift(link, ue_cpu, scale) or (self.spread_drift(spreads()) if self.policy == "robust" else "")
        if drift == "link":
            self._target = None
        key = self.key(state, share)
        if self._target is not None and not planning._permitted(self._target, self.exclude, self.allow):
            self._target = None  # searched again among the permitted ones
        remaining = self.remaining(n)
        reused = None if drift else self.reusable(key, state, base, remaining, n)
        if reused is not None and n >= 1 and self._made_for == n and self.last is not None:
            # decided earlier in this same request (a suspended client's offline plan that needs the server,
            # asked again once the session is open): the request keeps that decision's cost and reason
            return self.last[1]
        followed = None
        if reused is None and not drift and self.trajectory is not None:
            followed, self.follow_miss = self.trajectory.follow(_steady(key), remaining, state)
        if followed is not None:  # on the prefetch plan's trajectory: its step, no search
            self.why, self.why_detail = "followed", ""
            choice = planning.evolve(followed, decision_ms=(time.perf_counter() - t0) * 1e3, details={
                **followed.details, "plan_cpu_ms": (time.thread_time() - c0) * 1e3, "plan_why": "followed"})
            self.last = (key, choice, remaining)  # the link and scales stay those the plan was made with
            self._made_for = n
            return choice
        self.why = "" if reused is not None else (drift or ("first" if self.last is None else "changed"))
        self.why_detail = "" if reused is not None or drift or self.last is None else self._changed(key, state)
        if drift == "scale" and self.drift_detail:
            self.why_detail = self.drift_detail
        if self.why_detail and self.follow_miss:
            self.why_detail += f" (trajectory left: {self.follow_miss})"
        if reused is None and self.held_shortcut and (drift == "" or (drift == "scale"
                                                                     and self._held_follows(self.drift_keys, base))):
            held = self.held_answer(key, state, base, link, ue_cpu, scale, share)
            if held is not None:  # the search's answer without the search (``held_answer``)
                choice = self._take_held(held, t0, c0, key, remaining, n, link, scale,
                                         None if ue_cpu is None else ue_cpu.send_ms_per_byte)
                if got:
                    self._spread = spreads()
                return choice
            miss = self.held_miss  # (named in the search's ``plan_why`` only: the cache's reasons stay the search's)
        else:
            miss = ""
        if reused is None and callable(costs):
            costs = costs()

        def search(st: ServerState, h: int | None, target, lost_ms: float) -> planning.PlanChoice:
            if self.fixed_server_ops is not None:
                return planning.fixed(self.fixed_server_ops, costs, link, state=st, share=share, ue_cpu=ue_cpu)
            return planning.choose(self.policy, costs, link, state=st, share=share, deadline_ms=self.deadline_ms,
                                   budget_s=self.plan_budget_s, target=target, ue_cpu=ue_cpu, horizon=h,
                                   lost_ms=lost_ms, eps=self.eps, energy=self.energy, uplink_cv=spreads()[0],
                                   ue_cv=spreads()[1], ue_overhead_ms=scale.get("ue_overhead_ms", 0.0),
                                   transport_ms=scale.get("transport_ms", 0.0),
                                   transport_sd_ms=scale.get("transport_sd_ms", 0.0),
                                   exclude=self.exclude, allow=self.allow)

        if reused is not None:  # its prediction with the transport residual of now (it moves by less than 10 ms
            # and with the UE's (run locally) or the server's cost scale of now (each moves by less than 30 %
            # without a re-plan): ``refresh_transport``, ``refresh_ue_scale``, ``refresh_server_scale`` in one
            then = self._planned_with[1] if self._planned_with else {}
            choice = planning.refresh_reused(reused, scale.get("transport_ms", 0.0), then.get("ue"), scale.get("ue"),
                                             then.get("server"), scale.get("server"))
        else:  # (``repeated`` is only read on this branch)
            # every input of ``search`` (the calibrated graph by identity): a second full decision in this
            # request with all of them equal takes the first one's answer (``_search_memo``)
            inputs = (n, costs, link, ue_cpu, share, state.held, state.in_flight, remaining, self._target,
                      self.lost_ms, self.exclude, self.allow, dict(scale), self.policy, self.fixed_server_ops,
                      self.deadline_ms, self.plan_budget_s, self.eps, self.energy,
                      None if self.fixed_server_ops is not None else spreads())
            memo = self._search_memo
            repeated = n >= 1 and self._made_for == n and memo is not None and _same_inputs(memo[0], inputs)
            choice = memo[1] if repeated else search(state, remaining, self._target, self.lost_ms)
            self._search_memo = (inputs, choice)
        if reused is None:  # the whole decision on the request's clock, the calibrated graph's rebuild included
            why = f"{self.why}: {self.why_detail}" if self.why_detail else self.why
            if miss:
                why += f" (held answer: {miss})"
            if repeated:
                why += " (this request's search repeated: no search)"
            choice = planning.evolve(choice, decision_ms=(time.perf_counter() - t0) * 1e3,
                                     details={**choice.details, "plan_cpu_ms": (time.thread_time() - c0) * 1e3,
                                              "plan_why": why})
            self._made_for = n
            self.trajectory = (Trajectory.from_choice(
                choice, _steady(key), remaining, state, (base if base is not None else costs).weights)
                               if self.policy == "auto" and self.fixed_server_ops is None else None)
            self.follow_miss = ""
            self._searched = (link, scale.get("ue"), scale.get("ue_overhead_ms"),
                              None if ue_cpu is None else ue_cpu.send_ms_per_byte)
            if self.held_shortcut and not repeated:  # (a repeated search's: the first one's, made with these inputs)
                self._plan_held_ahead(choice, key, state, base, costs, search, remaining, link, ue_cpu, scale)
        self.last = (key, choice, remaining)
        self._planned_with = (link, dict(scale), None if ue_cpu is None else ue_cpu.send_ms_per_byte)
        if got or self.policy == "robust":  # (only robust's drift reads it)
            self._spread = spreads()
        if self.policy == "auto" and choice.warm_target is not None:
            self._target = choice.warm_target
        return choice

    def may_reuse(self, state: ServerState, n: int) -> bool:
        """False where :meth:`reuse` returns None at its first check, before reading anything: nothing decided
        yet, ``robust``, weights in flight, or a decision already made for request ``n``. ``Decider.quick_reuse``
        asks it before it reads the estimates that ``reuse`` takes (session 33: ~0.02 ms of a real client's
        searching request with weights in flight)."""
        return not (self.last is None or self._planned_with is None or self.policy == "robust" or state.in_flight
                    or self._made_for == n)

    def reuse(self, state: ServerState, share: Shares, *, link: Link, ue_cpu: UeCpu | None, base: CostGraph | None,
              ue: float, server: float, overhead_ms: float, transport_ms: float,
              transport_se: Callable[[], float | None], n: int) -> planning.PlanChoice | None:
        """``decide``'s reuse of the previous decision on the request's clock, read from raw values: what
        ``decide`` returns, and the cache as ``decide`` leaves it, when it would reuse the previous decision (or
        the one planned ahead, while connecting, for request 1), or take ``held_answer``'s answer (session 16:
        ``_held_route``); None when it would do anything else (search, follow a trajectory, a decision already made
        for request ``n``, the ``robust`` policy), and the caller then calls ``decide`` (what this changed,
        ``decide`` changes the same way). ``ue``, ``server``, ``overhead_ms``, ``transport_ms``: ``decide``'s ``scale``
        entries ``ue``, ``server``, ``ue_overhead_ms``, ``transport_ms`` (ms); ``transport_se``: gives
        ``transport_se_ms``, called only when the residual moved by more than 10 ms (the one case its re-plan
        threshold reads it).

        Why: a warm request's reuse through ``decide`` built the inputs' dict, the spreads' standard errors and
        up to four copies of the choice (0.12-0.15 ms of CPU per request at a full core, 0.4-2 ms on a 10 % UE in
        session 13's grid, where ``neurosurgeon``'s fixed split spent 0.15-0.3); here it is a few comparisons
        and at most one copy (``planning.refresh_reused``). The same rules (``drift``, ``key``, ``reusable``),
        asked in the same order; ``tests/test_quick_reuse.py`` walks random request streams through both."""
        if not self.may_reuse(state, n):
            return None
        last, pw = self.last, self._planned_with
        s0 = pw[1]
        send = None if ue_cpu is None else ue_cpu.send_ms_per_byte
        moved = raw_drift(pw, link, send, ue, server, overhead_ms, transport_ms, transport_se)
        if moved is None:
            return None
        now = None
        if moved:  # a 'scale' drift: ``held_answer`` follows the server scale and the residual, else ``decide``
            now = {"ue": ue, "server": server, "ue_overhead_ms": overhead_ms, "transport_ms": transport_ms}
            keys = moved_scales(s0, now, transport_se() or 0.0, False)
            if not self.held_shortcut or not keys or not self._held_follows(keys, base):
                return None
            self.drift_keys, self.drift_detail = frozenset(keys), scale_detail(s0, now, keys)
        else:
            self.drift_detail = ""
        key = self.key(state, share)
        if self._target is not None and not planning._permitted(self._target, self.exclude, self.allow):
            self._target = None
        remaining = self.remaining(n)
        reused = None
        if not moved and last[0] == key:
            reused = self.reusable(key, state, base, remaining, n)  # (or the decision planned ahead for it)
        if reused is None:  # ``decide`` would follow a trajectory (without a drift), else ask ``held_answer``
            if not self.held_shortcut or self.follow_miss or (not moved and self.trajectory is not None):
                return None
            if now is None:
                now = {"ue": ue, "server": server, "ue_overhead_ms": overhead_ms, "transport_ms": transport_ms}
            return self._held_route(key, state, base, link, ue_cpu, now, send, remaining, n, moved, share)
        choice = planning.refresh_reused(reused, transport_ms, s0.get("ue"), ue, s0.get("server"), server)
        self.why = self.why_detail = ""
        self.last = (key, choice, remaining)
        self._planned_with = (link, {"ue": ue, "server": server, "ue_overhead_ms": overhead_ms,
                                     "transport_ms": transport_ms}, send)
        if self.policy == "auto" and choice.warm_target is not None:
            self._target = choice.warm_target
        return choice

    def _held_route(self, key: tuple, state: ServerState, base: CostGraph | None, link: Link, ue_cpu: UeCpu | None,
                    now: dict[str, float], send: float | None, remaining: int | None, n: int,
                    drifted: bool, share: Shares | None = None) -> planning.PlanChoice | None:
        """``reuse``'s way to ``held_answer`` where ``decide`` would go there next (the previous decision not
        reusable, or a 'scale' drift of ``held_shortcut.HELD_REFRESH`` entries only, ``drifted``): its answer,
        with the reasons and the cache's state as ``decide``'s held branch leaves them (``_take_held``); None
        where ``held_answer`` has none (``decide`` then searches). Session 16: request 1 after the cold one and
        the re-plans on the residual's or the server scale's move took 0.25-0.45 ms of a full core through
        ``decide`` (its inputs' dict, the spreads, every drift rule again)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        held = self.held_answer(key, state, base, link, ue_cpu, now, share)
        if held is None:
            return None
        self.why = "scale" if drifted else "changed"
        self.why_detail = self.drift_detail if drifted else self._changed(key, state)
        return self._take_held(held, t0, c0, key, remaining, n, link, now, send)

    def _take_held(self, held: planning.PlanChoice, t0: float, c0: float, key: tuple, remaining: int | None, n: int,
                   link: Link, scale: dict[str, float], send: float | None) -> planning.PlanChoice:
        """``held_answer``'s choice ``held`` as the request's decision (made since ``t0`` / ``c0``, perf_counter /
        thread_time s), the cache's state moved on as for a search's (no trajectory: a held target's plan is no
        prefetch); ``decide``'s and ``_held_route``'s one copy."""
        why = f"{self.why}: {self.why_detail}" if self.why_detail else self.why
        choice = planning.evolve(held, decision_ms=(time.perf_counter() - t0) * 1e3,
                                 details={**held.details, "plan_cpu_ms": (time.thread_time() - c0) * 1e3,
                                          "plan_why": f"{why} (warm target held: no search)"})
        self._made_for = n
        self.trajectory, self.follow_miss = None, ""
        self.last = (key, choice, remaining)
        self._planned_with = (link, dict(scale), send)
        self._searched = (link, scale.get("ue"), scale.get("ue_overhead_ms"), send)  # (as it is exact now)
        return choice

    def held_answer(self, key: tuple, state: ServerState, base: CostGraph | None, link: Link, ue_cpu: UeCpu | None,
                    scale: dict[str, float], share: Shares | None = None) -> planning.PlanChoice | None:
        """``auto``'s decision once its warm target is held, without a search, where the search's answer is known:
        the last decision's (a held target's, 'warm target held') or the one made ahead for it
        (``_plan_held_ahead``), its prediction moved to the server cost scale and transport residual of now;
        None where the search is needed (``held_miss`` then says why, per candidate).

        Why this is the search's answer: ``held_shortcut.held_plan``, which picks it. Session 14's testbed: requests
        1 and 3 of a warm stream (after the cold request the target became held, then the server scale and the
        residual moved) searched in full, 0.8-1.3 ms of CPU and 10-20 ms wall on a 10 % UE.
        ``tests/test_held_shortcut.py`` walks random streams through a cache with and one without it."""
        t = self._target
        self.held_miss = ""
        if (self.policy != "auto" or self.fixed_server_ops is not None or not t or state.in_flight or base is None
                or not self._target_held(base, t, state)):
            return None
        send = None if ue_cpu is None else ue_cpu.send_ms_per_byte
        now = (link, scale.get("ue"), scale.get("ue_overhead_ms"), send)
        cands = []
        if self.last is not None and self._planned_with is not None and self._searched is not None:
            cands.append((*self.last[:2], self._planned_with, self._searched))
        if self._held_ahead is not None:
            cands.append(self._held_ahead)
        misses, answer = held_plan(cands, key, t, base, now, scale, share)
        if answer is not None:
            return answer
        self.held_miss = "; ".join(dict.fromkeys(misses)) or "no held plan"
        return None

    def _held_follows(self, keys, base: CostGraph | None) -> bool:
        """``held_shortcut.held_follows`` for the warm target kept."""
        return held_follows(keys, self._target, base)

    def _plan_held_ahead(self, choice: planning.PlanChoice, key: tuple, state: ServerState, base, costs, search,
                         remaining: int | None, link: Link, ue_cpu: UeCpu | None, scale: dict[str, float]) -> None:
        """Beside a full decision made ahead of the first request (``n`` = 0, while connecting: off the requests'
        clock) or for the first (the cold one, whose upload dwarfs it) whose warm target is not held yet, the
        decision once it is (``held_answer`` takes it): the held set after the target's upload is known by
        design, so the request that finds it held (the server scale moved by the cold request's calibration, or
        the UE's by a local one) needs no search. One more ``planning.choose`` call at that time.

        Kept through the later full decisions towards the same target (session 17: the prefetch and gradual
        requests between the cold one and the one that finds the target held are searches; clearing it there
        sent that request to a search of 0.45-0.65 ms at a full core, 1.1-1.2 ms of CPU on a 10 % UE in session
        16's grid); ``held_answer`` checks that its inputs still hold before it takes it."""
        t = choice.warm_target
        if self._held_ahead is not None and self._held_ahead[1].warm_target != t:
            self._held_ahead = None
        if (self._made_for > 1 or self.policy != "auto" or self.fixed_server_ops is not None or not t
                or state.in_flight or base is None or self._target_held(base, t, state)):
            return
        self._held_ahead = None
        after = state.with_held(self._target_weights(base, t))
        ahead = search(after, remaining, t, self.lost_ms)
        if ahead.details.get("warm_target_held"):
            key_after = (*key[:2], after.held, *key[3:])
            self._held_ahead = (key_after, ahead, (link, dict(scale), None), self._searched)

    def cv(self, measured: float | None) -> float:
        """The uplink spread to plan with: the override, else the measured one, else 0."""
        if self.uplink_cv is not None:
            return self.uplink_cv
        return measured if measured is not None else 0.0

    def spread_drift(self, spread: tuple[float, float], rel: float = 0.25) -> str:
        """'spread' when robust's uplink or UE spread moved by more than ``rel`` (relative, or 0.02
        absolute) since its last decision; '' otherwise and for the other policies (they ignore it)."""
        if self.policy != "robust" or self._spread is None:
            return ""
        return "spread" if spread_moved(spread, self._spread, rel) else ""

    def key(self, state: ServerState, share: Shares) -> tuple:
        """What a decision depends on exactly; the continuous estimates are compared with hysteresis
        (``drift``). The same tuple while ``state``, ``share``, the refusals, the policy and the fixed split are
        the same objects (a warm client's are: ``UploadScheduler.server_state``, ``RemoteEngine._shares``,
        ``RefusedSlices.exclusion``; a fixed split set anew with the same state was reused as the old one)."""
        m = self._key_memo
        if (m is not None and m[0] is state and m[1] is share and m[2] is self.exclude and m[3] is self.allow
                and m[4][0] is self.policy and m[4][1] is self.fixed_server_ops):
            return m[4]
        key = (self.policy, self.fixed_server_ops, state.held, bool(state.in_flight), round(share.compute, 3),
               (round(share.uplink, 3), round(share.tensor, 3)), self.exclude, self.allow)
        self._key_memo = (state, share, self.exclude, self.allow, key)
        return key

    def drift(self, link: Link, ue_cpu: UeCpu | None, scale: dict[str, float], rel: float = 0.25) -> str:
        """Which estimate moved enough since the last decision to plan again ('' if none): the link (then the
        warm target is searched again too), the UE or server cost scale, the send cost (``drift.estimate_drift``:
        the thresholds and why they are relative); a 'scale' drift's entries go to ``drift_keys`` and
        ``drift_detail``."""
        why, self.drift_keys, self.drift_detail = estimate_drift(self._planned_with, link, ue_cpu, scale,
                                                                 self.policy == "robust", rel)
        return why

    def reusable(self, key: tuple, state: ServerState, base: CostGraph | None, remaining: int | None,
                 n: int) -> planning.PlanChoice | None:
        """The previous decision, when nothing it depends on changed. A decision made while connecting
        is reused by the first request as it is (nothing happened in between). Otherwise it is reused
        only when it cannot flip: no background upload or investment pending, and either fewer requests
        left than when it was made (staying local or warm only gets more attractive) or the plan is warm
        (nothing left to invest in)."""
        last = self.last
        if last is None or last[0] != key or state.in_flight:
            return None
        _, choice, horizon_then = last
        if remaining == horizon_then and n <= 1:  # made ahead, while connecting, for this very request
            return planning.evolve(choice, decision_ms=0.0,
                                   details={**choice.details, "planned_ahead": True, "plan_cpu_ms": 0.0,
                                            "plan_why": "planned ahead"})
        if choice.background or choice.invest:
            return None
        warm = base is not None and self._target_held(base, choice.warm_target or frozenset(), state)
        if not (warm or (remaining is not None and horizon_then is not None and remaining <= horizon_then)):
            return None
        return _reused_form(choice)

    def _changed(self, key: tuple, state: ServerState) -> str:
        """Why the previous decision was not reused although no estimate drifted (``why_detail``)."""
        old = self.last[0] if self.last is not None else None
        if old is None:
            return ""
        names = ("policy", "policy", "held", "in flight", "share", "share", "refusals", "refusals")
        moved = [nm for nm, a, b in zip(names, key, old, strict=True) if a != b]
        if moved:
            return ",".join(dict.fromkeys(moved))
        if state.in_flight:
            return "in flight"
        choice = self.last[1]
        if choice.background or choice.invest:
            return "background"
        return "horizon"

    def _target_held(self, base: CostGraph, target: frozenset[str], state: ServerState) -> bool:
        """``planning.target_held``, remembered for the last (cost graph, target, held set) objects: a warm
        client asks it on every request with the same ones; for a new held set, the target's weights
        (``_target_weights``) within it."""
        memo = self._held_memo
        if memo is not None and memo[0] is base and memo[1] is target and memo[2] is state.held:
            return memo[3]
        held = not target or self._target_weights(base, target) <= state.held
        self._held_memo = (base, target, state.held, held)
        return held

    def _target_weights(self, base: CostGraph, target: frozenset[str]) -> frozenset[str]:
        """The weights the ops of ``target`` read in ``base``, remembered for the last (graph, target) objects
        (``planning.target_weights``: a walk over every op, 0.13-0.65 ms of the request that first found its
        target held at a full core, resnet18 to densenet121; now made beside the decision that chose it)."""
        memo = self._weights_memo
        if memo is not None and memo[0] is base and memo[1] is target:
            return memo[2]
        names = planning.target_weights(base, target)
        self._weights_memo = (base, target, names)
        return names

    def remaining(self, n: int) -> int | None:
        """Requests left including request ``n`` (None: no horizon given); before the first request
        (planning ahead, n = 0) the first one is "this one"."""
        return None if self.horizon is None else max(1, self.horizon - max(1, n) + 1)

    def account(self, choice: planning.PlanChoice, measured_ms: float) -> None:
        """Rent-or-buy: latency lost to not being warm on the target, until the client invests."""
        if choice.invest:
            self.lost_ms = 0.0
            return
        warm = choice.details.get("target_warm_ms")
        if warm is not None:
            self.lost_ms += max(0.0, measured_ms - warm)



def _reused_form(choice: planning.PlanChoice) -> planning.PlanChoice:
    """``choice`` as a reuse reports it (no decision time, ``plan_why`` 'reused'); the same object when it is
    already so (a decision reused before: no copy per request)."""
    d = choice.details
    if (choice.decision_ms == 0.0 and d.get("reused_decision") is True and d.get("plan_cpu_ms") == 0.0
            and d.get("plan_why") == "reused"):
        return choice
    return planning.evolve(choice, decision_ms=0.0, details={**d, "reused_decision": True, "plan_cpu_ms": 0.0,
                                                             "plan_why": "reused"})


def _same_inputs(a: tuple, b: tuple) -> bool:
    """``decide``'s search inputs ``a`` and ``b`` are the same: the calibrated graph (``[1]``) the same object, every
    other entry equal."""
    return a[1] is b[1] and a[0] == b[0] and a[2:] == b[2:]


def _value(x):
    """``x``, or what ``x()`` gives when it is a function (a spread read only when used)."""
    return x() if callable(x) else x


def _steady(key: tuple) -> tuple:
    """``DecisionCache.key`` without what the server holds and what is in flight (a trajectory's own state)."""
    return key[:2] + key[4:]
