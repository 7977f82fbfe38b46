"""bound20: what an honest tenant pays for the intake bound, on loopback: a resnet18 full offload
(``CoinferClient(policy="offload")``, one tenant alone) against ``coinfer-edge serve`` of the version before
(PROBE_ROOT) and of this checkout, with default flags and with ``--memory-mb 2048 --max-reading-mb 32`` (the
server-wide reading slots, which turn grpc's BDP probing off), in alternating rounds.

Per run: the cold request (connect, upload, OpenSession and its slice's validation, the request), the median and p90
of ``--warm`` warm requests (wall, ms), the server process's CPU over the whole run (psutil, user + system) and the
output's max |diff| against the eager model. Loopback only: the extra round trip that BDP probing off costs a message
over 64 KiB on a real link is not measured here.

    PYTHONPATH=$PWD python docs/results/attack/session20/honest_probe.py BEFORE_ROOT [--rounds 2] [--warm 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

import psutil

from edge_server.attacks import serve_subprocess
from ue_client import CoinferClient, new_tenant
from ue_client.cli_run import max_abs_diff

MODEL = "torchvision:resnet18"


def one(root: str | None, flags: list[str], warm: int) -> dict:
    proc, addr = serve_subprocess("--threads", "1", *flags, root=root)
    try:
        ps = psutil.Process(proc.pid)
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.perf_counter()
        with CoinferClient(MODEL, server=addr, policy="offload", tenant=new_tenant(), threads=1) as c:
            x = c.example_inputs
            y = c(*x)
            cold = (time.perf_counter() - t0) * 1e3
            ws = []
            for _ in range(warm):
                t1 = time.perf_counter()
                y = c(*x)
                ws.append((time.perf_counter() - t1) * 1e3)
            diff = max_abs_diff(c.reference(*x), y)
        cpu = sum(ps.cpu_times()[:2]) - cpu0
    finally:
        proc.terminate()
        proc.wait(10)
    ws.sort()
    return {"cold_ms": round(cold, 1), "warm_median_ms": round(statistics.median(ws), 2),
            "warm_p90_ms": round(ws[int(0.9 * (len(ws) - 1))], 2), "server_cpu_s": round(cpu, 3),
            "max_abs_diff": float(diff)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before_root")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    configs = [("before", a.before_root, []), ("this", None, []),
               ("this --max-reading-mb 32", None, ["--memory-mb", "2048", "--max-reading-mb", "32"])]
    rows = []
    one(None, [], 1)  # not counted: the client's first capture of the model, the caches' first fill
    for r in range(a.rounds):
        for name, root, flags in configs:
            out = {"round": r, "server": name, **one(root, flags, a.warm)}
            print(json.dumps(out), flush=True)
            rows.append(out)
    for name, _, _ in configs:
        mine = [x for x in rows if x["server"] == name]
        print(f"{name:28s} cold {statistics.median(x['cold_ms'] for x in mine):7.1f} ms  warm median "
              f"{statistics.median(x['warm_median_ms'] for x in mine):6.2f} ms  p90 "
              f"{statistics.median(x['warm_p90_ms'] for x in mine):6.2f} ms  server CPU "
              f"{statistics.median(x['server_cpu_s'] for x in mine):.3f} s  (medians over {len(mine)} rounds)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
