"""A second full decision in the same request with every input the same takes the first one's answer
(``DecisionCache._search_memo``, session 29): a suspended client's offline decision that needs the server (a
prefetch) is decided again once the session re-opened, and that second decision was a second search. Over a grid
of links, send costs, UE scales, horizons and held sets, on the kept resnet18 and mobilenet_v2 cost graphs: the
repeated decision equals a search's (a twin cache without the memo), field by field, and leaves the cache in the
same state; any input that differs (request, share, held set, in flight, scale, link, the calibrated graph's
object) searches again."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client.decisions import DecisionCache

DATA = Path(__file__).parent / "data" / "costgraphs"
REPEATED = "this request's search repeated"
TIMING = {"plan_cpu_ms", "plan_why"}


def _decision(c) -> tuple:
    d = {k: v for k, v in c.details.items() if k not in TIMING}
    return (c.policy, c.server_ops, c.warm_target, c.background, c.prefetch, c.invest, c.gradual, c.idle_only,
            c.upload_order, c.reason, c.predicted_ms, c.warm_ms, sorted(d.items(), key=lambda kv: kv[0]))


def _cache_state(dc: DecisionCache) -> tuple:
    ahead = None if dc._held_ahead is None else (dc._held_ahead[0], _decision(dc._held_ahead[1]))
    traj = None if dc.trajectory is None else {k: v for k, v in vars(dc.trajectory).items() if k != "choice"}
    last = None if dc.last is None else (dc.last[0], _decision(dc.last[1]), dc.last[2])
    return (last, dc._planned_with, dc.why, dc._target, dc._made_for, dc.lost_ms, dc._searched, ahead, traj,
            dc.follow_miss)


def _setup(g: CostGraph, mbps: float, rtt: float, ue_cpu, horizon: int):
    dc = DecisionCache("auto", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=horizon)
    link = Link(mbps, rtt_ms=rtt)
    scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0,
             "transport_se_ms": 0.0}
    first = dc.decide(ServerState(), Shares(), n=0, costs=g, base=g, link=link, ue_cpu=ue_cpu, scale=scale)
    return dc, link, scale, first


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_a_repeated_decision_is_the_search(name):
    g = CostGraph.from_json(DATA / f"{name}.json").scaled(ue=10.0)
    hits = cases = 0
    for mbps, rtt, send, ue, horizon, held_part in itertools.product(
            [50.0, 400.0, 1000.0], [5.0, 20.0], [None, 1e-6, 1e-5], [1.0, 1.4, 1.7], [3, 5, 8], [0.0, 0.5]):
        ue_cpu = None if send is None else UeCpu(send_ms_per_byte=send, shared=True)
        dc, link, scale, first = _setup(g, mbps, rtt, ue_cpu, horizon)
        scale = {**scale, "ue": ue}
        costs = g.scaled(ue=ue, server=1.0)  # one object while the scales stay (``CostModel.costs``)
        bg = first.background or tuple(sorted(g.weights))
        held = frozenset(bg[: int(len(bg) * held_part)])
        kw = dict(base=g, link=link, ue_cpu=ue_cpu, scale=dict(scale), measured_cv=None, ue_cv=None)
        dc.decide(ServerState(held=held), Shares(), n=2, costs=lambda c=costs: c, **kw)  # the offline one
        twin = copy.copy(dc)
        twin._search_memo = None
        got = dc.decide(ServerState(held=held), Shares(), n=2, costs=lambda c=costs: c, **kw)
        want = twin.decide(ServerState(held=held), Shares(), n=2, costs=lambda c=costs: c, **kw)
        cases += 1
        assert REPEATED not in want.details["plan_why"]
        if REPEATED in got.details["plan_why"]:
            hits += 1
        assert _decision(got) == _decision(want)
        assert got.details["plan_why"].replace(f" ({REPEATED}: no search)", "") == want.details["plan_why"]
        assert _cache_state(dc) == _cache_state(twin)
    assert hits >= cases // 4, (hits, cases)  # (the others reused the first decision: no search to repeat)


def test_any_input_that_differs_searches_again():
    g = CostGraph.from_json(DATA / "resnet18.json").scaled(ue=10.0)
    ue_cpu = UeCpu(send_ms_per_byte=1e-5, shared=True)
    costs = g.scaled(ue=1.4, server=1.0)
    held: frozenset[str] = frozenset()

    def again(n=2, share=None, state=None, scale_moved=None, link=None, graph=costs, ue=ue_cpu) -> str:
        dc, link0, scale, _ = _setup(g, 100.0, 5.0, ue_cpu, 8)
        scale = {**scale, "ue": 1.4}
        kw = dict(base=g, ue_cpu=ue_cpu, measured_cv=None, ue_cv=None)
        c = dc.decide(ServerState(held=held), Shares(), n=2, costs=lambda: costs, link=link0, scale=dict(scale), **kw)
        assert c.background and REPEATED not in c.details["plan_why"]  # a plan that uploads for later requests
        kw["ue_cpu"] = ue
        return dc.decide(state or ServerState(held=held), share or Shares(), n=n, costs=lambda: graph,
                         link=link or link0, scale={**scale, **(scale_moved or {})}, **kw).details["plan_why"]

    assert REPEATED in again()
    assert REPEATED not in again(n=3)
    assert REPEATED not in again(share=Shares(compute=0.5))
    assert REPEATED not in again(state=ServerState(held=held | {sorted(g.weights)[-1]}))
    assert REPEATED not in again(state=ServerState(held=held, in_flight={sorted(g.weights)[-1]: 10}))
    assert REPEATED not in again(scale_moved={"transport_ms": 1.0})
    assert REPEATED not in again(link=Link(100.0, rtt_ms=5.0, downlink_mbps=50.0))
    assert REPEATED not in again(graph=g.scaled(ue=1.4, server=1.0))  # equal, but another object
    assert REPEATED not in again(ue=UeCpu(send_ms_per_byte=1.1e-5, shared=True))
