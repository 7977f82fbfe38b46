"""One user's module on every path coinfer can answer it by (local; splits at the first op, the middle and the last;
every op on the server; fallen back after its server stopped) and in every autograd mode a caller may call it in:
what the output-kind tests (break41, break43) compare with the user's eager module."""

from __future__ import annotations

import contextlib

import torch

from tests.checks import FAST_LINK
from ue_client import CoinferClient, new_tenant

CONTEXTS = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def remote(server, module, x, server_ops, **kw) -> CoinferClient:
    """A client of ``server`` that runs ``server_ops`` (the first k ops; None: every op) there."""
    return CoinferClient(module, (x,), server=server.address, policy="offload", server_ops=server_ops,
                         link=FAST_LINK, tenant=new_tenant(), profile_runs=2, probe=False, **kw)


def clients(server, module, x):
    """(path, client, expect): local; splits at the first op, the middle and the last; every op on the server."""
    local = CoinferClient(module, (x,))
    n = len(local.graph.ops)
    yield "local", local, "local"
    for k in sorted({1, n // 2, n - 1}):
        yield f"split at {k} of {n}", remote(server, module, x, k, fallback=False), "split"
    yield "all-server", remote(server, module, x, None, fallback=False), "split"


def fallen_back(module, x) -> CoinferClient:
    """A client whose all-server run was warm, then its server stopped: its next calls fall back here."""
    from edge_server.testing import ServerThread

    srv = ServerThread(threads=1).start()
    try:
        c = remote(srv, module, x, None, timeout_ms=20_000)
        c(x.clone())
        assert not c.last_report.fallback and c.last_report.server_ops > 0, c.last_report
    finally:
        srv.stop()
    return c


def works(f) -> bool:
    """Whether ``f()`` runs without torch raising (an in-place write, a backward through the output)."""
    try:
        f()
        return True
    except RuntimeError:
        return False
