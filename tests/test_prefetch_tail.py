"""``auto``'s prefetch may leave a tail of the warm target's need order for the first remote request
(``ue_client.planning._prefetch_best``, ``_tail_cuts``): the stream lower bound's other kink
(``partitioner.streambound``). On the captured graphs at the two cells of session 19's full grid where the
bound is below 0.9 of the best baseline (mobilenet_v2 and resnet18, UE at 10 % of a core, 400 Mbit/s, 20 ms
RTT; the UE's local run, the warm latency and the send cost per byte as those cells measured them), the plan
is the cheapest strategy of its family by its own model (every m and every weight boundary X, evaluated one
by one), and where a tail pays it is left (session 20's resnet18 cell: the fc layer's 2 MB weight). A real server
runs a stream that left a tail: the tail's weights go up in the first remote request, not before, and every
answer equals the user's eager module."""

from __future__ import annotations

import math

import pytest

from partitioner.costgraph import Link
from partitioner.state import ServerState, Shares
from partitioner.uecpu import SEND_SHARE, UeCpu
from tests.checks import cell_graph, checked_call, prefetch_stream, until_remote
from ue_client import planning

# (model, UE local run ms, server scale for the cell's warm latency, send Mbit/s of CPU at the UE's share):
# session 19's full grid and session 20's runs at 10 % / 400 Mbit/s (docs/results/stream/session20)
CELLS = [("mobilenet_v2", 164.0, 5.72, 720.0), ("mobilenet_v2", 133.0, 4.39, 864.0),
         ("resnet18", 309.0, 2.02, 1282.0), ("resnet18", 300.0, 2.02, 1043.0)]
LINK = Link(400.0, rtt_ms=20.0)


def brute_force(score, target, horizon: int) -> float:
    """The least stream total of "m local requests sending the first X bytes of the target's need order
    (any weight boundary the m local runs can carry), the target cold, warm after" by the planner's own
    model: every (m, X) evaluated."""
    s = score.ue_cpu.send_ms_per_byte
    both = min(score.r.up, SEND_SHARE / s)
    ell = score.local_ms
    x_max = both * ell / (1.0 - both * s)
    state = score.state if score.state is not None else ServerState()
    weights = score.costs.weights
    order = score.weight_order(target)
    sizes = [(w, 0 if w in state.held else int(state.in_flight.get(w, weights[w]))) for w in order]
    W = float(sum(b for _, b in sizes))
    warm = score(target, "warm").latency_ms
    bounds = [0.0]
    for _, b in sizes:
        if b:
            bounds.append(bounds[-1] + b)
    best = math.inf
    for m in range(1, horizon):
        cap = min(W, m * x_max)
        for X in {*(x for x in bounds if x <= cap), cap}:
            if m > 1 and min(W, (m - 1) * x_max) >= X:
                continue  # fewer local requests carry it
            cold = score.with_state(target, planning.prefetched_state(state, sizes, X)).latency_ms
            best = min(best, m * ell + s * X + cold + (horizon - m - 1) * warm)
        if cap >= W:
            break
    return best


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: f"{c[0]}-{c[1]:g}")
def test_the_prefetch_plan_is_the_cheapest_of_its_family_at_the_cells(cell):
    name, local_ms, server, send_mbps = cell
    g = cell_graph(name, local_ms, server)
    cpu = UeCpu(send_ms_per_byte=1.0 / (send_mbps * 125.0))
    score = planning._Score(g, LINK, cpu, None, Shares(), True)
    t = score.names(score.table.decide(score.P, score.r, None, "warm")[0])
    for horizon in (2, 3, 8):
        pf = planning._prefetch_best(score, [t], score.local_ms, horizon, 0.0)
        ref = brute_force(score, t, horizon)
        if pf is None:  # no member beats staying local
            assert ref >= horizon * score.local_ms * (1 - 1e-12), (horizon, ref)
            continue
        # the search's candidates (all ahead, or a tail of whole weights under one warm request's uplink) hold the
        # family's least total (within rounding: the two sum the same terms in another order)
        assert pf["total_ms"] == pytest.approx(ref, rel=1e-9, abs=1e-6), (horizon, pf["total_ms"], ref)


def test_a_tail_is_left_where_it_pays():
    """Session 20's resnet18 cell (before run): the plan leaves the fc layer's weight (2 MB, the need order's
    last) for the first remote request and predicts a lower total than sending everything ahead (the
    search before session 20: ``PREFETCH_TAILS`` 0); the runtime's background stops before the tail."""
    g = cell_graph("resnet18", 300.0, 2.02)
    cpu = UeCpu(send_ms_per_byte=1.0 / (1043.0 * 125.0))
    c = planning.choose("auto", g, LINK, ue_cpu=cpu, horizon=8)
    assert c.prefetch and not c.server_ops, c.reason
    tail = c.details["prefetch_tail_bytes"]
    assert 2.0e6 < tail < 2.2e6, tail
    assert "left for the first remote request" in c.reason
    assert "fc.weight" in g.weights and "fc.weight" not in c.background, c.background[-3:]
    assert sum(g.weights[w] for w in c.background) == pytest.approx(sum(g.weights.values()) - tail, abs=1)
    score = planning._Score(g, LINK, cpu, None, Shares(), True)
    t = frozenset(c.warm_target)
    old = planning.PREFETCH_TAILS
    try:
        planning.PREFETCH_TAILS = 0
        all_ahead = planning._prefetch_best(score, [t], score.local_ms, 8, 0.0)
    finally:
        planning.PREFETCH_TAILS = old
    assert all_ahead["tail_bytes"] == 0.0
    assert c.details["prefetch_total_ms"] < all_ahead["total_ms"] - 1.0, (c.details["prefetch_total_ms"],
                                                                          all_ahead["total_ms"])


def test_a_stream_that_left_a_tail_runs_it_in_the_first_remote_request(server):
    """Real server on a free port, resnet18 on a UE emulated 10x slower with the cell's costs (local 300 ms
    planned, the server 3x the kept graph's, 7.7 ms of the UE's CPU budget per MB sent, 400 Mbit/s, 2 ms RTT,
    8 requests): request 1 runs locally while the target goes up except its tail (fc.weight), which neither it
    nor the uplink's queue holds afterwards; the stream goes remote, the tail is on the server by then, no
    request fell back, and every answer is the captured graph's bit for bit and the user's eager module's."""
    with prefetch_stream(server) as c:
        eng = c.engine
        fc_sha = eng.graph.weight_sha256("fc.weight")
        first = checked_call(c, 0)
        assert first.server_ops == 0 and "left for the first remote request" in first.plan_reason, first.plan_reason
        assert "fc.weight" not in eng.server_state().held
        assert fc_sha not in eng.uploads.queued  # not sent, nor waiting on the uplink
        reps = until_remote(c, first)
        assert reps[-1].server_ops > 0, [r.plan_reason for r in reps]
        assert "fc.weight" in eng.server_state().held
        assert not any(r.fallback for r in reps), reps
