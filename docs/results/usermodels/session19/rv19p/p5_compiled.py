"""A torch.compile'd module (in place: module.compile()) drawing from a NumPy Generator kept on it: traced_reads
yields no reads for a compiled module, so _python_draws returns None without looking."""

import numpy as np
import torch
from torch import nn

from modelgraph.capture import capture
from modelgraph.execute import run_graph


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rng = np.random.default_rng(2)

    def forward(self, x):
        return self.fc(x) * (1.0 if self.rng.random() < 0.7 else -1.0)


for compiled in (False, True):
    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 4)
    if compiled:
        m.compile()
    try:
        g = capture(m, (x,))
    except Exception as e:
        print("compiled" if compiled else "plain", "refused:", str(e)[:140])
        continue
    diffs = 0
    for _ in range(20):
        with torch.no_grad():
            e = m(x)
        diffs += not torch.allclose(run_graph(g, (x,)), e)
    print("compiled" if compiled else "plain", "CAPTURED; graph differs from eager in", diffs, "of 20 calls")
