"""Changes around a fallback: (a) warm split, .data write, server killed, call (fallback on); (b) warm split, server
killed, call falls back, .data write, server back? (no: next call falls back again) -> must be refused either way."""

import os
import signal
import subprocess

import torch
from common import client
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))


def start():
    p = subprocess.Popen(
        [os.path.join(ROOT, ".venv/bin/coinfer-edge"), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in p.stdout:
        if line.startswith("listening on "):
            return p, line.split()[-1]
    raise SystemExit("server did not start")


def outcome(c, m, x, label):
    try:
        y = c(x)
    except Exception as e:
        print(f"{label}: refused {type(e).__name__}: {str(e)[:80]}")
        return
    d = (y - m(x)).abs().max().item()
    r = c.last_report
    print(
        f"{label}: answered |client-eager| = {d:.3g} srv={r.server_ops} fallback={r.fallback}"
        f"{'  WRONG' if d > 1e-4 else ''}"
    )


torch.manual_seed(0)
x = torch.randn(8, 64)
for order in ("change-then-kill", "kill-then-change"):
    p, addr = start()
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)).eval()
    with client(m, (x,), k=2, fallback=True, server=addr) as c, torch.no_grad():
        for _ in range(3):
            c(x)
        print(order, "warm:", c.last_report.server_ops, "server ops")
        if order == "change-then-kill":
            m[2].bias.data.add_(1.0)
            p.send_signal(signal.SIGKILL)
            p.wait()
            outcome(c, m, x, f"{order}: call 1")
            outcome(c, m, x, f"{order}: call 2")
        else:
            p.send_signal(signal.SIGKILL)
            p.wait()
            outcome(c, m, x, f"{order}: call 1 (no change)")
            m[2].bias.data.add_(1.0)
            outcome(c, m, x, f"{order}: call 2 (after change)")
    if p.poll() is None:
        p.kill()
        p.wait()
