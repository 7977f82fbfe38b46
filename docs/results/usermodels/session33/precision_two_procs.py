"""Two UE processes on one server at once, one at "medium", one at "highest": each answer against its own eager."""

import subprocess
import sys

if len(sys.argv) == 1:
    procs = [
        subprocess.Popen([sys.executable, __file__, p], stdout=subprocess.PIPE, text=True)
        for p in ("medium", "highest")
    ]
    for p in procs:
        out, _ = p.communicate()
        print(out.strip())
    raise SystemExit

import torch
from common import client
from torch import nn

prec = sys.argv[1]
torch.manual_seed(0)
m = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(4)]).eval()
x = torch.randn(32, 256)
torch.set_float32_matmul_precision(prec)
worst, n = 0.0, 0
with client(m, (x,), k=0) as c, torch.no_grad():
    for _i in range(60):
        y = c(x)
        worst = max(worst, (y - m(x)).abs().max().item())
        n += c.last_report.server_ops > 0
print(f"{prec}: {n}/60 offloaded, worst |client - eager| = {worst:.3g}{'  WRONG' if worst > 1e-4 else ''}")
