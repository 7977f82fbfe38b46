"""Multi-UE allocation: exact for fixed partitions (vs scipy.optimize), never worse than equal shares,
and the alternation with re-planning is monotone."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from scipy.optimize import minimize

from partitioner.allocation import Allocator, UeDemand, UeProblem, allocate_fixed, ara, equal_shares
from partitioner.costgraph import Link
from partitioner.errors import PartitionerError
from partitioner.synthetic import random_dag


def rand_demands(seed: int) -> list[UeDemand]:
    rng = random.Random(seed)
    out = []
    for i in range(rng.randint(2, 6)):
        out.append(UeDemand(f"u{i}", rng.uniform(0.5, 3), rng.uniform(0, 50), rng.uniform(0, 80),
                            rng.uniform(0.1, 20), rng.uniform(0.1, 40), rng.uniform(0, 10)))
    return out


def scipy_opt(ds: list[UeDemand]) -> float:
    """Independent reference: shares as softmax of free variables, Powell then Nelder-Mead polish."""
    n = len(ds)

    def obj(x):
        phi = np.exp(x[:n] - x[:n].max())
        phi /= phi.sum()
        beta = np.exp(x[n:] - x[n:].max())
        beta /= beta.sum()
        return sum(d.weight * d.latency(max(p, 1e-12), max(b, 1e-12)) for d, p, b in zip(ds, phi, beta))

    best = np.inf
    rng = np.random.default_rng(0)
    for _ in range(4):
        x0 = rng.normal(size=2 * n)
        res = minimize(obj, x0, method="Powell", options={"xtol": 1e-10, "ftol": 1e-12, "maxfev": 40000})
        res = minimize(obj, res.x, method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxfev": 40000})
        best = min(best, res.fun)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_fixed_allocation_matches_scipy_and_beats_equal(seed):
    ds = rand_demands(seed)
    fa = allocate_fixed(ds)
    assert sum(fa.compute.values()) <= 1 + 1e-9 and sum(fa.uplink.values()) <= 1 + 1e-9
    ref = scipy_opt(ds)
    assert fa.objective_ms <= ref * (1 + 1e-6) + 1e-9
    assert ref <= fa.objective_ms * (1 + 1e-3)
    assert fa.objective_ms <= equal_shares(ds).objective_ms + 1e-9


def test_kink_upload_hides_behind_local_compute():
    """A UE whose weights can hide behind its local compute gets exactly U/F of the uplink."""
    d1 = UeDemand("a", 1.0, 100.0, 10.0, 0.0, 5.0, 0.0)
    d2 = UeDemand("b", 1.0, 0.0, 0.0, 50.0, 5.0, 0.0)
    fa = allocate_fixed([d1, d2])
    assert fa.uplink["a"] == pytest.approx(0.1, rel=1e-6)
    assert fa.uplink["b"] == pytest.approx(0.9, rel=1e-6)


def test_ara_is_monotone_and_not_worse_than_equal_shares():
    pbs = [UeProblem(f"u{i}", random_dag(40 + i, 9, speedup=10.0), Link(5.0 + 40 * i, rtt_ms=4.0), weight=1 + i)
           for i in range(4)]
    al = ara(pbs, max_rounds=5)
    h = al.history
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(h))
    total = 0.0
    for _u, s in al.shares.items():
        if s is not None:
            total += s.compute
    assert total <= 1 + 1e-6
    assert al.objective_ms == pytest.approx(h[-1])


def test_allocator_join_leave_finish():
    alloc = Allocator(policy_options={"budget_s": 0.1})
    g1, g2 = random_dag(1, 8, speedup=20.0), random_dag(2, 8, speedup=20.0)
    a1 = alloc.join("ue1", g1, Link(100.0, rtt_ms=2.0))
    assert set(a1.plans) == {"ue1"}
    a2 = alloc.join("ue2", g2, Link(100.0, rtt_ms=2.0))
    assert set(a2.plans) == {"ue1", "ue2"}
    a3 = alloc.upload_finished("ue1")
    assert a3.plans["ue1"].upload_bytes == 0
    a4 = alloc.leave("ue2")
    assert set(a4.plans) == {"ue1"}
    with pytest.raises(PartitionerError, match="not allocated"):
        alloc.leave("ue2")
    with pytest.raises(PartitionerError, match="already joined"):
        alloc.join("ue1", g1, Link(1.0))
