"""break42 F1 after session 34's fix: another tenant's latency beside the thin-bmm attacker, before and after.

Two ``coinfer-edge serve`` processes from two trees, one after the other: "before" from a checkout of the commit
before the fix (``--old-tree``, e.g. ``git worktree add --detach /tmp/old <commit>``), "after" from this tree, each
at ``--memory-mb 1024 --auth-tokens`` and each per-op budget of ``--op-time-ms`` given (default and a tight one). Per
server: the victim (session 33's 256-256-10 MLP, offloaded, called every 50 ms) alone for 3 s, then beside the
attacker for 6 s; the attacker is session 33's (``../session33/f1_medium_bmm_stall.py attacker``: ``bmm`` of B
broadcast 1 x K x 1 products, called in a loop at "highest" by our own client, policy offload, fallback off).

Usage (one run, both trees): K=4096 .venv/bin/python docs/results/attack/session34/f1_before_after.py
    --old-tree /tmp/old [B] [--budgets 2000,200]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../../../.."))
sys.path.insert(0, ROOT)
ATTACKER = os.path.join(ROOT, "docs/results/attack/session33/f1_medium_bmm_stall.py")
TOK = {"attacker": "attacker-token-s33-0000001", "victim": "victim-token-s33-000000001"}


def serve(tree: str, tokens: str, op_ms: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": tree}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_server.cli",
            "serve",
            "--port",
            "0",
            "--cache-mb",
            "64",
            "--memory-mb",
            "1024",
            "--auth-tokens",
            tokens,
            "--op-time-ms",
            op_ms,
        ],
        cwd=tree,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = p.stdout.readline()
    if not line.startswith("listening on "):
        p.kill()
        raise SystemExit(f"no address line from the server in {tree}: {line!r}")
    return p, line.split()[-1]


def phase(label: str, tree: str, tokens: str, op_ms: str, b: int) -> dict:
    import torch
    from torch import nn

    from tests.checks import FAST_LINK
    from ue_client import CoinferClient

    torch.manual_seed(0)
    vm, vx = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval(), torch.randn(4, 256)
    proc, address = serve(tree, tokens, op_ms)
    out: dict = {"server": label, "op_time_ms": op_ms}
    try:
        with CoinferClient(
            vm,
            (vx,),
            server=address,
            token=TOK["victim"],
            policy="offload",
            link=FAST_LINK,
            profile_runs=2,
            fallback=False,
            probe=False,
        ) as v:
            for _ in range(3):
                v(vx)

            def calls(seconds: float) -> list[float]:
                lat, end = [], time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.perf_counter()
                    try:
                        v(vx)
                    except Exception as e:  # counted: our client (fallback off) gives up on a silent server
                        out.setdefault("victim failures", []).append(f"{type(e).__name__}: {str(e)[:100]}")
                    lat.append((time.perf_counter() - t0) * 1e3)
                    time.sleep(0.05)
                return lat

            out["alone"] = calls(3.0)
            ch = subprocess.Popen(
                [sys.executable, ATTACKER, "attacker", str(b), address, "highest", "8"],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                ready = any(line.startswith("READY") for line in iter(ch.stdout.readline, ""))
                out["beside the attacker"] = calls(6.0)
                rest, err = ch.communicate(timeout=180)
                if "ATTACKER" in rest:
                    a = json.loads(rest.split("ATTACKER", 1)[1])
                    out["attacker"] = f"{a['calls']} calls, wall {min(a['wall_ms'])}-{max(a['wall_ms'])} ms"
                else:
                    out["attacker"] = ("ran" if ready else "refused: ") + err.strip().splitlines()[-1][:300]
            finally:
                if ch.poll() is None:
                    ch.kill()
                    ch.wait()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("b", nargs="?", type=int, default=65_536)
    ap.add_argument("--old-tree", required=True)
    ap.add_argument("--budgets", default="2000,200")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    tokens = os.path.join(tmp, "tokens.json")
    with open(tokens, "w") as f:
        json.dump({"tenants": {n: {"token": t} for n, t in TOK.items()}}, f)
    print(f"B={a.b} K={os.environ.get('K', '64')} before={a.old_tree} after={ROOT}", flush=True)
    for op_ms in a.budgets.split(","):
        for label, tree in (("before", a.old_tree), ("after", ROOT)):
            r = phase(label, tree, tokens, op_ms, a.b)
            for k in ("alone", "beside the attacker"):
                lat = r[k]
                print(
                    f"--op-time-ms {op_ms:>5s} {label:6s} victim {k:20s}: {len(lat):3d} calls, median "
                    f"{statistics.median(lat):7.1f} ms, max {max(lat):7.1f} ms",
                    flush=True,
                )
            print(
                f"--op-time-ms {op_ms:>5s} {label:6s} attacker: {r['attacker']}; victim failures: "
                f"{len(r.get('victim failures', []))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
