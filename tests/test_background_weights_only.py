"""A background list names weights only (session 13's race in the four-concurrent-clients test).

``_Score.order`` is the need order of a partition's uplink items, cut tensors included (the model's input
``x`` when the first op is on the server); auto's background lists were built from it in two places (the
request-level guard's investment and a refused target's replacement), so a list could hold ``x`` and the
uploader failed looking up a weight ``'x'`` (``KeyError`` in ``UploadScheduler.schedule``).
"""

from __future__ import annotations

import pytest

from partitioner.costgraph import Link, chain
from ue_client.planning import _Score


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
