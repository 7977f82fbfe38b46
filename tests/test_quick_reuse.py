"""A warm request's reuse of its previous decision on raw values (``DecisionCache.reuse``, the engine's first step
when no background decision waits) is exactly ``DecisionCache.decide``'s: the same choice (field for field, its
refreshed prediction included) and the cache left in the same state, over random request streams (held sets
growing along the plans, links, cost scales, the UE's overhead, the transport residual and its standard error,
the send cost and the shares moving by a little or past the drift thresholds, refusals, horizons, a decision
planned ahead, which the first request takes through ``reuse`` too, and ``held_answer``'s re-plans, which ``reuse``
takes where ``decide`` would); ``planning.refresh_reused`` equals the three
refreshes it replaces; a real client on a real server answers like the eager module with the shortcut on and off,
and its warm requests take the shortcut."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import CoinferClient, new_tenant, planning
from ue_client.decisions import DecisionCache

DATA = Path(__file__).parent / "data" / "costgraphs"


def _state(dc: DecisionCache) -> tuple:
    """What a later decision reads of the cache (timing fields left out: a new plan's own CPU time differs)."""
    link, scale, send = dc._planned_with
    scale = {k: scale[k] for k in ("ue", "server", "ue_overhead_ms", "transport_ms") if k in scale}
    last = None if dc.last is None else (dc.last[0], dc.last[2])
    return (last, link, scale, send, dc.why, dc.why_detail, dc._target, dc._made_for, dc.lost_ms, dc.follow_miss,
            dc.exclude, dc.allow)


def _kind(c) -> tuple:
    return (c.policy, c.server_ops, c.warm_target, c.background, c.prefetch, c.invest, c.predicted_ms, c.warm_ms,
            c.serial_ms, c.local_ms, c.reason)


@pytest.mark.parametrize("policy,name,fixed", [("auto", "resnet18", False), ("auto", "mobilenet_v2", False),
                                               ("mjoa", "mobilenet_v2", False), ("dads", "resnet18", False),
                                               ("neurosurgeon", "mobilenet_v2", False), ("auto", "resnet18", True)])
def test_the_quick_reuse_is_decides_reuse(policy, name, fixed):
    """Two caches walk the same random stream of requests: one always calls ``decide``; the other first asks
    ``reuse`` with the same inputs as raw values, and calls ``decide`` only when it answers None. Every request's
    choice is the same; where ``decide`` reused, ``reuse`` answered it (not None) and the choice is equal field for
    field (its details too); the caches stay in step."""
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    weights = sorted(g.weights)
    every = frozenset(op.name for op in g.ops)
    quick_hits = reused = ahead = held_hits = 0
    for seed in range(8):
        rng = random.Random(seed)
        horizon = rng.choice([None, 8, 20])
        mk = dict(fixed_server_ops=every if fixed else None, deadline_ms=None, plan_budget_s=0.3, horizon=horizon)
        plain, quick = DecisionCache(policy, **mk), DecisionCache(policy, **mk)
        link = Link(rng.choice([20.0, 100.0, 400.0]), rtt_ms=rng.choice([2.0, 20.0]))
        scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0,
                 "transport_se_ms": 0.0}
        ue_cpu = rng.choice([None, UeCpu(send_ms_per_byte=1e-6, shared=True)])
        held: frozenset[str] = frozenset()
        share = Shares()
        for n in range(0 if rng.random() < 0.5 else 1, 16):  # (n = 0: planned ahead, while connecting)
            move = rng.random() if n != 1 or seed % 2 else 1.0  # (half the streams: request 1 as connected)
            if move < 0.1 and len(held) < len(weights):
                held = held | frozenset(rng.sample(weights, k=min(3, len(weights) - len(held))))
            elif move < 0.2:
                link = Link(link.uplink_mbps * rng.choice([0.9, 1.1, 0.5, 2.0]),
                            rtt_ms=link.rtt_ms * rng.choice([1.0, 1.2, 3.0]))
            elif move < 0.3:
                scale = {**scale, "transport_ms": scale["transport_ms"] + rng.choice([-30.0, -12.0, -5.0, 5.0, 12.0]),
                         "transport_se_ms": rng.choice([0.0, 2.0, 8.0])}
            elif move < 0.35:
                scale = {**scale, "ue_overhead_ms": max(0.0, scale["ue_overhead_ms"] + rng.choice([-15.0, 3.0, 15.0]))}
            elif move < 0.4:
                share = Shares(compute=rng.choice([1.0, 0.5, 0.25]))
            elif move < 0.45 and ue_cpu is not None:
                ue_cpu = UeCpu(send_ms_per_byte=ue_cpu.send_ms_per_byte * rng.choice([1.2, 2.0]), shared=True)
            elif move < 0.5:  # a refused split (the planner leaves it out) or the refusals cleared
                ex = frozenset() if plain.exclude else frozenset({frozenset(every)})
                plain.exclude = quick.exclude = ex
            st = ServerState(held=held)
            costs = g.scaled(ue=scale["ue"], server=scale["server"])
            kw = dict(costs=costs, base=g, link=link, ue_cpu=ue_cpu, scale=dict(scale), measured_cv=None, ue_cv=None)
            want = plain.decide(st, share, n=n, **kw)
            got = quick.reuse(st, share, link=link, ue_cpu=ue_cpu, base=g, ue=scale["ue"], server=scale["server"],
                              overhead_ms=scale["ue_overhead_ms"], transport_ms=scale["transport_ms"],
                              transport_se=lambda s=scale: s["transport_se_ms"], n=n)
            if got is not None:
                quick_hits += 1
                if plain.why != "":  # ``decide`` re-planned: ``reuse`` took ``held_answer``'s answer as it did
                    held_hits += 1
                    assert "(warm target held: no search)" in want.details["plan_why"], (seed, n)
                    assert got.details["plan_why"] == want.details["plan_why"], (seed, n)
                    assert got.predicted_ms == want.predicted_ms and got.details["mean_ms"] == want.details["mean_ms"]
            else:
                got = quick.decide(st, share, n=n, **kw)
            if plain.why == "" and n >= 1:  # reused, or the decision planned ahead for request 1 (session 16)
                reused += 1
                ahead += bool(want.details.get("planned_ahead"))
                assert want.details.get("plan_why") == ("planned ahead" if want.details.get("planned_ahead")
                                                        else "reused")
                assert got == want, (seed, n)  # every field, the details' prediction parts too
            assert _kind(got) == _kind(want), (seed, n)
            assert _state(quick) == _state(plain), (seed, n)
            if n == 0:  # planned while connecting: nothing ran
                continue
            # the request ran its plan: what it needed is held now; calibration moved the scales a little
            held = held | frozenset(w for op in g.ops if op.name in got.server_ops for w in op.weights)
            plain.account(got, got.predicted_ms)
            quick.account(got, got.predicted_ms)
            r = rng.random()
            if r < 0.6:  # a warm request's calibration: the server's and the UE's scales, the residual
                scale = {**scale, "server": scale["server"] * rng.choice([0.95, 1.02, 1.1, 1.5]),
                         "ue": scale["ue"] * rng.choice([0.97, 1.0, 1.04]),
                         "transport_ms": scale["transport_ms"] + rng.uniform(-3.0, 3.0)}
            elif r < 0.7:
                scale = {**scale, "ue": scale["ue"] * rng.choice([0.6, 1.5])}
    assert quick_hits - held_hits == reused and reused > 15 and ahead >= 1, (quick_hits, reused, ahead)
    if policy == "auto" and not fixed:  # (session 16: the held target's re-plans through ``reuse`` too)
        assert held_hits >= 1, (held_hits, quick_hits)


