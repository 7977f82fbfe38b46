"""A session's device copies of weights (``Session._device_weights``) are dropped with the slice that read
them: when the UE redefines a slice id (its LRU slice ids) or the server refuses the redefinition, the
tensors no defined slice reads go. Before, a session kept every (sha256, dtype, shape, stride) it ever ran
until it ended: on CUDA a device copy per weight, outside every budget. CPU runs the same bookkeeping (the
tensors are views of the store's bytes there); the CUDA case skips without a GPU. Real server on port 0.
"""

from __future__ import annotations

import pytest
import torch

import ue_client.request as request_mod
from edge_server.config import MiB, ServerConfig
from edge_server.testing import ServerThread
from ue_client import CoinferClient, new_tenant
from ue_client.options import fixed_split

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).eval()


def _keys(sess) -> set:
    return {k[0] for k in sess._device_weights}


@pytest.mark.parametrize("device", DEVICES)
def test_a_replaced_or_refused_slice_takes_its_device_weights_along(device, monkeypatch):
    """One slice id (the UE keeps one: ``MAX_SLICES`` = 1): split A (the last two linears) runs, then B (the
    last linear) replaces it under the same id, then C (from the 4096-wide linear on: over the server's
    64 KiB ``max_slice_bytes``) is refused. The session's device weights are A's, then B's only, then none;
    every answer equals the module's."""
    monkeypatch.setattr(request_mod, "MAX_SLICES", 1)
    module = _model()
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(1))
    cfg = ServerConfig(device=device, cache_bytes=64 * MiB, staging_bytes=32 * MiB, max_slice_bytes=64 << 10)
    with ServerThread(config=cfg) as srv, \
            CoinferClient(module, (x,), server=srv.address, policy="offload", tenant=new_tenant(), probe=False,
                          suspend_idle=False, server_ops=3) as c:
        eng = c.engine
        g = eng.graph
        want = module(x)
        assert torch.equal(c(x), want) and not c.last_report.fallback
        (sess,) = srv.runtime.sessions.sessions.values()
        a = _keys(sess)
        assert len(a) == 4, a  # two linears' weights and biases
        mem_a = torch.cuda.memory_allocated() if device == "cuda" else 0
        eng.decisions.fixed_server_ops = fixed_split(g, len(g.ops) - 1)  # the last linear
        assert torch.equal(c(x), want) and not c.last_report.fallback
        assert len(sess.slices) == 1
        b = _keys(sess)
        assert len(b) == 2 and b < a, (a, b)
        if device == "cuda":
            assert torch.cuda.memory_allocated() < mem_a
        eng.decisions.fixed_server_ops = fixed_split(g, 2)  # from the 4096-wide linear: refused
        assert torch.equal(c(x), want) and c.last_report.fallback
        assert not sess.slices and _keys(sess) == set()
