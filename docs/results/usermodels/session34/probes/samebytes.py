import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(8, 64)
        nn.init.zeros_(s.a.bias)
        s.register_buffer("z88", torch.zeros(8, 8))
        s.register_buffer("h", torch.zeros(128, dtype=torch.float16))
        s.register_buffer("i", torch.zeros(64, dtype=torch.int32))
        s.register_buffer("t", torch.arange(64.0).view(8, 8).t())  # transposed layout
        s.register_buffer("u", torch.arange(64.0).view(8, 8).contiguous())
        s.register_buffer("one", torch.ones(64))
        s.register_buffer("onei", torch.full((64,), 1065353216, dtype=torch.int32))

    def forward(s, x):
        h = s.a(x)  # (B,64)
        g = h.view(-1, 8, 8) + s.z88 + s.t - s.u
        return g.flatten(1) + s.h.view(64, 2).float().sum(1) + s.i + s.one * s.onei.float() * 1e-9, s.t * 1, s.u * 1


torch.manual_seed(0)
m = M().eval()
x = torch.randn(3, 8)
harness.check_all("samebytes", m, (x,), modes=("no_grad",), do_fallback=False)