def test_reuse_leaves_robust_and_a_first_decision_to_decide():
    g = CostGraph.from_json(DATA / "resnet18.json").scaled(ue=10.0)
    link = Link(100.0, rtt_ms=2.0)
    args = dict(link=link, ue_cpu=None, base=g, ue=1.0, server=1.0, overhead_ms=0.0, transport_ms=0.0,
                transport_se=lambda: 0.0)
    for policy in ("robust", "dads"):
        dc = DecisionCache(policy, fixed_server_ops=None, deadline_ms=200.0, plan_budget_s=0.3, horizon=None)
        assert dc.reuse(ServerState(), Shares(), n=1, **args) is None  # nothing decided yet
        kw = dict(costs=g, base=g, link=link, ue_cpu=None, scale={"ue": 1.0, "server": 1.0}, measured_cv=None,
                  ue_cv=None)
        dc.decide(ServerState(), Shares(), n=1, **kw)
        dc.decide(ServerState(), Shares(), n=2, **kw)
        again = dc.reuse(ServerState(), Shares(), n=3, **args)
        assert (again is None) == (policy == "robust")


def test_refresh_reused_equals_the_three_refreshes():
    rng = random.Random(3)
    seen = 0
    for _ in range(400):
        split = rng.random() < 0.7
        p = rng.uniform(20.0, 300.0)
        details = {"mean_ms": p if rng.random() < 0.8 else p + 1.0}
        if split and rng.random() < 0.8:
            details.update(transport_base_ms=rng.uniform(5, 50), transport_floor_ms=rng.uniform(0, 5))
            if rng.random() < 0.7:
                details["transport_ms"] = rng.choice([0.0, rng.uniform(-20, 40)])
        if split and rng.random() < 0.8:
            details["server_ms"] = rng.uniform(1, 60)
        if not split and rng.random() < 0.5:
            details.update(ue_overhead_ms=rng.uniform(0, 5), ue_finish_ms=p * 0.9)
        c = planning.PlanChoice("mjoa", frozenset({"a"}) if split else frozenset(), p, p * 1.1, p * 1.3,
                                details=details, local_ms=p * 2)
        t = rng.choice([0.0, details.get("transport_ms", 0.0), rng.uniform(-20, 40)])
        ue = (rng.choice([None, 1.0, 1.3]), rng.choice([None, 1.0, 0.8]))
        sv = (rng.choice([None, 1.0, 2.0]), rng.choice([None, 1.0, 1.7, 0.0]))
        want = planning.refresh_server_scale(planning.refresh_ue_scale(planning.refresh_transport(c, t), *ue), *sv)
        got = planning.refresh_reused(c, t, *ue, *sv)
        assert got == want and type(got) is planning.PlanChoice
        assert planning.evolve(c, predicted_ms=t, details={}) == replace(c, predicted_ms=t, details={})
        seen += got is not c
    assert seen > 100
    with pytest.raises(TypeError):
        planning.evolve(c, no_such_field=1)
    with pytest.raises(dataclasses.FrozenInstanceError):  # the copy is as frozen as the original
        planning.evolve(c).predicted_ms = 1.0


