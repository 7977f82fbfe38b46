"""Checks shared by the tests that run a real client: its answers against the user's own model."""

from __future__ import annotations

import contextlib
from pathlib import Path

FAST_LINK = {"uplink_mbps": 400.0, "rtt_ms": 2.0}
"""A fast link for tests whose plans do not matter."""


def checked_call(c, seed: int):
    """Run ``c`` (a ``CoinferClient``) on random inputs of ``seed`` shaped as its examples; the answer must
    equal the captured graph's (``c.reference``) bit for bit and the user's own eager module within 1e-4
    (float32 summation order). Returns the request's ``RequestReport``."""
    from ue_client.cli_run import load_inputs, max_abs_diff

    x = load_inputs("random", c.example_inputs, seed=seed)
    y = c(*x)
    assert max_abs_diff(y, c.reference(*x)) == 0.0
    assert max_abs_diff(y, c.eager(*x)) <= 1e-4  # the user's own module
    return c.last_report


@contextlib.contextmanager
def warm_client(server, module, x, policy: str):
    """A client of ``module`` on ``server`` (a ``ServerThread``; no fallback, a fast link, a new tenant) after two
    calls on ``x``, each checked against the user's own ``module(x)`` (1e-5): yields (client, the last output)."""
    import torch

    from ue_client import CoinferClient, new_tenant
    from ue_client.verify import max_abs_diff

    with CoinferClient(module, (x,), server=server.address, policy=policy, link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False) as c:
        for _ in range(2):
            y = c(x)
            with torch.inference_mode():
                assert max_abs_diff(y, module(x)) <= 1e-5
        yield c, y


COSTGRAPHS = Path(__file__).parent / "data" / "costgraphs"
"""Captured cost graphs of the torchvision models (``tests/data/costgraphs/NAME.json``)."""


def cell_graph(name: str, local_ms: float, server: float):
    """The captured cost graph of ``name`` scaled to a cell: the UE's whole local run ``local_ms`` (ms, spread over
    the ops as captured) and every server op ``server`` times its captured time. Returns a
    ``partitioner.costgraph.CostGraph``."""
    from partitioner.costgraph import CostGraph

    g0 = CostGraph.from_json(COSTGRAPHS / f"{name}.json")
    return g0.scaled(ue=local_ms / sum(o.ue_ms for o in g0.ops), server=server)


@contextlib.contextmanager
def prefetch_stream(server):
    """``auto`` on resnet18 against ``server`` (a ``ServerThread``) as at session 20's 10 % / 400 Mbit/s cell: the UE
    emulated 10x slower, the cell's costs (local run 300 ms, the server 3x the captured graph), 7.7 ms of the UE's
    CPU budget per MB sent (1043 Mbit/s), 400 Mbit/s and 2 ms RTT planned, no probe, a horizon of 8 requests, a new
    tenant. Its first request prefetches (runs locally while weights go up). Yields the ``CoinferClient``."""
    from partitioner.uecpu import UeCpu
    from ue_client import CoinferClient, new_tenant

    g = cell_graph("resnet18", 300.0, 3.0)
    with CoinferClient("torchvision:resnet18", server=server.address, policy="auto",
                       link={"uplink_mbps": 400.0, "rtt_ms": 2.0}, tenant=new_tenant(), ue_slowdown=10.0,
                       send_cpu=UeCpu(send_ms_per_byte=1.0 / (1043.0 * 125.0), shared=True), probe=False,
                       horizon=8, costs=g, timeout_ms=120_000.0) as c:
        yield c


def until_remote(c, first, most: int = 5) -> list:
    """``first`` (a request's report) and the reports of up to ``most`` more :func:`checked_call` requests of ``c``
    (seeds 1, 2, ...), stopping after the first that ran ops on the server: the stream's way from local to remote.
    The caller asserts that the last one went remote."""
    reps = [first]
    for i in range(1, most + 1):
        reps.append(checked_call(c, i))
        if reps[-1].server_ops:
            break
    return reps


def recorded_patience(monkeypatch, hard_s: float = 20.0) -> list:
    """From now on the client's requests wait under the library's deadline rule (``deadline.patience_of``) with a
    hard deadline of ``hard_s`` beside it, so a test of a server that could hold a request ends either way. Returns
    the list each request's ``Patience`` is appended to."""
    from ue_client import deadline
    from ue_client import request as ue_request

    rules: list = []

    def hard(*a, **k):
        r = deadline.patience_of(*a, **k)
        rules.append(deadline.Patience(r.expected_s, r.stall_s, hard_s=hard_s))
        return rules[-1]

    monkeypatch.setattr(ue_request, "patience_of", hard)
    return rules


def equals_user_model(c, y, x) -> bool:
    """Whether ``y``, what ``c`` (a ``CoinferClient``) answered on inputs ``x``, is the user's own answer: bit for bit
    the captured graph's (``c.reference``) and within 1e-4 of the user's eager module (``c.eager``; float32 summation
    order)."""
    from ue_client.cli_run import max_abs_diff

    return max_abs_diff(y, c.reference(*x)) == 0.0 and max_abs_diff(y, c.eager(*x)) <= 1e-4


def chunks(n: int, default: int = 1) -> list:
    """The chunk numbers ``range(n)`` of a test over many random instances (its DAGs / seeds split in chunks), for
    ``pytest.mark.parametrize("chunk", chunks(n))``: the first ``default`` in the default run, the others marked
    ``slow`` (``make test-all``). Each chunk checks the same property on other instances."""
    import pytest

    return [c if c < default else pytest.param(c, marks=pytest.mark.slow) for c in range(n)]
