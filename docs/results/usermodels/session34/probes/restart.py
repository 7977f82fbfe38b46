import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import torch
from torch import nn

from ue_client import CoinferClient, new_tenant

root = os.getcwd()


def start(port):
    cmd = [
        sys.executable,
        "-m",
        "edge_server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-port",
        "0",
    ]
    p = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=root),
    )
    line = p.stdout.readline()
    assert "listening on" in line, line
    return p, line.split("listening on", 1)[1].strip()


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.f = nn.Sequential(*[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()) for _ in range(6)])
        s.stem = nn.Conv2d(3, 32, 3, padding=1)
        s.head = nn.Linear(32, 10)

    def forward(s, x):
        return s.head(s.f(s.stem(x)).mean((2, 3)))


torch.manual_seed(0)
m = Net().eval()
x = torch.randn(2, 3, 64, 64)
p, addr = start(0)
port = int(addr.rsplit(":", 1)[1])
results = []
for policy, ops in (("offload", None), ("offload", 6)):
    c = CoinferClient(
        m,
        (x,),
        server=addr,
        policy=policy,
        server_ops=ops,
        link=harness.FAST_LINK,
        tenant=new_tenant(),
        profile_runs=2,
        probe=False,
        timeout_ms=20000,
    )
    with c:
        for i in range(14):
            xi = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i))
            killer = None
            if i in (3, 9):  # kill -9 while this request is in flight, then restart on the same port

                def kill_later(p=p):
                    time.sleep(0.03)
                    p.send_signal(signal.SIGKILL)

                killer = threading.Thread(target=kill_later)
                killer.start()
            if i in (5, 11):
                p, _ = start(port)
            t0 = time.time()
            try:
                y = c(xi)
                with torch.no_grad():
                    w = m(xi)
                d = (y - w).abs().max().item()
                r = c.last_report
                results.append((policy, ops, i, f"{d:.2g}", r.server_ops, r.fallback, round(time.time() - t0, 2)))
            except Exception as e:
                results.append((policy, ops, i, f"{type(e).__name__}: {str(e)[:120]}"))
            if killer:
                killer.join()
                p.wait()
            print(results[-1], flush=True)
p.kill()
p.wait()
