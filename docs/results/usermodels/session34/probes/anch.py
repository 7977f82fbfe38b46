import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Det(nn.Module):
    def __init__(s):
        super().__init__()
        s.box = nn.Linear(4, 4)
        s.register_buffer("anchors", torch.rand(6, 4))

    def forward(s, f):
        return {"boxes": s.anchors + s.box(f), "anchors": s.anchors}


torch.manual_seed(0)
m = Det().eval()
f = torch.randn(6, 4)
srv = harness.server()
try:
    for path, c in harness.clients(srv, m, (f,), cuts={1}):
        with c:
            for mode in (torch.no_grad, torch.inference_mode):
                with mode():
                    g = c(f)
                    w = m(f)
                print(
                    path,
                    mode.__name__,
                    "anchors is buffer: coinfer",
                    g["anchors"] is m.anchors,
                    "eager",
                    w["anchors"] is m.anchors,
                    "| is_inference coinfer",
                    g["anchors"].is_inference(),
                    "eager",
                    w["anchors"].is_inference(),
                )
finally:
    srv.stop()
