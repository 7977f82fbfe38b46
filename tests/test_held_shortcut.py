"""``auto``'s re-plans of a held warm target without a search (``DecisionCache.held_answer``, session 15) give the
search's decision: random request streams through a cache with the shortcut and one without (held sets growing
along the plans, the server scale and the transport residual moving by a little or past their drift thresholds,
the UE scale, the link, the send cost, the shares and refusals moving now and then, horizons, a decision planned
ahead); every request's decision is the same, the prediction equal where every op is on the server (within the
server part's move otherwise), the caches in step; the decision made ahead for the held target is the one the
request after the cold one takes; a real client on a real server takes it there and answers like the eager
module."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import CoinferClient, new_tenant
from ue_client.decisions import DecisionCache

DATA = Path(__file__).parent / "data" / "costgraphs"


def _state(dc: DecisionCache) -> tuple:
    link, scale, send = dc._planned_with
    last = None if dc.last is None else (dc.last[0], dc.last[2])
    return (last, link, dict(scale), send, dc.why, dc.why_detail, dc._target, dc._made_for, dc.lost_ms,
            dc.follow_miss, dc.exclude, dc.allow, dc.trajectory is None)


def _decision(c) -> tuple:
    return (c.policy, c.server_ops, c.warm_target, c.background, c.prefetch, c.invest, c.gradual, c.idle_only,
            c.upload_order, c.reason)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_held_shortcut_is_the_search(name):
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    every = frozenset(op.name for op in g.ops)
    hits = exact = 0
    for seed in range(10):
        rng = random.Random(seed)
        horizon = rng.choice([None, 8, 20])
        mk = dict(fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=horizon)
        plain = DecisionCache("auto", held_shortcut=False, **mk)
        quick = DecisionCache("auto", held_shortcut=True, **mk)
        link = Link(rng.choice([100.0, 400.0]), rtt_ms=rng.choice([2.0, 5.0, 20.0]))
        scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0,
                 "transport_se_ms": 0.0}
        ue_cpu = rng.choice([None, UeCpu(send_ms_per_byte=1e-6, shared=True)])
        held: frozenset[str] = frozenset()
        share = Shares()
        for n in range(0, 14):
            move = rng.random()
            if n and move < 0.05:
                link = Link(link.uplink_mbps * rng.choice([0.9, 0.5, 2.0]), rtt_ms=link.rtt_ms)
            elif n and move < 0.1:
                share = Shares(compute=rng.choice([1.0, 0.5, 0.25]))
            elif n and move < 0.13 and ue_cpu is not None:
                ue_cpu = UeCpu(send_ms_per_byte=ue_cpu.send_ms_per_byte * 2.0, shared=True)
            elif n and move < 0.16:
                ex = frozenset() if plain.exclude else frozenset({every})
                plain.exclude = quick.exclude = ex
            elif n and move < 0.2:
                scale = {**scale, "ue_overhead_ms": scale["ue_overhead_ms"] + rng.choice([3.0, 15.0])}
            elif n and move < 0.6:  # the downlink estimate, measured on every request (no drift rule reads it)
                link = Link(link.uplink_mbps, downlink_mbps=rng.uniform(15.0, 600.0), rtt_ms=link.rtt_ms)
            st = ServerState(held=held)
            kw = dict(costs=lambda s=dict(scale): g.scaled(ue=s["ue"], server=s["server"]), base=g, link=link,
                      ue_cpu=ue_cpu, scale=dict(scale), measured_cv=None, ue_cv=None)
            want = plain.decide(st, share, n=n, **kw)
            got = quick.decide(st, share, n=n, **kw)
            assert _decision(got) == _decision(want), (seed, n)
            assert _state(quick) == _state(plain), (seed, n)
            if "no search" in got.details.get("plan_why", ""):
                hits += 1
                assert "no search" not in want.details.get("plan_why", "")
                assert got.details["warm_target_held"] and got.server_ops == got.warm_target
                fields = ("predicted_ms", "warm_ms", "serial_ms", "local_ms")
                if got.server_ops == every:  # exact
                    exact += 1
                    for f in fields:
                        assert _close(getattr(got, f), getattr(want, f)), (seed, n, f)
                    for k in ("server_ms", "mean_ms", "transport_base_ms", "transport_floor_ms"):
                        assert _close(got.details[k], want.details[k]), (seed, n, k)
                    assert got.details.get("transport_ms", 0.0) == want.details.get("transport_ms", 0.0)
                else:  # the server's ops need not follow the UE's: moved by at most the server part's move
                    assert abs(got.predicted_ms - want.predicted_ms) <= got.details["server_ms"] + 1e-6
                    assert _close(got.local_ms, want.local_ms)
            # the request ran: what its plan sent is held now (its background too, half the time); a warm
            # request's calibration moves the server scale and the transport residual, now and then the UE's
            sent = set(got.upload_order) | (set(got.background) if rng.random() < 0.5 else set())
            held = held | frozenset(w for op in g.ops if op.name in got.server_ops for w in op.weights) | sent
            plain.account(got, got.predicted_ms)
            quick.account(got, got.predicted_ms)
            r = rng.random()
            if r < 0.7:
                scale = {**scale, "server": scale["server"] * rng.choice([0.97, 1.05, 1.34, 1.6, 0.6]),
                         "transport_ms": scale["transport_ms"] + rng.choice([-1.0, 2.0, 15.0, -25.0])}
            elif r < 0.8:
                scale = {**scale, "ue": scale["ue"] * rng.choice([0.97, 1.5])}
    assert hits >= 10 and exact >= 5, (hits, exact)


def test_the_answer_made_ahead_is_the_next_requests_decision():
    """Planned ahead (n = 0) towards a warm target not held: the decision once it is held is made beside it, and
    the request after the cold one (target held, the server scale moved by the cold request) takes it without a
    search: the same decision and, every op on the server, the same prediction as a search."""
    g = CostGraph.from_json(DATA / "resnet18.json").scaled(ue=10.0)
    link = Link(400.0, rtt_ms=5.0)
    mk = dict(fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=8)
    quick, plain = DecisionCache("auto", **mk), DecisionCache("auto", held_shortcut=False, **mk)
    scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0}
    for dc in (quick, plain):
        first = dc.decide(ServerState(), Shares(), costs=g, base=g, link=link, ue_cpu=None, scale=dict(scale), n=0)
    assert first.warm_target and not first.details.get("warm_target_held")
    assert quick._held_ahead is not None and plain._held_ahead is None
    scale["server"] = 1.34
    held = ServerState(held=frozenset(g.weights))
    kw = dict(costs=g.scaled(server=1.34), base=g, link=link, ue_cpu=None, scale=dict(scale))
    got, want = quick.decide(held, Shares(), n=1, **kw), plain.decide(held, Shares(), n=1, **kw)
    assert got.details["plan_why"] == "scale: server 1 -> 1.34 (warm target held: no search)"
    assert want.details["plan_why"] == "scale: server 1 -> 1.34"
    assert _decision(got) == _decision(want)
    assert _close(got.predicted_ms, want.predicted_ms) and _close(got.warm_ms, want.warm_ms)
    # the residual moves past its threshold two requests later: the last decision, moved, again without a search
    scale["transport_ms"] = 15.4
    kw = dict(costs=g.scaled(server=1.34), base=g, link=link, ue_cpu=None, scale=dict(scale))
    got, want = quick.decide(held, Shares(), n=3, **kw), plain.decide(held, Shares(), n=3, **kw)
    assert got.details["plan_why"].endswith("(warm target held: no search)")
    assert _decision(got) == _decision(want) and _close(got.predicted_ms, want.predicted_ms)
    # a slower server past the request-level guard: the search turns local, and so does the shortcut (it searches)
    scale["server"] = 100.0
    kw = dict(costs=g.scaled(server=100.0), base=g, link=link, ue_cpu=None, scale=dict(scale))
    got, want = quick.decide(held, Shares(), n=4, **kw), plain.decide(held, Shares(), n=4, **kw)
    assert not want.server_ops and _decision(got) == _decision(want)
    assert "no search" not in got.details["plan_why"]


def test_a_real_client_takes_the_held_answer_and_answers_like_the_eager_model(server):
    """resnet18 on a real server, policy auto on a 10x-slowed UE (every op goes to the server), a fixed planning
    link and send cost (no probe), decisions inline: request 1 (the target uploaded by
    the cold request) decides without a search, and every answer is the eager module's."""
    with CoinferClient("torchvision:resnet18", server=server.address, tenant=new_tenant(), policy="auto",
                       ue_slowdown=10.0, link=(400.0, 5.0), plan_background=False, probe=False,
                       send_cpu=UeCpu(send_ms_per_byte=1e-6, shared=False),
                       transport_memory=False) as c:
        x = c.example_inputs[0].clone()
        c(x)
        c.engine.wait_uploads(60)
        ys = [c(x) for _ in range(4)]
        ref = c.eager(x)
        for y in ys:
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        reps = c.reports
        why = [(r.plan_why, r.server_ops, r.fallback_reason) for r in reps]
        assert reps[1].plan_why.endswith("(warm target held: no search)"), why
        assert reps[1].server_ops == len(c.graph.ops)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_answer_made_ahead_outlives_the_searches_before_the_target_is_held(name):
    """Session 16's grid: between the decision planned ahead (n = 0) and the request that finds the warm target
    held, requests searched (the target's upload in flight, a server-scale drift); the answer made ahead for the
    held target is kept through them (same target), and the request that finds it held takes it without a
    search: the decision of a cache without the shortcut, the same prediction where every op is on the server
    (within the server part's move otherwise). Then the UE's scale drifts past its threshold: where the target is
    every op, no search either (the local time moved by the scale's ratio), elsewhere a search; the same
    decision both ways."""
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    every = frozenset(op.name for op in g.ops)
    mk = dict(fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=8)
    quick, plain = DecisionCache("auto", **mk), DecisionCache("auto", held_shortcut=False, **mk)
    scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0}
    got_ahead = 0
    for mbps in (100.0, 400.0):
        link = Link(mbps, rtt_ms=20.0)
        for dc in (quick, plain):
            dc.__init__("auto", held_shortcut=dc.held_shortcut, **mk)
        scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0}

        def both(state, n, scale=scale, link=link, mbps=mbps):
            kw = dict(costs=g.scaled(ue=scale["ue"], server=scale["server"]), base=g, link=link, ue_cpu=None,
                      scale=dict(scale))
            a, b = quick.decide(state, Shares(), n=n, **kw), plain.decide(state, Shares(), n=n, **kw)
            assert _decision(a) == _decision(b), (name, mbps, n, a.details["plan_why"], b.details["plan_why"])
            assert _state(quick) == _state(plain), (name, mbps, n)
            return a, b

        first, _ = both(ServerState(), 0)
        if not first.warm_target or quick._held_ahead is None:
            continue
        t = first.warm_target
        ahead = quick._held_ahead
        # request 1 with part of the target's weights up and more in flight: a search (both caches)
        tw = sorted(quick._target_weights(g, t))
        part = frozenset(tw[: len(tw) // 2])
        a, _ = both(ServerState(held=part, in_flight={tw[-1]: g.weights[tw[-1]] // 2}), 1)
        assert "no search" not in a.details["plan_why"]
        # request 2: the server scale moved (the cold request's calibration), still not all held: a search
        scale["server"] = 1.34
        a, _ = both(ServerState(held=part), 2)
        assert "no search" not in a.details["plan_why"]
        assert quick._held_ahead is ahead  # kept through the searches towards the same target
        # request 3 finds the target held: the answer made ahead, moved to the server scale of now
        held = ServerState(held=frozenset(g.weights))
        a, b = both(held, 3)
        if not b.details.get("warm_target_held"):
            continue
        got_ahead += 1
        assert a.details["plan_why"].endswith("(warm target held: no search)"), a.details["plan_why"]
        if t == every:
            assert _close(a.predicted_ms, b.predicted_ms) and _close(a.local_ms, b.local_ms)
        else:
            assert abs(a.predicted_ms - b.predicted_ms) <= a.details["server_ms"] + 1e-6
        # request 4: the UE's scale past its drift threshold (a local run's calibration)
        scale["ue"] = 1.5
        a, b = both(held, 4)
        assert a.details["plan_why"].startswith("scale: ue 1 -> 1.5")
        assert ("no search" in a.details["plan_why"]) == (t == every and bool(b.server_ops))
        if t == every and b.server_ops:
            assert _close(a.predicted_ms, b.predicted_ms) and _close(a.local_ms, b.local_ms)
    assert got_ahead >= 1


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_held_answer_follows_a_send_cost_move_that_moves_nothing(name):
    """Session 20's testbed: the request after the cold upload searched (0.67-1.1 ms of CPU on a 10 % UE, 'held
    answer: send cost') because the upload's samples had moved the send-cost estimate by less than its drift
    threshold. Where the held target is every op and neither cost caps the link, the held answer follows that move
    (``_send_moves_nothing``): random streams with the send cost moving by -20 % to +40 % at each request, around
    costs far from the link's rate and around the one at which sending caps it (crossing it), the server scale and
    the residual moving, the shares now and then: every decision is the search's, the caches in step, the
    prediction exact where the answer came without a search; and such answers happen (the test fails without the
    rule), some across a send-cost move."""
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    every = frozenset(op.name for op in g.ops)
    hits = moved = 0
    for seed in range(12):
        rng = random.Random(1000 + seed)
        mbps = rng.choice([100.0, 400.0])
        link = Link(mbps, rtt_ms=rng.choice([5.0, 20.0]))
        cap = 1.0 / (mbps * 125.0)  # the send cost (ms per byte) whose CPU-bound rate is the link's
        send = cap * rng.choice([0.05, 0.9, 1.05])
        mk = dict(fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=rng.choice([8, 20]))
        plain = DecisionCache("auto", held_shortcut=False, **mk)
        quick = DecisionCache("auto", held_shortcut=True, **mk)
        scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0,
                 "transport_se_ms": 0.0}
        held: frozenset[str] = frozenset()
        share = Shares()
        for n in range(0, 10):
            before = send
            if n:
                send *= rng.choice([0.8, 0.95, 1.0, 1.1, 1.4])
                if rng.random() < 0.1:
                    share = Shares(compute=rng.choice([1.0, 0.5]), uplink=rng.choice([1.0, 0.5]))
            ue_cpu = UeCpu(send_ms_per_byte=send, shared=True)
            st = ServerState(held=held)
            kw = dict(costs=lambda s=dict(scale): g.scaled(ue=s["ue"], server=s["server"]), base=g, link=link,
                      ue_cpu=ue_cpu, scale=dict(scale), measured_cv=None, ue_cv=None)
            want = plain.decide(st, share, n=n, **kw)
            got = quick.decide(st, share, n=n, **kw)
            assert _decision(got) == _decision(want), (seed, n)
            assert _state(quick) == _state(plain), (seed, n)
            if "no search" in got.details.get("plan_why", ""):
                hits += 1
                moved += send != before
                assert got.server_ops == every
                for f in ("predicted_ms", "warm_ms", "serial_ms", "local_ms"):
                    assert _close(getattr(got, f), getattr(want, f)), (seed, n, f)
                # (``uncorrected_ms`` is the answer's as made, as for the server scale's moves: not refreshed)
                for k in ("server_ms", "mean_ms", "transport_base_ms", "transport_floor_ms", "send_ms_per_byte",
                          "effective_uplink_mbps", "send_steal_ms"):
                    assert _close(got.details[k], want.details[k]), (seed, n, k)
            held = held | frozenset(w for op in g.ops if op.name in got.server_ops for w in op.weights)
            held |= frozenset(got.upload_order) | frozenset(got.background)
            if rng.random() < 0.5:
                scale = {**scale, "server": scale["server"] * rng.choice([0.97, 1.05, 1.34]),
                         "transport_ms": scale["transport_ms"] + rng.choice([-1.0, 2.0, 15.0])}
    assert hits >= 5 and moved >= 3, (hits, moved)


def test_a_send_cost_move_that_moves_nothing_moves_nothing_on_random_dags():
    """``held_shortcut._send_moves_nothing`` itself, on random DAGs (``tests.test_partitioner_online.small_dag``): the
    held target every op and its weights held, uplinks, uplink and tensor shares, send costs on both sides of the
    link's cap, the UE as profiled or 30x slower (the target taken, or the guard turning it local); where the rule
    says a move from s0 to s1 moves nothing, ``auto``'s search gives the same decision and the same predictions at
    both; where it does not, the predictions differ in some draws (the rule's rate
    condition is needed)."""
    from tests.test_partitioner_online import small_dag
    from ue_client import planning
    from ue_client.held_shortcut import _send_moves_nothing

    same = differ = held = 0
    for seed in range(240):
        if seed % 5 == 0:  # (small_dag pins ops there: not every op may go to the server)
            continue
        rng = random.Random(seed)
        g = small_dag(seed).scaled(ue=rng.choice([1.0, 30.0]))  # (a slow UE: the held target beats local)
        every = frozenset(op.name for op in g.ops)
        link = Link(rng.choice([5.0, 50.0, 400.0]), rtt_ms=rng.choice([2.0, 20.0]))
        share = Shares(compute=rng.choice([1.0, 0.5]), uplink=rng.choice([1.0, 0.5]),
                       tensor_uplink=rng.choice([None, 0.3, 1.0]))
        cap = 1.0 / (link.uplink_mbps * 125.0)
        s0, s1 = (cap * rng.choice([0.02, 0.5, 0.9, 1.1, 2.0, 5.0]) for _ in range(2))
        st = ServerState(held=frozenset(g.weights))

        def plan(s, g=g, link=link, st=st, share=share, every=every):
            return planning.choose("auto", g, link, state=st, share=share, target=every,
                                   ue_cpu=UeCpu(send_ms_per_byte=s, shared=True), horizon=8)

        a, b = plan(s0), plan(s1)
        held += a.server_ops == every
        fields = (a.predicted_ms, a.warm_ms, a.serial_ms, a.local_ms, a.details["mean_ms"])
        other = (b.predicted_ms, b.warm_ms, b.serial_ms, b.local_ms, b.details["mean_ms"])
        if _send_moves_nothing(g, every, link, share, s0, s1):
            same += 1
            assert _decision(a) == _decision(b), seed
            assert all(_close(x, y) for x, y in zip(fields, other, strict=True)), (seed, fields, other)
        elif not all(_close(x, y) for x, y in zip(fields, other, strict=True)):
            differ += 1
    assert same >= 30 and differ >= 10 and held >= 30, (same, differ, held)
