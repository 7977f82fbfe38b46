"""``auto``'s prefetch search (``ue_client.planning._prefetch_best``) prunes its candidate numbers of local
requests with a lower bound (``OnlineTable.prefetch_bounds``): it must give exactly what evaluating every
m gives (the search before the bound, kept here as the reference), on random DAGs and the captured graphs,
over a grid of links, compute shares, send costs, held sets and horizons; and the bound must be one."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link
from partitioner.simulate import Rates
from partitioner.state import ServerState, Shares
from partitioner.synthetic import KINDS, random_dag
from partitioner.uecpu import SEND_SHARE, UeCpu
from tests.checks import chunks
from tests.decision_grid import held_states
from ue_client import planning

DATA = Path(__file__).parent / "data" / "costgraphs"


def exhaustive(score, targets, now_ms, horizon, margin):
    """``_prefetch_best`` without the bound: one evaluation per candidate, every m with all its local requests
    carry (the search of session 9, a159047) and every tail of ``_tail_cuts`` on the fewest local requests that
    carry the rest (session 20)."""
    cpu = score.ue_cpu
    s = cpu.send_ms_per_byte
    both = min(score.r.up, SEND_SHARE / s)
    ell = score.local_ms
    x_max = both * ell / (1.0 - both * s)
    state = score.state if score.state is not None else ServerState()
    weights = score.costs.weights
    best = None
    best_key = None
    for ti, t in enumerate(targets):
        warm_t = score(t, "warm").latency_ms
        if warm_t >= now_ms:
            continue
        order = tuple(w for w in score.order(t) if w in weights)
        sizes = [(w, state.remaining_bytes(w, weights[w])) for w in order]
        W = float(sum(b for _, b in sizes))
        if W <= 0:
            continue
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
        cands = [(m, sents[m - 1], False) for m in range(1, len(sents) + 1)]
        for y in planning._tail_cuts(sizes, warm_t * min(score.r.up, 1.0 / s)):
            X = W - y
            m = next((k for k in range(1, len(sents) + 1) if sents[k - 1] >= X), None)
            if m is not None and (sents[m - 2] if m > 1 else 0.0) < X < sents[m - 1]:
                cands.append((m, X, True))
        for m, X, tail in cands:
            pre = pres[m - 1] - s * (sents[m - 1] - X) if tail else pres[m - 1]
            cold = score.with_state(t, planning.prefetched_state(state, sizes, X)).latency_ms
            total = pre + cold + (horizon - m - 1) * warm_t
            key = (total, ti, m, W - X if tail else 0.0)
            if best_key is None or key < best_key:
                best_key = key
                bg = order
                if tail:
                    acc, n = 0.0, 0
                    for _, b in sizes:
                        if acc + b > X + 0.5:
                            break
                        acc += b
                        n += 1
                    bg = order[:n]
                first = min(X, x_max)
                best = {"total_ms": total, "now_ms": ell + s * first, "bytes": first, "requests": m,
                        "target": t, "background": bg, "tail_bytes": W - X if tail else 0.0}
    if best is None or not best["total_ms"] < (1 - margin) * horizon * now_ms:
        return None
    return best


def _target_held_states(rng: random.Random, g: CostGraph, target: frozenset[str]):
    return held_states(rng, g, {w for op in g.ops if op.name in target for w in op.weights})


def compare(g: CostGraph, link: Link, share: Shares, cpu: UeCpu, state, horizon: int, counts: list[int]) -> bool:
    """Both searches on one input; True when the prefetch search had a target to weigh."""
    score = planning._Score(g, link, cpu, state, share, True)
    table = score.table
    P = score.P
    tmask = table.decide(P, Rates.of(link, share), None, "warm")[0]
    if not tmask:
        return False
    targets = [score.names(tmask)]
    targets += [t for t in table.suffix_targets(P, Rates.of(link, share), state) if t not in targets][:2]
    now = score.local_ms  # never investing: every request local
    calls = [0]
    real = score.with_state

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    score.with_state = counted
    fast = planning._prefetch_best(score, targets, now, horizon, 0.0)
    n_fast = calls[0]
    ref = exhaustive(score, targets, now, horizon, 0.0)
    counts.append((n_fast, calls[0] - n_fast))
    assert (fast is None) == (ref is None), (fast, ref)
    if ref is not None:
        assert fast == ref
    return True


@pytest.mark.parametrize("chunk", chunks(4, 2))  # 2, 3 slow: chunks 0, 1 are the same check on 120 other DAGs
def test_the_bounded_prefetch_search_equals_evaluating_every_m_on_random_dags(chunk):
    """60 random DAGs per chunk x links x compute shares x send costs x held sets x horizons (bounded: ~3 s
    a chunk on this machine)."""
    counts: list = []
    weighed = 0
    for seed in range(chunk * 60, chunk * 60 + 60):
        rng = random.Random(seed)
        g = random_dag(seed, 6 + seed % 20, KINDS[seed % len(KINDS)])
        g = g.scaled(ue=rng.choice([1.0, 10.0, 30.0]))
        wsum = sum(g.weights.values()) or 1
        ue = sum(o.ue_ms for o in g.ops) or 1.0
        base = wsum / ue / 125.0  # Mbit/s at which the weights go up in one local run
        for f in (0.05, 0.5, 4.0):
            link = Link(max(1e-3, base * f * rng.uniform(0.5, 2.0)), rtt_ms=rng.choice([2.0, 20.0]))
            share = Shares(compute=rng.choice([1.0, 0.5, 0.2]))
            cpu = UeCpu(send_ms_per_byte=rng.choice([2e-6, 2e-5, 2e-4]) * ue / wsum * 1e3)
            target = frozenset(o.name for o in g.ops)
            for st in _target_held_states(rng, g, target):
                for h in (2, 8, 30, 100):
                    weighed += compare(g, link, share, cpu, st, h, counts)
    assert weighed > 100
    # the bound prunes: fewer evaluations than one per m over the grid
    assert sum(a for a, _ in counts) < sum(b for _, b in counts)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_the_bounded_prefetch_search_equals_evaluating_every_m_on_captured_graphs(name):
    g0 = CostGraph.from_json(DATA / f"{name}.json")
    rng = random.Random(7)
    counts: list = []
    for slow in (1.0, 10.0):
        g = g0.scaled(ue=slow)
        for up in (5.0, 20.0, 100.0, 400.0):
            for sh in (1.0, 0.5):
                for s in (2e-6, 2e-5):
                    link, share, cpu = Link(up, rtt_ms=20.0), Shares(compute=sh), UeCpu(send_ms_per_byte=s)
                    score = planning._Score(g, link, cpu, None, share, True)
                    t = score.names(score.table.decide(score.P, Rates.of(link, share), None, "warm")[0])
                    for st in _target_held_states(rng, g, t):
                        for h in (3, 30, 100):
                            compare(g, link, share, cpu, st, h, counts)
    fast, full = sum(a for a, _ in counts), sum(b for _, b in counts)
    assert fast < full / 2, (fast, full)


@pytest.mark.parametrize("seed", range(40))
def test_prefetch_bounds_are_below_the_evaluations(seed):
    """``OnlineTable.prefetch_bounds`` never exceeds the cold prediction after the same prefetch."""
    rng = random.Random(seed)
    g = random_dag(seed, 5 + seed % 15, KINDS[seed % len(KINDS)]).scaled(ue=rng.choice([1.0, 10.0]))
    wsum = sum(g.weights.values()) or 1
    ue = sum(o.ue_ms for o in g.ops) or 1.0
    link = Link(max(1e-3, wsum / ue / 125.0 * 2 ** rng.uniform(-4, 4)), rtt_ms=rng.uniform(0, 30))
    share = Shares(compute=rng.choice([1.0, 0.3]))
    for s in (0.0, ue / wsum * rng.uniform(0.01, 3.0)):
        cpu = UeCpu(send_ms_per_byte=s) if s else None
        score = planning._Score(g, link, cpu, None, share, True)
        for mask in {score.table.decide(score.P, score.r, None, "warm")[0], (1 << len(g.ops)) - 1}:
            t = score.names(mask)
            order = tuple(w for w in score.order(t) if w in g.weights)
            sizes = [(w, g.weights[w]) for w in order]
            W = float(sum(b for _, b in sizes))
            xs = sorted({0.0, W, *(rng.uniform(0, W) for _ in range(6))})
            lbs = score.table.prefetch_bounds(score.P, mask, score.r, None, s, xs)
            for x, lb in zip(xs, lbs, strict=True):
                v = score.with_state(t, planning.prefetched_state(None, sizes, x)).latency_ms
                assert lb <= v * (1 + 1e-12) + 1e-12, (x, lb, v)
                assert math.isfinite(lb)
