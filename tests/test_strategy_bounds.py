"""``auto``'s strategy searches skipped by bounds (``ue_client.planning.PRUNE``, session 29c): a tail's investment
(``_invest_cannot_win``, from per-op sums before its partition is compiled), the whole gradual walk
(``_gradual_bound``) and the prefetch candidates bounded above the margin's bar. Pruned and unpruned give the same
answers field by field: the recorded real-client calls of session 29b, ``choose`` over random DAGs x links x
compute shares x send costs x held sets (none, a third, random with weights in flight) x horizons, and the
captured resnet18 / mobilenet_v2 graphs over a grid; the strategy functions themselves with limits set at and
around their answers (ties); and the bounds below what they bound."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link
from partitioner.simulate import Rates
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import SEND_SHARE, UeCpu, effective_link
from tests.checks import chunks
from tests.decision_grid import captured_grid, held_states, recorded_calls
from ue_client import planning

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "costgraphs"
CALLS = ROOT / "docs/results/decisions/session29b/calls.pkl"
RECORDED_COSTS = ROOT / "docs/results/cold/session10/costgraphs"


def _fields(c: planning.PlanChoice) -> dict:
    d = dict(vars(c))
    d.pop("decision_ms")
    return d


def _choose(prune: bool, monkeypatch, *a, **kw) -> planning.PlanChoice:
    monkeypatch.setattr(planning, "PRUNE", prune)
    return planning.choose(*a, **kw)


def _same_choice(monkeypatch, g: CostGraph, link: Link, **kw) -> planning.PlanChoice:
    """``choose("auto", ...)`` pruned and unpruned, each on a fresh copy of the graph (no memo shared); the
    same fields (``decision_ms`` aside), the same floats."""
    a = _choose(False, monkeypatch, "auto", g.scaled(ue=1.0), link, **kw)
    b = _choose(True, monkeypatch, "auto", g.scaled(ue=1.0), link, **kw)
    fa, fb = _fields(a), _fields(b)
    assert fa == fb, {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
    return b


@pytest.mark.skipif(not CALLS.exists(), reason="session 29b's recorded calls are not in this checkout")
def test_the_recorded_real_client_calls_answer_the_same(monkeypatch):
    """Session 29b's six ``planning.choose`` calls of a real client (googlenet, resnet18, auto, 400 Mbit/s):
    pruned and unpruned equal field by field, and equal to what the client got."""
    for costs, link, kw, c in recorded_calls(CALLS, RECORDED_COSTS):
        got = _same_choice(monkeypatch, costs, link, **kw)
        assert sorted(got.server_ops) == c["server_ops"]
        assert got.predicted_ms == c["predicted_ms"] and got.background == c["background"]


def _random_inputs(seed: int):
    rng = random.Random(seed)
    g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0, 30.0]))
    wsum = sum(g.weights.values()) or 1
    ue = sum(o.ue_ms for o in g.ops) or 1.0
    base = wsum / ue / 125.0  # Mbit/s at which the weights go up in one local run
    return rng, g, wsum, ue, base


@pytest.mark.parametrize("chunk", chunks(4, 2))  # 2, 3 slow: chunks 0, 1 are the same check on 100 other DAGs
def test_choose_is_the_same_pruned_on_random_dags(chunk, monkeypatch):
    """50 random DAGs per chunk x 3 links x shares x send costs x 3 held sets x 4 horizons (and a lost-latency
    rent-or-buy without a horizon): every answer the same; the pruning skipped something in some of them."""
    skipped = [0, 0]
    real_gb, real_icw = planning._gradual_bound, planning._invest_cannot_win

    def gb(*a, **k):
        skipped[0] += 1
        return real_gb(*a, **k)

    def icw(*a, **k):
        got = real_icw(*a, **k)
        skipped[1] += got and planning.PRUNE
        return got

    monkeypatch.setattr(planning, "_gradual_bound", gb)
    monkeypatch.setattr(planning, "_invest_cannot_win", icw)
    n = 0
    for seed in range(chunk * 50, chunk * 50 + 50):
        rng, g, wsum, ue, base = _random_inputs(seed)
        for f in (0.05, 0.5, 4.0):
            link = Link(max(1e-3, base * f * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
            share = Shares(compute=rng.choice([1.0, 0.5, 0.2]))
            cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
            for st in held_states(rng, g):
                for h in (2, 3, 8, 40, None):
                    _same_choice(monkeypatch, g, link, state=st, share=share, ue_cpu=cpu, horizon=h,
                                 lost_ms=rng.choice([0.0, ue]))
                    n += 1
    assert n >= 50 * 3 * 3 * 5
    assert skipped[0] > 0 and skipped[1] > 0, skipped


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_choose_is_the_same_pruned_on_captured_graphs(name, monkeypatch):
    g0 = CostGraph.from_json(DATA / f"{name}.json")
    for g, link, kw in captured_grid(g0, random.Random(11)):
        _same_choice(monkeypatch, g, link, **kw)


def _gradual_inputs(seed: int):
    """(score, target, r_plan) of a random DAG, link, share, send cost and held set: ``auto``'s gradual search's."""
    rng, g, wsum, ue, base = _random_inputs(seed)
    link = Link(max(1e-3, base * rng.choice([0.1, 1.0, 5.0]) * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
    share = Shares(compute=rng.choice([1.0, 0.5]))
    cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
    st = list(held_states(rng, g))[seed % 3 if g.weights else 0]
    score = planning._Score(g, link, cpu, st, share, True)
    r_plan = Rates.of(effective_link(link, cpu), share)
    tmask = score.table.decide(score.P, r_plan, None, "warm")[0]
    return rng, score, score.names(tmask), r_plan


@pytest.mark.parametrize("chunk", range(3))
def test_the_gradual_search_is_the_same_pruned_at_its_limits(chunk, monkeypatch):
    """``_gradual_best`` pruned and unpruned with the limit at infinity, at the unpruned answer's total and a
    relative 1e-12 either side of it (the tie and its neighbours), at the bound itself, and below: the same
    answer, field by field; and the bound is at most every total the exhaustive walk weighs (its best)."""
    pruned = 0
    for seed in range(chunk * 80, chunk * 80 + 80):
        _, score, target, r_plan = _gradual_inputs(seed)
        if not target:
            continue
        now = score.local_ms
        for h in (2, 3, 5, 12, 40):
            monkeypatch.setattr(planning, "PRUNE", False)
            free = planning._gradual_best(score, target, 1e18, h, 0.0, r_plan)  # no limit: the best total
            if free is None:
                continue
            best = free["total_ms"]
            order, front = planning._gradual_front(score, score.mask(target), r_plan,
                                                   score.state or ServerState())
            cpu = score.ue_cpu
            s, R = cpu.send_ms_per_byte, score.r.up
            both, up_wait, ell = min(R, SEND_SHARE / s), min(R, 1.0 / s), score.local_ms
            W = float(sum(b for _, b in order))
            bound = None
            if front and front[0][0] > 0:
                bound = planning._gradual_bound(score, front, W, ell, s, both * ell / (1.0 - both * s), both,
                                                up_wait, score(target, "warm").latency_ms, h)
                assert bound * planning._SAFE <= best, (seed, h, bound, best)
            for beat in {math.inf, best, best * (1 + 1e-12), best * (1 - 1e-12), 0.5 * best,
                         bound if bound is not None else best, 0.97 * h * now}:
                for margin in (0.0, 0.2):
                    monkeypatch.setattr(planning, "PRUNE", False)
                    ref = planning._gradual_best(score, target, now, h, margin, r_plan, beat=beat)
                    monkeypatch.setattr(planning, "PRUNE", True)
                    got = planning._gradual_best(score, target, now, h, margin, r_plan, beat=beat)
                    assert got == ref, (seed, h, beat, margin, got, ref)
                    pruned += bound is not None and bound * planning._SAFE >= min(beat, (1 - margin) * h * now)
    assert pruned > 0


@pytest.mark.parametrize("chunk", range(2))
def test_the_investment_is_the_same_pruned_and_its_bound_is_below(chunk, monkeypatch):
    """``_invest_best`` over the warm target and the suffix tails, pruned and unpruned: the same (invest, why,
    target) and details; ``_prefetch_best`` the same at margins 0 and 0.2; and each suffix's bounds at most its
    evaluations."""
    for seed in range(chunk * 80, chunk * 80 + 80):
        _, score, target, r_plan = _gradual_inputs(seed)
        if not target:
            continue
        tails = score.table.suffix_targets(score.P, r_plan, score.state)
        cands = [target] + [t for t in tails if t != target]
        sb = planning._suffix_bounds(score)
        for t in tails:
            k = sb.suffix_k(t)
            assert k is not None
            w = sb.warm(k)
            assert w * planning._SAFE <= score(t, "warm").latency_ms
            assert max(w, sb.cold_weights(k)) * planning._SAFE <= score(t).latency_ms
        for now in (score.local_ms, 0.5 * score.local_ms, score(target).latency_ms):
            for h in (2, 4, 8, 40, None):
                out = []
                for prune in (False, True):
                    monkeypatch.setattr(planning, "PRUNE", prune)
                    det: dict = {}
                    got = planning._invest_best(score, cands, now, h, 0.5 * now, 0.2, det)
                    out.append((got, det))
                assert out[0] == out[1], (seed, now, h, out)
                if h is None:
                    continue
                for margin in (0.0, 0.2):
                    pf = []
                    for prune in (False, True):
                        monkeypatch.setattr(planning, "PRUNE", prune)
                        pf.append(planning._prefetch_best(score, cands[:1], now, h, margin))
                    assert pf[0] == pf[1], (seed, now, h, margin, pf)
