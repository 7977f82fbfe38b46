"""Robust planner: Cantelli sizing holds for the worst-case two-point law; a Gaussian quantile can miss."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from partitioner.costgraph import CostGraph, Link, OpCost
from partitioner.errors import PartitionerError
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.robust import EnergyModel, cantelli_k
from partitioner.simulate import Rates, run
from partitioner.state import ServerState


def risky_chain() -> CostGraph:
    """Five UE ops of mean 10 ms, std 2 ms each, fully correlated (prefix std = sum of stds); later cuts
    send fewer bytes, so deeper (riskier) splits save transmit energy."""
    ops, rows = [], []
    prev = "x"
    for i in range(5):
        a, s = 10.0, 2.0
        ops.append(OpCost(name=f"op{i}", inputs=(prev,), weights=(f"w{i}",), out_bytes=400_000 >> i, ue_ms=a,
                          ue_var=s * s, server_ms=3.0, server_var=0.0))
        rows.append((a + s / math.sqrt(2), a - s / math.sqrt(2)))  # sample variance (ddof=1) = s^2
        prev = ops[-1].name
    return CostGraph(ops=tuple(ops), inputs={"x": 1_000_000}, outputs=(prev,),
                     weights={f"w{i}": 1_000_000 for i in range(5)}, ue_samples_ms=tuple(rows))


EM = EnergyModel(freqs_ghz=(2.2,), f_nominal_ghz=2.2, tx_power_w=10.0)
LINK = Link(200.0, rtt_ms=10.0)
EPS = 0.05


def two_point(p: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Standardised worst-case law of Cantelli: mean 0, variance 1, P(X = sqrt((1-p)/p)) = p."""
    hi, lo = math.sqrt((1 - p) / p), -math.sqrt(p / (1 - p))
    return np.where(rng.random(size) < p, hi, lo)


def mc_miss(g: CostGraph, p_plan, p: float, deadline: float, n: int = 20_000) -> float:
    """Monte Carlo P(T > D): draw the per-op UE times comonotonically, simulate each distinct draw."""
    P = prepare(g)
    r = Rates.of(LINK)
    state = ServerState.warm(g)
    m = P.mask_of(p_plan.server_ops)
    xs = two_point(p, n, np.random.default_rng(7))
    cache = {}
    lat = np.empty(n)
    for j, x in enumerate(xs):
        if x not in cache:
            a = [op.ue_ms + math.sqrt(op.ue_var) * x for op in g.ops]
            cache[x] = run(P, m, r, "cold", state, a=a).latency_ms
        lat[j] = cache[x]
    return float((lat > deadline + 1e-9).mean())


def test_cantelli_plan_meets_chance_constraint_and_gaussian_misses():
    g = risky_chain()
    state = ServerState.warm(g)
    D = 70.0
    cp = plan("robust", g, LINK, state=state, deadline_ms=D, eps=EPS, energy=EM)
    gp = plan("robust", g, LINK, state=state, deadline_ms=D, eps=EPS, energy=EM, quantile="gaussian")
    assert cp.feasible and gp.feasible
    assert cp.server_ops != gp.server_ops  # the Gaussian sizing takes the risky low-energy plan
    assert gp.energy_mj < cp.energy_mj
    k = cantelli_k(EPS)
    assert cp.details["mean_ms"] + k * cp.details["std_ms"] <= D + 1e-9
    tol = 3 * math.sqrt(EPS * (1 - EPS) / 20_000)
    for p in (EPS / 4, EPS / 2, EPS, 2 * EPS, 0.2, 0.5):
        assert mc_miss(g, cp, p, D) <= EPS + tol, p
    # the Gaussian plan misses under the two-point law with p just above eps
    mu, sd = gp.details["mean_ms"], gp.details["std_ms"]
    p_star = 1 / (1 + ((D - mu) / sd) ** 2)
    assert p_star > EPS
    p_bad = (EPS + p_star) / 2
    assert mc_miss(g, gp, p_bad, D) > EPS + tol


def test_robust_mean_and_std_match_simulation():
    g = risky_chain()
    p = plan("robust", g, LINK, state=ServerState.warm(g), deadline_ms=1000, eps=EPS, energy=EM)
    m = prepare(g).mask_of(p.server_ops)
    n_ue = sum(1 for i in range(5) if not m >> i & 1)
    assert p.details["std_ms"] == pytest.approx(2.0 * n_ue)
    assert p.details["mean_ms"] == pytest.approx(p.cold_ms)


def test_robust_infeasible_deadline_is_reported():
    g = risky_chain()
    p = plan("robust", g, LINK, state=ServerState.warm(g), deadline_ms=5.0, eps=EPS, energy=EM)
    assert not p.feasible
    assert "infeasible" in p.reason and "D = 5 ms" in p.reason


def test_lower_frequency_saves_energy_when_deadline_allows():
    g = risky_chain()
    em = EnergyModel(freqs_ghz=(1.0, 1.6, 2.2), f_nominal_ghz=2.2, tx_power_w=10.0)
    loose = plan("robust", g, LINK, state=ServerState.warm(g), deadline_ms=10_000, eps=EPS, energy=em)
    tight = plan("robust", g, LINK, state=ServerState.warm(g), deadline_ms=100, eps=EPS, energy=em)
    assert loose.frequency_ghz == 1.0
    assert loose.energy_mj <= tight.energy_mj
    assert tight.details["objective_ms"] <= 100  # the quantile (the prediction is the mean latency)


def test_robust_is_exact_on_small_graphs():
    g = risky_chain()
    p = plan("robust", g, LINK, state=ServerState.warm(g), deadline_ms=70.0, eps=EPS, energy=EM)
    assert p.exact is True
    assert p.details["evaluated"] == p.details["candidates"] == 6  # 5 ops in a chain: 6 splits


@pytest.mark.slow
def test_robust_stops_near_its_time_budget():
    """Timed (out of the default run: a loaded machine stretches it)."""
    from partitioner.synthetic import random_dag

    g = random_dag(4, 1000, "residual", speedup=10.0)
    local = sum(op.ue_ms for op in g.ops)
    t0 = time.perf_counter()
    plan("robust", g, Link(20.0, rtt_ms=10.0), deadline_ms=2 * local, eps=EPS, budget_s=0.3)
    assert time.perf_counter() - t0 < 0.3 + 1.5  # the budget, plus one candidate at every frequency


def test_robust_respects_its_time_budget_and_says_it_is_not_exact():
    from partitioner.synthetic import random_dag

    g = random_dag(4, 1000, "residual", speedup=10.0)
    link = Link(20.0, rtt_ms=10.0)
    local = sum(op.ue_ms for op in g.ops)
    p = plan("robust", g, link, deadline_ms=2 * local, eps=EPS, budget_s=0.3)
    assert p.exact is False
    assert p.feasible  # the link's own min-cut and local-only are scored first
    assert 1 <= p.details["evaluated"] < p.details["candidates"]
    assert p.reason == ""
    assert p.details["objective_ms"] <= 2 * local
    longer = plan("robust", g, link, deadline_ms=2 * local, eps=EPS, budget_s=0.9)
    assert longer.details["evaluated"] >= p.details["evaluated"]
    assert longer.energy_mj <= p.energy_mj + 1e-9  # same order of candidates: a longer prefix
    with pytest.raises(PartitionerError, match="budget_s"):
        plan("robust", g, link, deadline_ms=local, budget_s=0)
