"""The first request's slice is defined while connecting (``Decider.decide_first``): the cold request
neither builds the slice's JSON nor waits for the server's validation of it, neither of which its prediction
counts. Real server on port 0, real clients; outputs compared with the user's own module."""

from __future__ import annotations

import uuid

import torch

from modelgraph import zoo
from ue_client.client import CoinferClient
from ue_client.verify import max_abs_diff


def _tenant() -> str:
    return f"defahead-{uuid.uuid4().hex[:8]}"


def test_a_split_plan_defines_its_slice_at_connect(server) -> None:
    """A fixed split: after ``connect`` the session holds its slice; the first (cold) request defines none
    (``predicted_parts`` has no ``define_ms``), the server ran its ops, and the answer equals the module's."""
    module, inputs = zoo.ZOO["chain"]()
    c = CoinferClient(module, inputs, server=server.address, tenant=_tenant(), server_ops=2,
                      link={"uplink_mbps": 200, "rtt_ms": 1})
    try:
        c.engine.connect()
        path = c.engine.path
        assert len(path.slices) == 1, path.slices
        (key,) = path.slices
        y = c(*inputs)
        rep = c.last_report
        assert rep.server_ops == len(key) and not rep.fallback, rep
        assert rep.uploaded_weight_bytes > 0  # a cold request: the weights went up in it
        assert "define_ms" not in (rep.predicted_parts or {}), rep.predicted_parts
        assert list(path.slices) == [key]  # the slice defined ahead was the one the request used
        with torch.no_grad():
            ref = module(*inputs)
        assert max_abs_diff(y, ref) <= 1e-5
    finally:
        c.close()
