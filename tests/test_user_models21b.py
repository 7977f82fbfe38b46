"""review21's findings 1 and 4 (session 21, fix21).

Finding 1: capture ran the forward once more and filed anything past the module's attributes that it moved as
per-call scratch (``ForwardReads.written``), never watched, even where the output depends on it; state capture did
not snapshot at all (a deque, an array, a bytearray, a memoryview, an ``itertools`` iterator, a generator, an
``lru_cache``'s counters) was watched by identity only. With a counter whose period is 5 (the sign flips every 5th
call) a captured model then differed from eager on 4 of 20 calls (16 of 20 for a rotated deque). Now a place the
forward moves is scratch only where it only grew (a list, dict, set or deque that kept its entries and gained some:
a hook appending shapes); any other is refused at capture, and the extra forward's output is compared with the
graph's. Deterministic models users write (a log-only counter kept in a growing list, a cache dict filled on the
first call, a hook appending shapes, ``functools.lru_cache`` as a pure memo) are captured and equal eager.

Finding 4: ``CoinferClient._remote`` read the uplink backlog outside the try that turns a planner error into a local
fallback: a raise there reached the user instead of falling back.
"""

from __future__ import annotations

import torch
from torch import nn

from ue_client import CoinferClient, new_tenant
from ue_client.cli_run import max_abs_diff

FAST = {"uplink_mbps": 400.0, "rtt_ms": 2.0}


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_a_backlog_read_that_raises_falls_back_to_a_local_run_equal_to_eager(server, monkeypatch) -> None:
    """Before: the RuntimeError from the backlog read reached the caller of ``client(x)``."""
    from ue_client import client as cc

    def broken(self) -> float:
        raise RuntimeError("backlog reader broke")

    torch.manual_seed(0)
    module = Small().eval()
    x = torch.randn(3, 8)
    with CoinferClient(module, (x,), server=server.address, policy="offload", link=FAST, tenant=new_tenant()) as c:
        monkeypatch.setattr(cc.RemoteEngine, "_uplink_backlog_ms", broken)
        for _ in range(2):
            y = c(x)
            rep = c.last_report
            assert rep.fallback and rep.fallback_kind == "planner failure", rep
            assert "backlog reader broke" in rep.fallback_reason, rep.fallback_reason
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) == 0.0
        monkeypatch.undo()
        y = c(x)
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
        with torch.inference_mode():
            assert max_abs_diff(y, module(x)) == 0.0
