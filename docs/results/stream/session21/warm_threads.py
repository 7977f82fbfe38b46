"""Warm requests of ``auto`` (coinfer) and ``neurosurgeon`` on the same whole-model split, per thread: where the
UE's CPU goes in a warm request and in the gap after it (the next request's time on a throttled UE).

One edge server (a subprocess, 2 threads, loopback); per policy a UE process (``--child``), alternated
``--rounds`` times (A B A B ...), each making ``N`` requests 50 ms apart with ``ue_slowdown`` 10 (both plan the whole
model onto the server), full CPU. Over the requests after the third that uploaded nothing: latency, the process CPU
inside the call and in the 50 ms gap after it, and per thread name (``/proc/self/task/*/schedstat``) the CPU per
request over call + gap.

Usage: ``PYTHONPATH=. python docs/results/stream/session21/warm_threads.py MODEL N ROUNDS`` (session 21: under
``flock /work/wt/.bench.lock``; output in ``warm_threads.txt``)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def snap() -> dict[int, tuple[str, int]]:
    out = {}
    for d in Path("/proc/self/task").iterdir():
        try:
            out[int(d.name)] = ((d / "comm").read_text().strip(), int((d / "schedstat").read_text().split()[0]))
        except (OSError, ValueError):
            continue
    return out


def child(addr: str, policy: str, name: str, n: int) -> None:
    import torch

    from modelgraph.tv_compat import import_torchvision
    from ue_client.client import CoinferClient

    tv = import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    c = CoinferClient(model, (x,), server=addr, policy=policy, tenant=f"s21w-{policy}-{os.getpid()}", horizon=40,
                      link={"uplink_mbps": 400, "rtt_ms": 2}, ue_slowdown=10.0)
    rows, threads = [], {}
    try:
        for k in range(n):
            s0 = snap()
            t0, p0 = time.perf_counter(), time.process_time()
            y = c(x)
            ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - p0) * 1e3
            p1 = time.process_time()
            time.sleep(0.05)
            gap = (time.process_time() - p1) * 1e3
            s1 = snap()
            r = c.last_report
            st = r.server_timings or {}
            total = st.get("total_ms", 0.0) if isinstance(st, dict) else getattr(st, "total_ms", 0.0)
            warm = k >= 3 and r.uploaded_weight_bytes == 0 and r.server_ops
            rows.append({"ms": ms, "cpu": cpu, "gap_cpu": gap, "server_total": total, "plan_cpu": r.plan_cpu_ms,
                         "warm": bool(warm)})
            if warm:
                pynames = {t.native_id: t.name for t in threading.enumerate()}
                for tid, (comm, ns) in s1.items():
                    nm = "<caller>" if tid == threading.get_native_id() else pynames.get(tid, comm)
                    nm = re.sub(r"-\d+$", "", nm)
                    threads[nm] = threads.get(nm, 0.0) + (ns - s0.get(tid, (comm, 0))[1]) / 1e6
        assert torch.allclose(y, model(x), atol=1e-4)
    finally:
        c.close()
    w = [r for r in rows if r["warm"]]
    print("RESULT " + json.dumps({"policy": policy, "n": len(w), **{k: statistics.fmean(r[k] for r in w)
                                  for k in ("ms", "cpu", "gap_cpu", "server_total", "plan_cpu")},
                                  "threads": {k: v / len(w) for k, v in sorted(threads.items(), key=lambda kv: -kv[1])
                                              if v > 0}}), flush=True)


def main(name: str, n: int, rounds: int) -> None:
    srv = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                            "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        addr = None
        for line in srv.stdout:
            m = re.match(r"listening on (\S+?):(\d+)", line)
            if m:
                addr = f"127.0.0.1:{m.group(2)}"
                break
        threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
        res: dict[str, list[dict]] = {}
        for _ in range(rounds):
            for p in ("auto", "neurosurgeon"):
                out = subprocess.run([sys.executable, __file__, "--child", addr, p, name, str(n)], capture_output=True,
                                     text=True, timeout=600)
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    print(out.stderr[-2000:])
                    continue
                r = json.loads(line[0][7:])
                res.setdefault(p, []).append(r)
                print(f"{p}: n {r['n']} lat {r['ms']:.2f} cpu(call) {r['cpu']:.3f} cpu(gap) {r['gap_cpu']:.3f} "
                      f"srv {r['server_total']:.1f} plan_cpu {r['plan_cpu']:.3f} | " +
                      ", ".join(f"{k} {v:.3f}" for k, v in list(r["threads"].items())[:8]), flush=True)
    finally:
        srv.terminate()
        srv.wait(10)


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
