import sys

sys.path.insert(0, "docs/results/usermodels/session34")
import harness
import numpy as np
import torch
from torch import nn

from ue_client import CoinferClient


class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.c = nn.Conv2d(3, 4, 3)
        s.e = nn.Embedding(10, 4)

    def forward(s, img, ids, *, scale: float = 1.0, mask=None):
        y = s.c(img).mean((2, 3)) * scale + s.e(ids).sum(1)
        return y if mask is None else y * mask


torch.manual_seed(0)
m = Net().eval()
img, ids = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5))
cases = {
    "missing ids": ((img,), {}),
    "extra positional": ((img, ids, 3.0), {}),
    "unknown kwarg": ((img, ids), {"foo": 1}),
    "img 3 channels->4": ((torch.randn(2, 4, 8, 8), ids), {}),
    "img 3d": ((torch.randn(3, 8, 8), ids), {}),
    "img float64": ((img.double(), ids), {}),
    "img int": ((img.long(), ids), {}),
    "ids float": ((img, ids.float()), {}),
    "ids int32": ((img, ids.int()), {}),
    "ids out of range": ((img, ids + 10), {}),
    "ids negative": ((img, ids - 11), {}),
    "img list": ((img.tolist(), ids), {}),
    "img numpy f64": ((img.numpy().astype(np.float64), ids), {}),
    "img numpy f32": ((img.numpy(), ids), {}),
    "img None": ((None, ids), {}),
    "img too small": ((torch.randn(2, 3, 2, 2), ids), {}),
    "mask wrong shape": ((img, ids), {"mask": torch.ones(3, 4)}),
    "mask bool": ((img, ids), {"mask": torch.ones(2, 4, dtype=torch.bool)}),
    "scale tensor": ((img, ids), {"scale": torch.tensor(2.0)}),
    "scale int": ((img, ids), {"scale": 2}),
    "img requires grad": ((img.clone().requires_grad_(), ids), {}),
    "img nan": ((img * float("nan"), ids), {}),
    "img meta": ((img.to("meta"), ids), {}),
    "img sparse": ((img.to_sparse(), ids), {}),
}
srv = harness.server()
try:
    for path, c in [
        ("local", CoinferClient(m, (img, ids))),
        ("all-server", harness.remote(srv, m, (img, ids), None, fallback=False)),
    ]:
        with c:
            c(img, ids)
            for name, (a, k) in cases.items():
                try:
                    with torch.no_grad():
                        w = m(*a, **k)
                        we = None
                except Exception as e:
                    w, we = None, e
                try:
                    with torch.no_grad():
                        g = c(*a, **k)
                        ge = None
                except Exception as e:
                    g, ge = None, e
                if we is None and ge is None:
                    p = harness.diff(g, w)
                    st = "both ok" + ("" if not p else f" BUT {p[:2]}")
                elif we is None:
                    st = f"EAGER OK, coinfer {type(ge).__name__}: {str(ge)[:230]}"
                elif ge is None:
                    st = f"EAGER RAISES {type(we).__name__}, coinfer ANSWERED {type(g)}"
                else:
                    st = f"both raise: eager {type(we).__name__}, coinfer {type(ge).__name__}: {str(ge)[:230]}"
                print(f"[{path}] {name}: {st}")
finally:
    srv.stop()
