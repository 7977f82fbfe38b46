"""A background list names weights only (session 13's race in the four-concurrent-clients test).

``_Score.order`` is the need order of a partition's uplink items, cut tensors included (the model's input
``x`` when the first op is on the server); auto's background lists were built from it in two places (the
request-level guard's investment and a refused target's replacement), so a list could hold ``x`` and the
uploader failed looking up a weight ``'x'`` (``KeyError`` in ``UploadScheduler.schedule``). Session 14: the
two paths driven through ``choose("auto")`` itself (before, only the filter was checked).
"""

from __future__ import annotations

import pytest

from partitioner.costgraph import Link, chain
from partitioner.state import ServerState
from ue_client.planning import _Score, choose


@pytest.mark.parametrize("use_table", [False, True])
def test_weight_order_is_the_need_order_without_tensors(use_table: bool) -> None:
    g = chain([(5.0, 1.0, 4000, 1000), (5.0, 1.0, 4000, 2000), (5.0, 1.0, 100, 3000)], input_bytes=4000)
    score = _Score(g, Link(uplink_mbps=50.0, rtt_ms=2.0), None, None, None, use_table)
    whole = frozenset(op.name for op in g.ops)
    order = score.order(whole)
    assert "x" in order  # the input is sent as a tensor when every op is on the server
    got = score.weight_order(whole)
    assert got == tuple(w for w in order if w in g.weights)
    assert got and set(got) <= set(g.weights) and "x" not in got


def test_auto_in_the_request_level_guard_with_the_input_needed_backgrounds_weights_only() -> None:
    """``choose("auto")`` itself, driven into the request-level guard ("offloading predicted >= local: local")
    with a warm target whose first op is on the server (so its need order starts with the input ``x``): the
    investment's background names the target's weights only. Session 13 built it from ``_Score.order``: the
    list was ``('x', 'w0', 'w1')`` here. The case is a tie (whole model cold 60 ms = local 60 ms; nothing
    held, no UE send cost, so the CPU-shared investment step leaves the background as the guard set it);
    the preconditions are asserted, so a planner change that leaves this path fails here, not silently."""
    g = chain([(40.0, 2.0, 100_000, 100_000), (20.0, 5.0, 100_000, 1_000)], input_bytes=100_000)
    link, state = Link(uplink_mbps=50.0, rtt_ms=5.0), ServerState(held=frozenset())
    whole = frozenset(op.name for op in g.ops)
    c = choose("auto", g, link, state=state, horizon=5, online=True)
    # the path: the guard fired, this request runs locally, the warm target is the whole model, whose need
    # order names the input
    assert "guarded_ms" in c.details and "offloading predicted" in c.reason
    assert c.server_ops == frozenset() and c.warm_target == whole
    assert "x" in _Score(g, link, None, state, None, True).order(whole)
    # the check
    assert c.background == ("w0", "w1")
    assert set(c.background) <= set(g.weights)


@pytest.mark.parametrize("online", [True, False])
def test_auto_replacing_a_refused_target_backgrounds_weights_only(online: bool) -> None:
    """``choose("auto")`` whose warm target (the whole model) the server refused: the replacement target
    ``{op1, op2}`` needs the cut tensor ``op0`` first; its background names ``w1``, ``w2`` only (session 13:
    ``('op0', 'w1', 'w2')``)."""
    g = chain([(40.0, 2.0, 1_000, 4_000_000)] * 3, input_bytes=1_000)
    link, state = Link(uplink_mbps=20.0, rtt_ms=2.0), ServerState(held=frozenset())
    whole = frozenset(op.name for op in g.ops)
    c = choose("auto", g, link, state=state, horizon=20, online=online, exclude=frozenset({whole}))
    assert c.details.get("refused_target_ops") == 3 and c.warm_target == frozenset({"op1", "op2"})
    assert "op0" in _Score(g, link, None, state, None, online).order(c.warm_target)
    assert c.server_ops == frozenset()
    assert c.background == ("w1", "w2")
