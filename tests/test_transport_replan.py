"""The transport residual is used from two samples on, and a decision is made again for it only when its mean
moved beyond its standard error (``ue_client.calibration.MIN_TRANSPORT_SAMPLES``, ``TRANSPORT_REPLAN_SE``):
session 11's warm stream on a 10 % UE re-planned four times for a mean that settled from its first sample."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from ue_client.calibration import MIN_TRANSPORT_SAMPLES, TRANSPORT_REPLAN_SE, CostModel
from ue_client.decisions import DecisionCache

DATA = Path(__file__).parent / "data" / "costgraphs"
SESSION11 = [-247.0, -105.0, -77.0, -75.0]
"""The transport residuals of mobilenet_v2's first warm requests on a 10 % UE at a 20 Mbit/s planning link
(session 11, ``docs/results/plan_ms/session11/ue10_mobilenet_v2_20mbps_diag.json``: the means -247, -176,
-143, -126 its ``plan_why`` named)."""


def test_the_residual_waits_for_two_samples_and_has_a_standard_error():
    cm = CostModel()
    assert MIN_TRANSPORT_SAMPLES == 2
    cm.calibrate_transport(0.0, 247.0)
    assert cm.transport_ms == 0.0 and cm.transport_se_ms() is None  # one request's residual: not used
    cm.calibrate_transport(0.0, 105.0)
    assert cm.transport_ms == pytest.approx(-176.0)
    assert cm.transport_se_ms() == pytest.approx(statistics.stdev([-247.0, -105.0]) / math.sqrt(2))
    for r in (-77.0, -75.0):
        cm.calibrate_transport(r, 0.0)
    assert cm.transport_ms == pytest.approx(statistics.fmean(SESSION11))
    assert cm.transport_se_ms() == pytest.approx(statistics.stdev(SESSION11) / 2.0)


def _replans(residuals: list[float], *, old_rule: bool, policy: str = "dads") -> list[str]:
    """Replay a warm stream: after each request its residual joins the cost model, and the next request asks
    the decision cache (the same state, link and cost scales: only the transport moves). Returns the reasons
    of the decisions made again."""
    g = CostGraph.from_json(DATA / "mobilenet_v2.json").scaled(ue=10.0)
    dc = DecisionCache(policy, fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
    cm = CostModel()
    link = Link(20.0, rtt_ms=20.0)
    out = []

    def scale() -> dict:
        if old_rule:  # session 11: the mean from the first residual, 10 ms threshold on it and its spread
            xs = cm.transport_residuals
            mean = statistics.fmean(xs) if xs else 0.0
            sd = statistics.stdev(xs) if len(xs) >= 4 else 0.0
            return {"ue": 1.0, "server": 1.0, "transport_ms": mean, "transport_sd_ms": sd}
        return {"ue": 1.0, "server": 1.0, "transport_ms": cm.transport_ms,
                "transport_sd_ms": cm.transport_sd_ms() or 0.0, "transport_se_ms": cm.transport_se_ms() or 0.0}

    kw = dict(costs=g, base=g, link=link, ue_cpu=None)
    state = ServerState.warm(g)
    dc.decide(state, Shares(), scale=scale(), n=1, **kw)
    for n, r in enumerate(residuals, start=2):
        cm.calibrate_transport(r, 0.0)
        if old_rule:  # the old rule had no standard error: 10 ms on the mean and on the spread, any policy
            dc.policy = "robust" if policy == "dads" else policy  # (spread drift counted for every policy)
            dc.drift_detail = ""
            why = dc.drift(link, None, {**scale(), "transport_se_ms": 0.0})
            dc.policy = policy
            if why:
                out.append(f"{why}: {dc.drift_detail}")
                dc.decide(state, Shares(), scale=scale(), n=n, **kw)
                continue
            dc.decide(state, Shares(), scale=scale(), n=n, **kw)
        else:
            dc.decide(state, Shares(), scale=scale(), n=n, **kw)
            if dc.why:
                out.append(f"{dc.why}: {dc.why_detail}")
    return out


def test_session11s_warm_stream_replans_once_instead_of_four_times():
    old = _replans(SESSION11, old_rule=True)
    new = _replans(SESSION11, old_rule=False)
    assert len(old) == 4, old  # 0 -> -247 -> -176 -> -143 -> -126 (and the spread 0 -> 82)
    assert len(new) == 1 and "transport_ms 0 -> -176" in new[0], new


def test_a_move_beyond_its_standard_error_replans_and_one_within_does_not():
    g = CostGraph.from_json(DATA / "resnet18.json").scaled(ue=10.0)
    kw = dict(costs=g, base=g, link=Link(100.0, rtt_ms=2.0), ue_cpu=None)
    for se, move, replan in ((0.0, 15.0, True), (0.0, 8.0, False), (30.0, 50.0, False), (30.0, 70.0, True)):
        dc = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
        base = {"ue": 1.0, "server": 1.0, "transport_ms": -50.0, "transport_sd_ms": 10.0, "transport_se_ms": se}
        dc.decide(ServerState(), Shares(), scale=base, n=1, **kw)
        dc.decide(ServerState(), Shares(), scale={**base, "transport_ms": -50.0 + move}, n=2, **kw)
        assert (dc.why == "scale") == replan, (se, move, dc.why)
        assert replan == (move > max(10.0, TRANSPORT_REPLAN_SE * se))
    # the spread moves only robust's choice: the other policies keep their decision
    dc = DecisionCache("dads", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=None)
    base = {"ue": 1.0, "server": 1.0, "transport_ms": 0.0, "transport_sd_ms": 0.0, "transport_se_ms": 0.0}
    dc.decide(ServerState(), Shares(), scale=base, n=1, **kw)
    dc.decide(ServerState(), Shares(), scale={**base, "transport_sd_ms": 80.0}, n=2, **kw)
    assert dc.why == ""
