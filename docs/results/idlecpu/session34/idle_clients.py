"""Does an open, idle remote client cost a UE process CPU? (session 34)

A process runs local mobilenet_v2 requests with a local client alone, then with N connected ``auto`` clients open
beside it (idle between their own calls, as the testbed's paired streams leave them), and reports the process CPU
per local request and the process's CPU while idle for 2 s.

Usage (from the repository root): python docs/results/idlecpu/session34/idle_clients.py [--clients 1,4] [--requests 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="0,1,4")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=2.0)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from edge_server.attacks import serve_subprocess
    from ue_client.client import CoinferClient
    from ue_client.model import prepare_model

    proc, addr = serve_subprocess()
    try:
        m = prepare_model("torchvision:mobilenet_v2")
        x = tuple(torch.randn(t.shape) for t in m.example_inputs)
        local = CoinferClient(m.graph, m.example_inputs, policy="local")
        for _ in range(3):
            local(*x)
        for n in [int(v) for v in a.clients.split(",")]:
            others = [CoinferClient(m.graph, m.example_inputs, server=addr, policy="auto") for _ in range(n)]
            for c in others:
                c.engine.connect()
                c(*x)
            time.sleep(0.5)
            c0 = time.process_time()
            time.sleep(a.idle_s)
            idle = (time.process_time() - c0) * 1e3
            cpu = []
            for _ in range(a.requests):
                c0 = time.process_time()
                local(*x)
                cpu.append((time.process_time() - c0) * 1e3)
            print(
                f"{n} open auto clients: local request CPU median {statistics.median(cpu):.2f} ms "
                f"(min {min(cpu):.2f}); process CPU idle {idle / a.idle_s:.2f} ms/s",
                flush=True,
            )
            for c in others:
                c.close()
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
