"""Checks shared by the tests that run a real client: its answers against the user's own model."""

from __future__ import annotations

import contextlib

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
