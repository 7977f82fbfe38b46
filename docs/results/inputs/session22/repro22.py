"""Session 22 (inputs22): review22's findings on inputs and outputs the capture changed, run again.

    PYTHONPATH=. .venv/bin/python docs/results/inputs/session22/repro22.py            # the cases, local + server
    PYTHONPATH=. flock /work/wt/.bench.lock .venv/bin/python docs/results/inputs/session22/repro22.py --cost OLD_REV

``--cost REV``: ``modelgraph.pytree_io.signature`` (the per-call key of a call off the client's fast path) of the
tree at git revision REV against this tree's, side by side in one process (min of 7 x 20,000 calls each, old
and new alternated).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")


class Contig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x) * (1.0 if x.is_contiguous() else 2.0)


class Stride(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return self.l(x) * float(x.stride(0))


class ShapeOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        y = self.l(x)
        return y, y.shape


class WeightBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.t = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.l(x) if self.t.item() > 0 else -self.l(x)


class WeightScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("t", torch.tensor(2.0))

    def forward(self, x):
        return self.l(x) / self.t.item()


def cases(server: str | None) -> None:
    from tests.test_user_zoo_splits import FAST
    from ue_client import CoinferClient, new_tenant

    def client(m, a, **kw):
        if server is None:
            return CoinferClient(m, a, **kw)
        return CoinferClient(m, a, server=server, link=FAST, policy="offload", server_ops=0, fallback=False,
                             profile_runs=2, probe=False, tenant=new_tenant(), **kw)

    where = "server" if server else "local"
    torch.manual_seed(0)
    for cls in (Contig, Stride):
        m = cls().eval()
        with client(m, (torch.randn(2, 4),)) as c:
            for what, x in [("strided slice", torch.randn(2, 8)[:, ::2]), ("row slice", torch.randn(2, 8)[:, :4]),
                            ("contiguous", torch.randn(2, 4))]:
                d = (c(x) - m(x).detach()).abs().max().item()
                print(f"{where} {cls.__name__} {what}: max|client - eager| = {d:.3g}", flush=True)
    m = ShapeOut().eval()
    with client(m, (torch.randn(2, 4),)) as c:
        y = c(torch.randn(3, 4))
        print(f"{where} ShapeOut (y, y.shape) at batch 3: {type(y[1]).__name__} {list(y[1])}", flush=True)
    m = nn.Sequential(nn.Linear(4, 4)).eval()
    x = torch.randn(2, 4)
    with client(m, (x,)) as c:
        for tag, xi in [("sparse_coo", x.to_sparse()), ("sparse_csr", x.to_sparse_csr())]:
            try:
                c(xi)
                print(f"{where} {tag}: answered")
            except Exception as e:
                print(f"{where} {tag}: {type(e).__name__}: {str(e)[:160]}", flush=True)


def messages() -> None:
    from ue_client import CoinferClient

    for cls in (WeightBranch, WeightScale):
        try:
            CoinferClient(cls().eval(), (torch.randn(2, 4),))
        except Exception as e:
            print(f"{cls.__name__}: {type(e).__name__}: {e}", flush=True)


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cost(rev: str) -> None:
    from modelgraph import pytree_io as new

    src = subprocess.run(["git", "show", f"{rev}:modelgraph/pytree_io.py"], capture_output=True, text=True,
                         check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    old = _load(f.name, "pytree_io_old")
    img = torch.randn(1, 3, 224, 224)
    calls = {"one image": ((img,), None),
             "ids + mask kwargs": ((torch.zeros(1, 16, dtype=torch.long),), {"attention_mask": torch.ones(1, 16)}),
             "sliced image": ((torch.randn(1, 3, 224, 448)[..., ::2],), None)}
    for what, (args, kwargs) in calls.items():
        best = {"old": float("inf"), "new": float("inf")}
        for _ in range(7):  # old and new alternated, so a change of the machine's load hits both
            for label, mod in (("old", old), ("new", new)):
                t0 = time.perf_counter()
                for _ in range(20_000):
                    mod.signature(args, kwargs)
                best[label] = min(best[label], (time.perf_counter() - t0) / 20_000 * 1e6)
        print(f"signature, {what}: old {best['old']:.2f} us, new {best['new']:.2f} us, "
              f"new/old {best['new'] / best['old']:.3f}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) > 2 and sys.argv[1] == "--cost":
        cost(sys.argv[2])
        sys.exit(0)
    from edge_server.testing import ServerThread

    cases(None)
    srv = ServerThread(threads=1).start()
    try:
        cases(srv.address)
    finally:
        srv.stop()
    messages()
