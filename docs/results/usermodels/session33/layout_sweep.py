"""Outputs' strides and aliasing vs eager, every cut, three grad modes, a write into an output afterwards."""

import contextlib
import sys
from dataclasses import dataclass

import torch
from common import client, compare
from torch import nn

torch.manual_seed(0)


class Views(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.register_buffer("buf", torch.arange(12.0).reshape(3, 4))

    def forward(self, x):
        h = torch.relu(self.lin(x)) * 2
        return {
            "a": h,
            "t": h.T,
            "u": h.unsqueeze(1),
            "n": h.narrow(1, 2, 3),
            "s": h.as_strided((2, 2), (1, 2)),
            "vv": h.t()[1:].unsqueeze(0)[:, ::2],
        }


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        h = self.lin(x).sigmoid()
        return h, (h, [h.view(-1), h]), x.T, x[1:].narrow(1, 0, 2)


class CL(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.c(x).relu()
        return y.contiguous(memory_format=torch.channels_last), y.permute(0, 2, 3, 1), y.mean((2, 3))


class WeightAlias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.register_buffer("buf", torch.arange(12.0).reshape(3, 4))

    def forward(self, x):
        return self.lin(x), self.lin.weight.T, self.buf[1:], self.buf


@dataclass
class Out:
    logits: torch.Tensor
    feats: torch.Tensor
    t: torch.Tensor


torch.export.register_dataclass(Out)


class DC(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x):
        f = self.lin(x).tanh()
        return Out(f.sum(-1), f, f.mT)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.MultiheadAttention(8, 2, batch_first=True)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        y, _ = self.m(x, x, x, need_weights=False)
        return self.ln(y)


MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": contextlib.nullcontext}


def write(out):
    import torch.utils._pytree as pytree

    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    try:
        with torch.no_grad():
            leaves[0].add_(100.0)
        return out
    except RuntimeError as e:
        return f"raised {type(e).__name__}: {str(e)[:60]}"


def run(name, m, x, x2=None, step=1):
    m.eval()
    params = list(m.parameters()) + list(m.buffers())
    fails = 0
    base = client(m, (x,), k=0)
    graph = base.graph
    n = len(graph.ops)
    base.close()
    cuts = list(range(0, n + 1, step)) + ([n] if n % step else [])
    plan = [(k, False) for k in cuts] + [(k, True) for k in (n // 2, n)]
    for k, mod in plan:
        with client(m, (x,), k=k) if mod else client(graph, (x,), k=k, name=name) as c:
            for mode, ctx in MODES.items():
                for xx in [x] + ([x2] if x2 is not None and mod else []):
                    for warm in ("cold", "warm") if mode == "no_grad" else ("warm",):
                        with ctx():
                            want = m(xx)
                            got = c(xx)
                        tag = f"{name}{'(module)' if mod else ''} k={k}/{n} {mode} {warm} shape={tuple(xx.shape)} srv={c.last_report.server_ops}"  # noqa: E501
                        p = compare(tag, got, want, (xx,), params)
                        fails += bool(p)
                        if warm == "warm" and mode != "inference_mode":
                            ww, wg = write(want), write(got)
                            if isinstance(ww, str) or isinstance(wg, str):
                                if str(ww) != str(wg):
                                    print(
                                        f"FAIL {tag} write: eager {ww if isinstance(ww, str) else 'ok'} / "
                                        f"client {wg if isinstance(wg, str) else 'ok'}"
                                    )
                                    fails += 1
                            else:
                                fails += bool(compare(tag + " after write", wg, ww, (xx,), params))
    return fails


if __name__ == "__main__":
    which = sys.argv[1:] or ["views", "twice", "cl", "walias", "dc", "mha"]
    total = 0
    for w in which:
        if w == "views":
            total += run("views", Views(), torch.randn(4, 6), torch.randn(3, 6))
        if w == "twice":
            total += run("twice", Twice(), torch.randn(6, 6))
        if w == "cl":
            total += run("cl", CL(), torch.randn(2, 3, 5, 5), torch.randn(1, 3, 5, 5))
        if w == "walias":
            total += run("walias", WeightAlias(), torch.randn(2, 6))
        if w == "dc":
            total += run("dc", DC(), torch.randn(3, 6))
        if w == "mha":
            total += run("mha", MHA(), torch.randn(2, 5, 8), torch.randn(3, 5, 8), step=4)
    print("TOTAL FAILS", total)
