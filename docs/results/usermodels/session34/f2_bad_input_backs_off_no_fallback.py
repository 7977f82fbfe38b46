"""F2: with ``fallback=False``, a request whose *inputs* make an op fail on the server (token ids past an embedding:
eager raises IndexError too) is blamed on the server: the client backs off (``Connection.note_failure``: 0.5 s,
doubling per failure that reaches the server, up to 30 s) and every *good* request in that window raises the bad
request's stale error (``RequestFailed`` "indices holds 18 ...", the server's message for the earlier ids) without
reaching the server, although eager answers them and the server is healthy. With the default ``fallback=True`` the
same sequence answers the good requests (session 16's rule: a rest that fails on the UE too is the inputs' fault;
``RequestPath`` checks it only on the fallback branch).

Run: .venv/bin/python docs/results/usermodels/session34/f2_bad_input_backs_off_no_fallback.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)
        self.e = nn.Embedding(10, 4)

    def forward(self, img, ids):
        return self.c(img).mean((2, 3)) + self.e(ids).sum(1)


torch.manual_seed(0)
m = Net().eval()
img, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))
srv = harness.server()
try:
    for fallback in (False, True):
        with harness.remote(srv, m, (img, ids), None, fallback=fallback) as c:
            c(img, ids)
            for _ in range(5):  # five bad batches (a user's tokenizer with a bigger vocabulary)
                try:
                    c(img, ids + 10)
                except Exception as e:
                    bad = e
            print(f"fallback={fallback}: the bad requests raised {type(bad).__name__}: {str(bad)[:110]}")
            t0 = time.monotonic()
            for k in range(12):
                x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k))
                good = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(k))
                with torch.no_grad():
                    want = m(x, good)
                try:
                    y = c(x, good)
                    print(
                        f"  t={time.monotonic() - t0:4.1f}s good request: answered, max|diff| "
                        f"{(y - want).abs().max().item():.3g} (eager answers)"
                    )
                except Exception as e:
                    print(
                        f"  t={time.monotonic() - t0:4.1f}s good request: {type(e).__name__}: {str(e)[:90]}"
                        " (eager answers)"
                    )
                time.sleep(0.1)
finally:
    srv.stop()
