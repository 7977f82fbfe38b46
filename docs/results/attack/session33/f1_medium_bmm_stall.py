"""F1: one tenant's 'medium' matmul precision turns a bmm of tiny matrices the op budget prices at ~1 ms into a
multi-second, non-preemptible op on the server's only compute worker; another tenant's requests wait behind it.

Real server (coinfer-edge serve --port 0 --memory-mb 1024 --auth-tokens), two tenants, our own client
(CoinferClient, policy offload). The attacker runs in a child process (torch's precision is process-wide) and
loops calls of the same model, once at 'highest', once at 'medium'; the victim (a small MLP) calls meanwhile.
Usage: .venv/bin/python docs/results/attack/session33/f1_medium_bmm_stall.py [B]
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
sys.path.insert(0, ROOT)
TOK = {"attacker": "attacker-token-s33-0000001", "victim": "victim-token-s33-000000001"}
K = int(os.environ.get("K", "64"))
B = (
    int(sys.argv[2])
    if len(sys.argv) > 2 and sys.argv[1] == "attacker"
    else (int(sys.argv[1]) if len(sys.argv) > 1 else 3_000_000)
)


class TinyBmm(nn.Module):
    """bmm of B (1 x 64) @ (64 x 1) matrices, both operands broadcast views of one small tensor."""

    def __init__(self, b: int):
        super().__init__()
        self.b = b
        self.w = nn.Parameter(torch.randn(1, K, 1))

    def forward(self, x):
        return torch.bmm(x.expand(self.b, 1, K), self.w.expand(self.b, K, 1)).sum(0)


def attacker(address: str, precision: str, seconds: float, b: int) -> None:
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient

    cycle = ("highest", "high", "medium") if precision == "alternate" else (precision,)
    torch.set_float32_matmul_precision(cycle[0])
    m, x = TinyBmm(b).eval(), torch.randn(1, 1, K)
    with CoinferClient(
        m,
        (x,),
        server=address,
        token=TOK["attacker"],
        policy="offload",
        link=FAST_LINK,
        profile_runs=2,
        fallback=False,
        probe=False,
    ) as c:
        c(x)
        print("READY", flush=True)
        end, walls = time.monotonic() + seconds, []
        while time.monotonic() < end:
            torch.set_float32_matmul_precision(cycle[len(walls) % len(cycle)])  # each request its own precision
            t0 = time.perf_counter()
            c(x)
            walls.append((time.perf_counter() - t0) * 1e3)
        r = c.reports[-1]
        print(
            "ATTACKER",
            json.dumps(
                {
                    "precision": precision,
                    "calls": len(walls),
                    "wall_ms": [round(w) for w in walls],
                    "server_ops": r.server_ops,
                    "fallback": r.fallback,
                }
            ),
            flush=True,
        )


def main() -> None:
    from tests.checks import FAST_LINK
    from tests.test_server_cli import running_server
    from ue_client import CoinferClient

    tmp = tempfile.mkdtemp()
    tokens = os.path.join(tmp, "tokens.json")
    with open(tokens, "w") as f:
        json.dump({"tenants": {n: {"token": t} for n, t in TOK.items()}}, f)
    torch.manual_seed(0)
    vm, vx = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval(), torch.randn(4, 256)
    with (
        running_server("--memory-mb", "1024", "--auth-tokens", tokens) as (_proc, address),
        CoinferClient(
            vm,
            (vx,),
            server=address,
            token=TOK["victim"],
            policy="offload",
            link=FAST_LINK,
            profile_runs=2,
            fallback=False,
            probe=False,
        ) as v,
    ):
        for _ in range(3):
            v(vx)

        fails: list = []

        def victim_calls(seconds):
            lat, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    v(vx)
                except Exception as e:  # our client (fallback=False) gives up on a silent server: counted
                    fails.append(f"{type(e).__name__}: {str(e)[:120]}")
                lat.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.05)
            return lat

        out = {"B": B, "K": K, "alone": victim_calls(3.0)}
        for precision in os.environ.get("PHASES", "highest,medium").split(","):
            ch = subprocess.Popen(
                [sys.executable, __file__, "attacker", str(B), address, precision, "8"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                for line in ch.stdout:
                    if line.startswith("READY"):
                        break
                n_fail = len(fails)
                out[f"with attacker at {precision}"] = victim_calls(6.0)
                out[f"victim failures at {precision}"] = fails[n_fail:]
                rest = ch.communicate(timeout=120)[0]
                out[f"attacker {precision}"] = json.loads(rest.split("ATTACKER", 1)[1]) if "ATTACKER" in rest else rest
            finally:
                if ch.poll() is None:
                    ch.kill()
                    ch.wait()
        out["victim fallbacks"] = sum(r.fallback for r in v.reports)
    for k, lat in out.items():
        if k.startswith(("alone", "with")):
            print(
                f"victim {k:28s}: {len(lat):3d} calls, median {statistics.median(lat):8.1f} ms, max {max(lat):8.1f} ms"
            )
        else:
            print(k, lat)


if __name__ == "__main__":
    if sys.argv[1:2] == ["attacker"]:
        attacker(sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[2]))
    else:
        main()
