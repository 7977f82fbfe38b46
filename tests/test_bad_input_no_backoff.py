"""A request whose own inputs make an op fail (token ids past an embedding) fails as the user's eager module
does, wherever the op ran, and does not put the server on back-off: the next good request still runs there.

Before session 16 the server's INVALID_ARGUMENT for such a request started the connection's back-off, so
the next good requests fell back to local for 0.5 s (newuser16's probe)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_server.testing import ServerThread
from modelgraph import SliceError
from ue_client import CoinferClient


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 4)
        self.register_buffer("offset", torch.zeros((), dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids + self.offset)).mean(1)  # the add: an op the UE may run first


@pytest.mark.parametrize("fallback", [True, False])
@pytest.mark.parametrize("policy", ["offload", "split"])
def test_inputs_that_fail_eager_fail_here_and_leave_the_server_usable(policy: str, fallback: bool) -> None:
    """Also without a fallback (break43 F2): the server's report of an op failing on the request's data raised an
    untyped ``RequestFailed`` and put the server on back-off, so the next good requests raised that error for ~1 s
    without reaching the server."""
    torch.manual_seed(0)
    model = _Tagger().eval()
    good = torch.randint(0, 50, (2, 7))
    bad = torch.full((2, 7), 99)
    with pytest.raises(IndexError):
        model(bad)
    # split: the add on the UE, the rest on the server
    how = {"policy": "offload"} if policy == "offload" else {"policy": "offload", "server_ops": 1}
    with ServerThread() as srv, CoinferClient(model, (good,), server=srv.address, probe=False,
                                                 fallback=fallback, **how) as c:
        assert torch.equal(c(good), model(good))
        assert c.last_report.server_ops > 0 and not c.last_report.fallback
        for _ in range(2):
            with pytest.raises(SliceError, match="IndexError"):
                c(bad)
        y = c(good)
        assert torch.equal(y, model(good))
        assert c.last_report.server_ops > 0 and not c.last_report.fallback
        assert c.engine.conn.backoff_left() <= 0.0  # (negative: the time since a back-off would have ended)
