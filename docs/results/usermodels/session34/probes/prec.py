import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn

from edge_server.attacks import serve_subprocess
from ue_client import CoinferClient, new_tenant


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.a = nn.Linear(512, 512)
        s.b = nn.Linear(512, 512)
        s.c = nn.Conv2d(8, 8, 3)

    def forward(s, x, img):
        return s.b(torch.relu(s.a(x))), s.c(img), x @ x.t()


torch.manual_seed(0)
m = Net().eval()
x = torch.randn(64, 512)
img = torch.randn(1, 8, 16, 16)
proc, addr = serve_subprocess("--threads", "1")
try:
    for ops in (None, 1, 3):
        c = CoinferClient(
            m,
            (x, img),
            server=addr,
            policy="offload",
            server_ops=ops,
            link=harness.FAST_LINK,
            tenant=new_tenant(),
            profile_runs=2,
            probe=False,
            fallback=False,
        )
        with c:
            for prec in ("highest", "medium", "highest", "medium", "high", "medium"):
                torch.set_float32_matmul_precision(prec)
                with torch.no_grad():
                    y = c(x, img)
                    w = m(x, img)
                print(ops, prec, [f"{(a - b).abs().max().item():.3g}" for a, b in zip(y, w)], c.last_report.server_ops)
        torch.set_float32_matmul_precision("highest")
finally:
    proc.terminate()
    proc.wait()
