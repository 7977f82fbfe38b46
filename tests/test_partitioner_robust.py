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


# ---- the UE's send cost in robust's moments; the infeasible case ---------------------------------------------
def test_moments_include_the_send_cost_at_the_chosen_frequency():
    """Mean: the shared-CPU simulator (``uecpu.run_shared``) with the ops AND the send cost slowed by the
    frequency's time factor; std: the send time's spread at the profile's relative CPU spread, added to the
    UE part's (one CPU)."""
    from partitioner.robust import Spread, latency_moments
    from partitioner.uecpu import UeCpu, run_shared

    g = risky_chain()
    P = prepare(g)
    r = Rates.of(LINK)
    smask = P.mask_of(frozenset(o.name for o in g.ops[2:]))  # 2 UE ops, a 100 kB cut tensor, warm
    st = ServerState.warm(g)
    cpu = UeCpu(send_ms_per_byte=2e-4)  # 5 ms per 25 kB: CPU-bound below the link's 25 kB/ms
    free = latency_moments(P, smask, r, st)
    at1 = latency_moments(P, smask, r, st, ue_cpu=cpu)
    g2 = 2.0
    at2 = latency_moments(P, smask, r, st, ue_cpu=cpu, g=g2)
    ref, _ = run_shared(P, smask, r, cpu.send_ms_per_byte * g2, "cold", st, a=[x * g2 for x in P.a])
    assert at2.mean_ms == pytest.approx(ref.latency_ms)
    assert free.mean_ms < at1.mean_ms < at2.mean_ms
    sent = 400_000 >> 1
    assert at1.sent_bytes == sent
    # the send time at the lower frequency is twice the nominal one: 2 x 200 kB x 2e-4 ms/B = 80 ms more
    # than the ops alone (the cut tensor is sent after the prefix: nothing overlaps)
    assert at2.mean_ms - latency_moments(P, smask, r, st, g=g2).mean_ms == pytest.approx(
        sent * cpu.send_ms_per_byte * g2 - sent / r.up, rel=1e-6)
    cv = Spread(P).cpu_cv
    assert cv == pytest.approx(2.0 * 5 / 50)  # fully correlated samples: std 10 ms of 50 ms
    assert at2.sd_send_ms == pytest.approx(cv * sent * cpu.send_ms_per_byte * g2)
    assert at2.sd_ue_ms == pytest.approx(g2 * 2 * 2.0)
    assert at2.std_ms == pytest.approx(at2.sd_ue_ms + at2.sd_send_ms)  # no server or link spread here
    assert free.sd_send_ms == 0


def test_robust_accounts_for_the_send_cost_when_it_lowers_the_frequency():
    """Without the send cost, offloading at the lowest frequency looks safe; with it (sending slows with the
    CPU) robust must pick a plan whose mean + k std, send cost included, meets D."""
    from partitioner.robust import latency_moments, robust
    from partitioner.uecpu import UeCpu

    g = risky_chain()
    P = prepare(g)
    em = EnergyModel(freqs_ghz=(0.55, 1.1, 2.2), f_nominal_ghz=2.2, tx_power_w=0.1)
    st = ServerState.warm(g)
    r = Rates.of(LINK)
    cpu = UeCpu(send_ms_per_byte=1e-4)
    D = 200.0
    blind = robust(P, r, st, deadline_ms=D, eps=EPS, energy=em)
    aware = robust(P, r, st, deadline_ms=D, eps=EPS, energy=em, ue_cpu=cpu)
    assert blind.feasible and aware.feasible
    check = latency_moments(P, blind.mask, r, st, g=em.time_factor(blind.freq_ghz), ue_cpu=cpu)
    assert check.mean_ms + cantelli_k(EPS) * check.std_ms > D  # the send-blind choice is unsafe for real
    assert aware.quantile_ms <= D
    m = latency_moments(P, aware.mask, r, st, g=em.time_factor(aware.freq_ghz), ue_cpu=cpu)
    assert aware.mean_ms == pytest.approx(m.mean_ms) and aware.std_ms == pytest.approx(m.std_ms)


def test_infeasible_robust_picks_the_least_miss_bound_and_says_so():
    from partitioner.oracle import partitions
    from partitioner.robust import cantelli_bound, latency_moments, robust

    assert cantelli_bound(50, 20, 100) == pytest.approx(400 / (400 + 2500))
    assert cantelli_bound(100, 1, 100) == 1.0 and cantelli_bound(120, 0, 100) == 1.0
    assert cantelli_bound(90, 0, 100) == 0.0
    g = risky_chain()
    P = prepare(g)
    r = Rates.of(LINK)
    em = EnergyModel(freqs_ghz=(1.1, 2.2), f_nominal_ghz=2.2)
    D = 40.0
    res = robust(P, r, None, deadline_ms=D, eps=0.01, energy=em)  # cold: the weights must go up: no plan meets D
    assert not res.feasible and "infeasible" in res.reason and "least miss bound" in res.reason
    bounds = [cantelli_bound((m := latency_moments(P, s, r, None, g=em.time_factor(f))).mean_ms, m.std_ms, D)
              for s in partitions(P) for f in em.freqs_ghz]
    assert res.miss_bound == pytest.approx(min(bounds))
    assert res.miss_bound > 0.01
    ok = robust(P, r, ServerState.warm(g), deadline_ms=1000, eps=EPS, energy=em)
    assert ok.feasible and ok.miss_bound <= EPS