def test_a_real_clients_warm_requests_take_the_shortcut_and_answer_like_the_eager_model(server):
    """resnet18 on a real server, policy auto on a 10x-slowed UE (every op goes to the server), decisions inline:
    with ``quick_reuse`` its warm reused requests come through ``DecisionCache.reuse`` (``decide`` is not called
    for them), without it through ``decide``; both answer what the user's eager module answers, and both
    reuse on the same requests."""
    from ue_client import decisions as dmod

    whys = {}
    for quick in (True, False):
        calls = {"decide": 0}
        orig = dmod.DecisionCache.decide

        def counting(self, *a, _orig=orig, _calls=calls, **k):
            _calls["decide"] += 1
            return _orig(self, *a, **k)

        with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                           ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False, quick_reuse=quick,
                           transport_memory=False) as c:
            x = c.example_inputs[0].clone()
            c(x)
            c.engine.wait_uploads(60)
            dmod.DecisionCache.decide = counting
            try:
                ys = [c(x) for _ in range(6)]
            finally:
                dmod.DecisionCache.decide = orig
            ref = c.eager(x)
            for y in ys:
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            reps = c.reports[-6:]
            whys[quick] = [r.plan_why.split(":")[0] for r in reps]
            n_reused = sum(w == "reused" for w in whys[quick])
            n_held = sum("(warm target held: no search)" in r.plan_why for r in reps)
            assert n_reused >= 1, whys[quick]
            if quick:  # a reused request, or one that took the held target's answer, did not go through ``decide``
                assert calls["decide"] == 6 - n_reused - n_held, (calls, whys[quick])
            else:
                assert calls["decide"] == 6
            assert all(r.server_ops == len(c.graph.ops) for r in reps if r.plan_why == "reused")


def test_a_suspended_clients_reuses_take_the_shortcut_too(server):
    """Session 20: a client whose plans stay local suspends its session, and each request then decides offline
    (``RemoteEngine._offline``); its reuses go through ``DecisionCache.reuse`` as a session's do (session 19's grid:
    through ``decide``, 0.14 ms of CPU median on a 10 % UE, 6 of the 16 requests over 5 % of their latency); with
    the shortcut off every one goes through ``decide``. Every answer is the eager module's. (That ``reuse`` is
    ``decide``'s decision: the random streams above; the two clients here calibrate their UE scale on real runs,
    so their re-plans need not fall on the same requests.)"""
    from ue_client import decisions as dmod

    whys = {}
    for quick in (True, False):
        calls = {"decide": 0}
        orig = dmod.DecisionCache.decide

        def counting(self, *a, _orig=orig, _calls=calls, **k):
            _calls["decide"] += 1
            return _orig(self, *a, **k)

        with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                           link=(2.0, 20.0), plan_background=False, quick_reuse=quick, probe=False,
                           send_cpu=UeCpu(send_ms_per_byte=1e-5), horizon=8, transport_memory=False) as c:
            x = c.example_inputs[0].clone()
            c(x)
            dmod.DecisionCache.decide = counting
            try:
                ys = [c(x) for _ in range(5)]
            finally:
                dmod.DecisionCache.decide = orig
            ref = c.eager(x)
            for y in ys:
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
            reps = c.reports[-5:]
            assert all(r.offline and r.server_ops == 0 for r in reps), [(r.offline, r.server_ops) for r in reps]
            whys[quick] = [r.plan_why for r in reps]
            n_reused = sum(w == "reused" for w in whys[quick])
            assert n_reused >= 2, whys[quick]
            assert calls["decide"] == (5 - n_reused if quick else 5), (calls, whys[quick])
