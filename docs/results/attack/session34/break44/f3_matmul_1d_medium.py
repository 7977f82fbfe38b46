"""break44 F3: precision.has_batched_products misses a batched product whose output is 2-D: aten.matmul of a 1-D
by a 3-D operand (ATen runs it as a bmm of B 1 x K x N matrices). So such a slice runs at the client's 'medium'
(served_precision keeps it), where a CPU bmm of thin matrices is ~10x slower than at 'highest', which is the rate
the op budget prices it at: one tenant holds the compute worker ~10x longer than its op budget says, and another
tenant's requests wait behind it.

Real server (coinfer-edge serve --port 0 --memory-mb 1024 --auth-tokens), two tenants. The victim (a 256-256-10
MLP, offloaded, called every 50 ms) alone for 3 s, then beside the attacker at 'highest' for 6 s, then at 'medium'
for 6 s. The attacker (a child process: torch's precision is process-wide) loops calls of
``torch.matmul(x[K], w.expand(B, K, 1)).sum(0)`` (one matmul op of output rank 2) with policy offload.
Usage: .venv/bin/python docs/results/attack/session34/break44/f3_matmul_1d_medium.py [B]   (K env, default 64)
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

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../../.."))
sys.path.insert(0, ROOT)
TOK = {"attacker": "attacker-token-b44-0000001", "victim": "victim-token-b44-000000001"}
K = int(os.environ.get("K", "64"))


class OneDByThreeD(nn.Module):
    def __init__(self, b: int):
        super().__init__()
        self.b = b
        self.w = nn.Parameter(torch.randn(1, K, 1))

    def forward(self, x):  # x: [K] -> matmul([K], [B, K, 1]) = [B, 1]: output rank 2
        return torch.matmul(x, self.w.expand(self.b, K, 1)).sum(0)


def attacker(address: str, precision: str, seconds: float, b: int) -> None:
    from tests.checks import FAST_LINK
    from ue_client import CoinferClient

    torch.set_float32_matmul_precision(precision)
    m, x = OneDByThreeD(b).eval(), torch.randn(K)
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
        torch.set_float32_matmul_precision("highest")  # the first call (profile, plan) at highest
        c(x)
        torch.set_float32_matmul_precision(precision)
        print("READY", flush=True)
        end, walls, errors = time.monotonic() + seconds, [], []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                c(x)
            except Exception as e:  # fallback off: our client gives up on its deadline; the attacker just retries
                errors.append(type(e).__name__)
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
                    "errors": errors,
                }
            ),
            flush=True,
        )


def main() -> None:
    from tests.checks import FAST_LINK
    from tests.test_server_cli import running_server
    from ue_client import CoinferClient

    b = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
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
                except Exception as e:  # fallback off: counted
                    fails.append(f"{type(e).__name__}: {str(e)[:120]}")
                lat.append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.05)
            return lat

        out = {"B": b, "K": K, "alone": victim_calls(3.0)}
        for precision in ("highest", "medium"):
            ch = subprocess.Popen(
                [sys.executable, __file__, "attacker", str(b), address, precision, "8"],
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
    for k, lat in out.items():
        if k.startswith(("alone", "with")):
            print(
                f"victim {k:28s}: {len(lat):3d} calls, median {statistics.median(lat):8.1f} ms, max {max(lat):8.1f} ms"
            )
        elif k.startswith("attacker"):
            w = lat["wall_ms"] if isinstance(lat, dict) else []
            print(
                k,
                f"{len(w)} calls, median wall {statistics.median(w) if w else '-'} ms, server_ops "
                f"{lat.get('server_ops') if isinstance(lat, dict) else lat}, client errors "
                f"{len(lat.get('errors', [])) if isinstance(lat, dict) else '-'}",
            )
        else:
            print(k, lat)


if __name__ == "__main__":
    if sys.argv[1:2] == ["attacker"]:
        attacker(sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[2]))
    else:
        main()
