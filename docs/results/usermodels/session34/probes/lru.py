import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 8, 3, padding=1)
        s.bn = nn.BatchNorm2d(8)
        s.fc = nn.Linear(8, 4)

    def forward(s, x):
        return s.fc(torch.relu(s.bn(s.c(x))).mean((2, 3)))


torch.manual_seed(0)
m = Net().eval()
m.bn.running_mean.uniform_()
x0 = torch.randn(2, 3, 8, 8)
srv = harness.server()
try:
    for path, ops in (("all-server", None), ("split2", 2)):
        with harness.remote(srv, m, (x0,), ops, fallback=False) as c:
            bad = 0
            for rnd in range(2):
                for b, hw in ((1, 8), (3, 8), (2, 9), (5, 8), (2, 8), (7, 6), (4, 8), (1, 8)):
                    x = torch.randn(b, 3, hw, hw)
                    if rnd and b == 3:
                        x = x.to(memory_format=torch.channels_last)
                    with torch.no_grad():
                        y = c(x)
                        w = m(x)
                    p = harness.diff(y, w)
                    if p or c.last_report.fallback:
                        bad += 1
                        print(path, b, hw, p, c.last_report.fallback)
            print(path, "bad", bad)
finally:
    srv.stop()
