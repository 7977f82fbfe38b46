"""Warm requests of ``auto`` (coinfer) and ``neurosurgeon`` on the same whole-model split, interleaved request by
request, one edge server (a subprocess, 2 threads, loopback), ``ue_slowdown`` 10 (both plan the whole model onto the
server), full CPU. Per policy, over the requests after the third that uploaded nothing: latency, the process CPU per
request, the server's total and compute, latency - server total, the plan's CPU.

Usage: ``PYTHONPATH=. python docs/results/stream/session20/warm_side_by_side.py MODEL N`` (session 20: under
``flock /work/wt/.bench.lock``, ``mobilenet_v2 14``; output in ``warm_side_by_side.txt``)."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time

import torch

from modelgraph.tv_compat import import_torchvision
from ue_client.client import CoinferClient


def main(name: str, n: int) -> None:
    tv = import_torchvision()
    srv = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                            "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        addr = None
        for line in srv.stdout:
            m = re.match(r"listening on (\S+?):(\d+)", line)
            if m:
                addr = f"127.0.0.1:{m.group(2)}"
                break
        torch.manual_seed(0)
        model = getattr(tv.models, name)(weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        cs = {p: CoinferClient(model, (x,), server=addr, policy=p, tenant=f"s20w-{p}-{os.getpid()}", horizon=40,
                               link={"uplink_mbps": 400, "rtt_ms": 2}, ue_slowdown=10.0)
              for p in ("auto", "neurosurgeon")}
        rows: dict[str, list[tuple]] = {p: [] for p in cs}
        try:
            for _ in range(n):
                for p, c in cs.items():
                    t0, p0 = time.perf_counter(), time.process_time()
                    c(x)
                    ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - p0) * 1e3
                    r = c.last_report
                    st = r.server_timings or {}
                    total = st.get("total_ms", 0.0) if isinstance(st, dict) else getattr(st, "total_ms", 0.0)
                    comp = st.get("compute_ms", 0.0) if isinstance(st, dict) else getattr(st, "compute_ms", 0.0)
                    rows[p].append((ms, cpu, r.server_ops, r.uploaded_weight_bytes, total, comp, r.plan_cpu_ms))
                    time.sleep(0.05)
            for p, rs in rows.items():
                w = [r for r in rs[3:] if r[3] == 0 and r[2]]
                cols = ([r[0] for r in w], [r[1] for r in w], [r[4] for r in w], [r[5] for r in w],
                        [r[0] - r[4] for r in w], [r[6] for r in w])
                lat, cpu, total, comp, side, plan = (statistics.fmean(v) for v in cols)
                print(f"{p} ops {rs[-1][2]} n {len(w)} lat {lat:.1f} cpu {cpu:.2f} srv_total {total:.1f} "
                      f"srv_comp {comp:.1f} side {side:.1f} plan_cpu {plan:.3f}")
        finally:
            for c in cs.values():
                c.close()
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 12)
