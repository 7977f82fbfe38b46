"""break42 F1: a client's float32 matmul precision does not reach slices with batched matrix products.

At "medium" a CPU ``bmm`` of many thin matrices runs 13-38x slower than at "highest" (bfloat16 conversions per
matrix), and the op budget, checked once per slice with no precision, priced it as FLOPs at the large-product rate:
one tenant's 2 KB slice (``bmm`` of two broadcast views, 3M 1 x 64 x 1 products, priced 2.3 ms) held the server's
only compute worker 1.1-1.3 s per request at "medium" (65 ms at "highest"), and every other tenant's requests
waited (``docs/results/attack/session33/``). Such a slice now runs at "highest" whatever its requests ask
(``edge_server.precision.served_precision``); slices without batched products still run at the client's precision
(``tests/test_break38_precision.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edge_server.precision import served_precision
from edge_server.slices import compile_slice
from modelgraph.capture import capture
from modelgraph.slice import make_slice
from tests.checks import FAST_LINK
from tests.test_server_cli import running_server
from ue_client import CoinferClient, new_tenant
from ue_client.verify import within_tolerance


class _Bmm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(42)
        self.w = nn.Parameter(torch.randn(8, 256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.w)


class _Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q @ k.transpose(-1, -2)).softmax(-1)


def _compiled(module: nn.Module, *inputs: torch.Tensor):
    g = capture(module.eval(), inputs)
    spec = make_slice(g, g.split(frozenset(op.name for op in g.ops)), with_hashes=False)
    return compile_slice(spec.to_json(), require_hashes=False)


class _VecTimesBatch(nn.Module):
    """break44 F3: a 1-D by 3-D ``matmul`` answers a rank-2 tensor and runs as one thin product per batch row."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 1))

    def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w.expand(n.shape[0], 64, 1))


class _VecTimesMat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w)


@pytest.mark.parametrize(("module", "inputs", "batched"), [
    (_Bmm(), (torch.randn(8, 64, 256),), True),
    (_VecTimesBatch(), (torch.randn(64), torch.zeros(32)), True),
    (_VecTimesMat(), (torch.randn(4, 64),), False),
    (_Attention(), (torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32)), True),
    (nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 8)), (torch.randn(16, 256),), False),
    (nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), (torch.randn(1, 3, 16, 16),), False),
])
def test_a_slice_with_batched_products_runs_at_highest_whatever_it_asks(module, inputs, batched: bool) -> None:
    cs = _compiled(module, *inputs)
    assert cs.batched_products is batched
    for asked in ("highest", "high", "medium"):
        assert served_precision(asked, cs.batched_products) == ("highest" if batched else asked)


def test_a_medium_ue_offloading_a_bmm_gets_the_highest_precision_answer() -> None:
    module, x = _Bmm().eval(), torch.randn(8, 64, 256)
    before = torch.get_float32_matmul_precision()
    try:
        with torch.no_grad():
            exact = module(x)
            torch.set_float32_matmul_precision("medium")
            medium = module(x)
        if within_tolerance(medium, exact):
            pytest.skip("this CPU computes float32 matmuls alike at every precision (no AMX / AVX-512 BF16)")
        with running_server("--threads", "1") as (_, address), CoinferClient(
                module, (x,), server=address, policy="offload", link=FAST_LINK, tenant=new_tenant(), profile_runs=2,
                fallback=False, probe=False) as c:
            for _ in range(2):  # cold and warm
                y = c(x)
                assert c.last_report.server_ops > 0
                assert within_tolerance(y, exact) and not within_tolerance(y, medium)
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_waiter_for_another_precision_is_not_starved_by_holders_that_keep_coming() -> None:
    """break42 F2: two workers holding "medium" in overlapping 5 ms batches, back to back, kept the gate for as long as
    they ran, and a worker asking "highest" got in after 3 s; newcomers for the held value now wait behind it."""
    import threading
    import time

    from edge_server.precision import PrecisionGate

    gate, stop, entered = PrecisionGate(), threading.Event(), []
    deadline = time.monotonic() + 3.0

    def medium(offset: float) -> None:
        time.sleep(offset)
        while not stop.is_set() and time.monotonic() < deadline:
            with gate.hold("medium"):
                time.sleep(0.005)

    workers = [threading.Thread(target=medium, args=(d,)) for d in (0.0, 0.0025)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.05)
        t0 = time.monotonic()
        with gate.hold("highest"):
            entered.append((time.monotonic() - t0, torch.get_float32_matmul_precision()))
    finally:
        stop.set()
        for w in workers:
            w.join()
    waited, held = entered[0]
    assert held == "highest"
    assert waited < 1.0, f"waited {waited:.2f} s for two medium holders' 5 ms batches"
