"""A slice id defined again on a session (break25b F2): its earlier answer is forgotten until the new one comes, and an
answer to the earlier definition arriving after the new one was sent is not taken for it. Before, ``slice_acks`` kept
the earlier answer, and a request timing out in between re-sent weights by the missing list of another slice
(``RequestPath``'s ``doubt``). A real server on port 0, the UE's own session stream."""

from __future__ import annotations

import time

import torch
from torch import nn

import modelgraph as mg
from modelgraph.slice import make_slice
from ue_client import new_tenant, wire
from ue_client import session as S


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _until(pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def test_a_redefined_slice_id_keeps_only_its_latest_definitions_answer(server):
    g = mg.capture(Three().eval(), (torch.randn(2, 8),), name="three")
    whole = g.split(op.name for op in g.ops)  # every op on the server: every weight missing
    tail = g.split(op.name for op in g.ops[-1:])  # the last linear only
    missing = {s: {g.weight_sha256(w) for w in s.server_weights} for s in (whole, tail)}
    assert missing[tail] < missing[whole]
    ch = wire.channel(server.address)
    sess = S.SessionStream(wire.stub(ch), new_tenant(), "three")
    try:
        sess.define_slice("s", make_slice(g, whole).to_json(), tag="whole")
        _until(lambda: "s" in sess.slice_acks)
        assert set(sess.slice_acks["s"].missing_weights) == missing[whole]
        # defined again, twice, without waiting: nothing is known of "s" until the latest answer comes, and the
        # answer to the middle definition (the whole model again) is not taken for the latest (the tail)
        sess.define_slice("s", make_slice(g, whole).to_json(), tag="whole again")
        assert "s" not in sess.slice_acks and "s" not in sess.slice_ack_at
        sess.define_slice("s", make_slice(g, tail).to_json(), tag="tail")
        _until(lambda: len(sess.slice_answers) == 3)
        assert [t for t, _ in sess.slice_answers] == ["whole", "whole again", "tail"]
        assert set(sess.slice_acks["s"].missing_weights) == missing[tail]
    finally:
        sess.close()
        ch.close()
