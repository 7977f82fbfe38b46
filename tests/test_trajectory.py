"""``auto``'s prefetch plan followed as a trajectory (``ue_client.trajectory``): a request on the plan's
trajectory takes the plan's step without a search, and that step is what the full search chooses there; a
state that left the tolerance, a changed input or the plan's last prefetch request plans in full; and a real
client following it answers like the user's eager model."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from partitioner.costgraph import CostGraph, Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from tests.checks import checked_call
from ue_client import planning
from ue_client.decisions import DecisionCache
from ue_client.trajectory import TOLERANCE, Trajectory

DATA = Path(__file__).parent / "data" / "costgraphs"


def _kind(c: planning.PlanChoice) -> tuple:
    if c.prefetch:
        return ("prefetch", c.warm_target, round(c.details["prefetch_bytes"]))
    return ("split", c.server_ops) if c.server_ops else ("local",)


def _on(tr: Trajectory, j: int, dev: float = 0.0) -> ServerState:
    """The server's state after the plan's first ``j`` requests, ``dev`` x one request's upload off it."""
    return planning.prefetched_state(ServerState(), list(tr.sizes), max(0.0, tr.planned_sent(j) + dev * tr.x))


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_followed_steps_are_the_full_searchs_choice_on_captured_graphs(name):
    """Walk every prefetch plan over a grid (UE 3x / 10x / 30x, 5-400 Mbit/s, send costs, horizons 8 / 30)
    with the upload per request on the plan, 10 or 20 % behind it, or 30 / 90 / 200 % ahead of it: at every
    request the trajectory follows, the full search (``planning.choose`` with that state and horizon)
    chooses the same step for this request: local while the same target's weights go up, the same bytes,
    the same prediction and upload list."""
    g0 = CostGraph.from_json(DATA / f"{name}.json")
    followed = plans = 0
    for slow, up, s, h, dev in itertools.product((3.0, 10.0, 30.0), (5.0, 20.0, 50.0, 100.0, 400.0),
                                                 (2e-6, 5e-6, 2e-5), (8, 30), (-0.2, -0.1, 0.0, 0.3, 0.9, 2.0)):
        g, link, cpu = g0.scaled(ue=slow), Link(up, rtt_ms=20.0), UeCpu(send_ms_per_byte=s)
        first = planning.choose("auto", g, link, state=ServerState(), share=Shares(), ue_cpu=cpu, horizon=h)
        tr = Trajectory.from_choice(first, (), h, ServerState(), g.weights)
        if tr is None:
            continue
        plans += 1
        for j in range(1, h):
            state = _on(tr, j, dev * j)
            step, why = tr.follow((), h - j, state)
            if step is None:
                assert why == "last prefetch request" or "behind" in why, why
                break
            followed += 1
            full = planning.choose("auto", g, link, state=state, share=Shares(), ue_cpu=cpu, horizon=h - j)
            assert _kind(step) == _kind(full), (slow, up, s, h, dev, j, full.reason)
            assert step.predicted_ms == pytest.approx(full.predicted_ms, rel=1e-6, abs=1e-6)
            assert step.background == full.background
    assert plans >= 10 and followed >= 100, (plans, followed)  # the grid exercised the trajectories


def _plan(g: CostGraph, link: Link, cpu: UeCpu, h: int) -> tuple[planning.PlanChoice, Trajectory]:
    c = planning.choose("auto", g, link, state=ServerState(), share=Shares(), ue_cpu=cpu, horizon=h)
    tr = Trajectory.from_choice(c, (), h, ServerState(), g.weights)
    assert tr is not None and tr.m >= 4, c.reason
    return c, tr


G10 = CostGraph.from_json(DATA / "mobilenet_v2.json").scaled(ue=30.0)
LINK, CPU = Link(5.0, rtt_ms=20.0), UeCpu(send_ms_per_byte=2e-6)


def test_the_trajectory_is_left_outside_its_tolerance():
    """On the plan, ahead of it, or behind it by less than ``TOLERANCE`` of one request's upload it follows;
    an upload behind by more, other inputs, a horizon the plan did not expect, or the plan's last prefetch
    request (by the bytes it still has to send): no."""
    _, tr = _plan(G10, LINK, CPU, 30)
    assert tr.follow((), 29, _on(tr, 1))[0] is not None
    assert tr.follow((), 29, _on(tr, 1, 1.5))[0] is not None  # ahead: further along the same trajectory
    assert tr.follow((), 29, _on(tr, 1, -0.9 * TOLERANCE))[0] is not None
    step, why = tr.follow((), 29, _on(tr, 1, -1.2 * TOLERANCE))
    assert step is None and "behind" in why, why
    assert "behind" in tr.follow((), 29, ServerState())[1]  # nothing went up
    assert tr.follow(("other share",), 29, _on(tr, 1)) == (None, "inputs")
    assert tr.follow((), 30, _on(tr, 1)) == (None, "horizon")
    assert tr.follow((), 30 - (tr.m - 1), _on(tr, tr.m - 1)) == (None, "last prefetch request")
    assert tr.follow((), 28, _on(tr, tr.m - 1)) == (None, "last prefetch request")  # ahead to the last one
    assert tr.follow((), 30 - tr.m, _on(tr, tr.m)) == (None, "last prefetch request")  # and past it


