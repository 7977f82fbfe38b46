"""Bool masks combined with ``&`` / ``|`` / ``^`` / ``~`` run on the server (session 30, break34).

A GPT-style ``causal & pad_mask`` is ``aten.__and__.Tensor`` in the captured graph; off the allowlist it pinned the
op and every op after it to the UE (96 of a tiny GPT's 137 ops under a fixed split: correct, but far less offloaded
than asked). The bitwise ops are now allowlisted: elementwise on bool and integer tensors; a float operand is
refused by the CPU kernel when the slice runs.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from modelgraph.errors import OpExecutionError
from tests.checks import FAST_LINK
from tests.test_break31 import held_bytes
from ue_client import CoinferClient, new_tenant
from ue_client.verify import max_abs_diff


class MaskedAttention(nn.Module):
    """Causal self-attention whose mask is built with the bitwise operators users write."""

    def __init__(self, d: int = 32, heads: int = 4, t: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.register_buffer("causal", torch.tril(torch.ones(t, t, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        pad = attention_mask.bool()[:, None, None, :]
        keep = self.causal[:t, :t] & pad  # aten.__and__.Tensor
        keep = keep | ~pad.transpose(-1, -2)  # a padded query row attends anywhere (no all-masked softmax)
        keep = keep ^ torch.zeros_like(keep)
        scores = (q @ k.transpose(-1, -2)) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(~keep, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(y) + (attention_mask.long() & 1).sum(-1, keepdim=True)[..., None].to(y.dtype)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10 + seed % 5:] = 0
    return torch.randn(2, 16, 32, generator=g), mask


@pytest.mark.parametrize("split", ["offload", "mid"])
def test_a_model_combining_bool_masks_runs_on_the_server_and_equals_eager(server, split: str) -> None:
    torch.manual_seed(0)
    module = MaskedAttention().eval()
    x, mask = _inputs(0)
    kw = {"policy": "offload"} if split == "offload" else {"server_ops": 2}
    with CoinferClient(module, (x, mask), server=server.address, link=FAST_LINK, tenant=new_tenant(),
                       profile_runs=2, fallback=False, **kw) as c:
        targets = {o.target for o in c.graph.ops}
        assert {"aten.__and__.Tensor", "aten.__or__.Tensor", "aten.__xor__.Tensor"} <= targets, targets
        n = len(c.graph.ops)
        for seed in range(3):
            x, mask = _inputs(seed)
            y = c(x, mask)
            rep = c.last_report
            assert rep.fallback is False and not rep.pinned, rep.pinned
            assert rep.server_ops == (n if split == "offload" else n - 2)
            with torch.no_grad():
                assert max_abs_diff(y, module(x, mask)) <= 1e-5


def _spec(target: str, dtype: str) -> bytes:
    def full(name: str) -> dict:
        return {"name": name, "target": "aten.full.default", "args": [[4], 1],
                "kwargs": {"dtype": {"dtype": dtype}}, "outputs": [{"shape": [4], "dtype": dtype}]}

    op = {"name": "c", "target": target, "args": [{"t": "a"}, {"t": "b"}], "kwargs": {},
          "outputs": [{"shape": [4], "dtype": dtype}]}
    return json.dumps({"version": 1, "ops": [full("a"), full("b"), op], "inputs": {}, "outputs": ["c"],
                       "weights": {}}).encode()


@pytest.mark.parametrize("target", ["aten.bitwise_and.Tensor", "aten.__or__.Tensor", "aten.bitwise_xor.Tensor"])
def test_a_bitwise_op_on_floats_fails_as_an_op_error_when_it_runs(target: str) -> None:
    """The meta kernel lets a float operand through; the CPU kernel refuses it (what a stranger's slice gets: an
    OpExecutionError, not a crash); integers run."""
    held_bytes(_spec(target, "int64"))
    with pytest.raises(OpExecutionError, match="not implemented for 'Float'"):
        held_bytes(_spec(target, "float32"))
