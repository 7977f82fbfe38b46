"""break38: users' models against their own eager ``model(*inputs)``, what a fresh tester found wrong.

F1: ``torch.autocast`` around the call. The dispatcher applies autocast to every op a forward runs, so a forward
called under ``torch.autocast("cpu", dtype=torch.bfloat16)`` answers bfloat16 where the same call outside answers
float32. The client keyed its graphs by the inputs alone: a client built outside autocast and called inside it
answered float32 from the server (the server runs no autocast) while its local path re-autocast the graph's ops
here, and a client built inside autocast answered bfloat16 on every path once called outside it (the casts were
traced into the graph). Now the CPU autocast state is part of a call's signature (captured once more for another
state, as another batch size is) and the captured graph always runs with autocast off (its casts are in it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.checks import FAST_LINK
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x))).softmax(-1)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(38)
    return _Mlp().eval(), torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _as_eager(y: torch.Tensor, module: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        e = module(x)
    assert (y.dtype, y.shape, y.stride()) == (e.dtype, e.shape, e.stride())
    assert max_abs_diff(y, e) == 0.0, max_abs_diff(y, e)


def _clients(server, module, x):
    """A local client and an offloading one (every op on the server) of ``module``."""
    yield CoinferClient(module, (x,))
    yield CoinferClient(module, (x,), server=server.address, policy="offload", link=FAST_LINK, tenant=new_tenant(),
                        profile_runs=2, fallback=False, probe=False)


@pytest.mark.parametrize("built_under_autocast", [False, True])
def test_a_call_under_autocast_answers_as_eager_under_it_and_outside_it(server, built_under_autocast) -> None:
    module, x = _mlp()
    x2 = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    if built_under_autocast:
        with _bf16():
            clients = list(_clients(server, module, x))
    else:
        clients = list(_clients(server, module, x))
    for c in clients:
        with c:
            for _ in range(2):  # cold and warm
                with _bf16():
                    y = c(x2)
                    assert y.dtype == torch.bfloat16
                    _as_eager(y, module, x2)
                y = c(x2)
                assert y.dtype == torch.float32
                _as_eager(y, module, x2)
            if c.server is not None:
                assert all(r.server_ops > 0 and not r.fallback for r in c.reports), c.reports


class _ShapeBranch(nn.Module):
    """Another batch size is another graph of other ops: ``amax`` for a batch over 2 rows, else ``amin``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.fc(x).relu())
        return y.amax(-1) if x.shape[0] > 2 else y.amin(-1)


def test_server_ops_by_name_on_another_signatures_graph_say_so_and_a_position_splits_every_graph(server) -> None:
    """F5: names of the example's graph on a call of another batch size whose graph has other ops said only
    "unknown ops in server part: ['amax']"; now the error says why and what to give instead."""
    from ue_client import InputError

    torch.manual_seed(38)
    module = _ShapeBranch().eval()
    x4, x1 = torch.randn(4, 8), torch.randn(1, 8)
    names = [op.name for op in CoinferClient(module, (x4,)).graph.ops]
    with CoinferClient(module, (x4,), server=server.address, policy="offload", server_ops=names[2:], link=FAST_LINK,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        _as_eager(c(x4), module, x4)
        with pytest.raises(InputError, match=r"server_ops names ops of the graph captured from the example.*position"):
            c(x1)
    with CoinferClient(module, (x4,), server=server.address, policy="offload", server_ops=2, link=FAST_LINK,
                       tenant=new_tenant(), profile_runs=2, fallback=False, probe=False) as c:
        for x in (x4, x1):
            _as_eager(c(x), module, x)
            assert c.last_report.server_ops > 0 and not c.last_report.fallback, c.last_report