def test_decision_cache_follows_without_a_search_and_replans_off_the_trajectory(monkeypatch):
    """``DecisionCache.decide``: after a prefetch plan, a request whose state is on the trajectory takes the
    plan's step with no ``planning.choose`` call (``why`` 'followed', the step's CPU recorded); one whose
    upload fell behind by more than the tolerance, or whose link drifted, plans in full."""
    calls: list[int] = []
    orig = planning.choose

    def counted(*a, **k):
        calls.append(k.get("horizon"))
        return orig(*a, **k)

    monkeypatch.setattr(planning, "choose", counted)
    # (without the held target's answer made beside the first decision: one more ``choose`` call, counted here)
    dc = DecisionCache("auto", fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=30,
                       held_shortcut=False)
    kw = dict(costs=G10, base=G10, ue_cpu=CPU, scale={"ue": 1.0, "server": 1.0})
    first = dc.decide(ServerState(), Shares(), link=LINK, n=1, **kw)
    assert first.prefetch and dc.trajectory is not None and len(calls) == 1, first.reason
    tr = dc.trajectory
    second = dc.decide(_on(tr, 1), Shares(), link=LINK, n=2, **kw)
    assert len(calls) == 1 and dc.why == "followed" and second.prefetch, dc.why
    assert second.details["plan_why"] == "followed" and second.details["plan_cpu_ms"] >= 0.0
    assert second.details["prefetch_requests"] == tr.m - 1
    third = dc.decide(_on(tr, 2), Shares(), link=LINK, n=3, **kw)
    assert len(calls) == 1 and dc.why == "followed" and third.prefetch
    # the upload fell behind: a full plan, which says why
    fourth = dc.decide(_on(tr, 2), Shares(), link=LINK, n=4, **kw)
    assert len(calls) == 2 and dc.why == "changed", dc.why
    assert "behind" in fourth.details["plan_why"], fourth.details["plan_why"]
    # a new trajectory from there; a drifted link plans in full too
    tr2 = dc.trajectory
    assert tr2 is not None and tr2 is not tr
    dc.decide(_on(tr, 2), Shares(), link=Link(20.0, rtt_ms=20.0), n=5, **kw)
    assert len(calls) == 3 and dc.why == "link"


def test_a_real_client_follows_its_prefetch_plan_and_answers_like_the_eager_model(server, prefetching_client,
                                                                                   monkeypatch):
    """A CPU-shared UE with a horizon prefetches (resnet18, 100 Mbit/s planned, UE 10x): the requests between
    the plan and its last prefetch request follow it without a search, each request's answer equals the
    user's eager module (and the captured graph bit for bit), and it goes remote within the stream."""
    searches: list[int] = []
    orig = planning.choose

    def counted(*a, **k):
        searches.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(planning, "choose", counted)
    with prefetching_client(server.address, plan_background=False) as c:  # each decision inside its request
        reps, per_request = [], []
        for i in range(20):
            n0 = len(searches)
            reps.append(checked_call(c, i))
            per_request.append(len(searches) - n0)
            if reps[-1].server_ops > 0:
                break
    whys = [r.plan_why for r in reps]
    assert reps[0].plan_reason.startswith("prefetch"), reps[0]
    assert reps[-1].server_ops > 0, whys
    # on an idle machine the upload keeps up with the plan on loopback (it runs ahead of it), so requests follow
    # the trajectory; under load it can fall behind the plan, and then the re-plan says so. A follow is a check,
    # not a search.
    # and when one loaded local run lasted the whole upload (47 MB at the paced 100 Mbit/s: 3.7 s), the next
    # request is already past the plan's last prefetch request and plans in full (full suite under load ~5,
    # session 12: ['link', '... trajectory left: last prefetch request']), going remote
    followed = [i for i, w in enumerate(whys) if "followed" in w]
    assert followed or any("behind the planned" in w or "last prefetch request" in w for w in whys), whys
    assert all(per_request[i] == 0 for i in followed), list(zip(whys, per_request, strict=True))
    assert not any(r.fallback for r in reps), reps
