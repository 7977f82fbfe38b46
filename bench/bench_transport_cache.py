"""What a UE process's predictions gain from what its previous process kept on disk (``ue_client.transport_cache``).

    python bench/bench_transport_cache.py [--model mobilenet_v2] [--cpus 0.1] [--requests 6] [--rounds 3]
        [--json PATH]

One ``coinfer-edge serve`` (loopback, its default threads) and, per round, two UE processes in turn in a CPU cgroup of
``--cpus`` cores over 10 ms CFS periods (``testbed.cgroups.CpuCgroup``; needs root and writable cgroups), with a
fresh ``$COINFER_TRANSPORT_DIR`` per round: the first process starts with nothing kept (as every process did before
session 32), the second with what the first kept when it closed. Each runs ``--requests`` all-server requests
(policy ``offload``, one torch thread, the link measured by the client's probe) and reports, per request, the
call's latency (``call_ms``) and the call's prediction made before it (``call_predicted_ms``; the request's own
``predicted_ms`` beside it). The table gives, per process kind, the median |pred / meas - 1| of the second request (the
first defines the slice and uploads the weights; the second is the first warm one, predicted as a decision made
while connecting predicts it) and of all the requests after the first, and the residual each process started
from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def child(server: str, model: str, requests: int) -> dict:
    """One UE process: ``requests`` offloaded requests; one JSON-able dict."""
    import torch

    from modelgraph.tv_compat import import_torchvision
    from ue_client.client import CoinferClient

    torch.set_num_threads(1)
    tv = import_torchvision()
    m = getattr(tv.models, model)(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    with CoinferClient(m, (x,), server=server, policy="offload", threads=1) as c:
        c.engine.connect()
        start = c.engine.cost_model.transport_residuals
        for _ in range(requests):
            with torch.inference_mode():
                c(x)
            r = c.last_report
            rows.append({"call_ms": r.call_ms, "call_predicted_ms": r.call_predicted_ms,
                         "predicted_ms": r.predicted_ms, "server_ops": r.server_ops, "fallback": r.fallback,
                         "uploaded_bytes": r.uploaded_weight_bytes})
    return {"start_residuals": start, "requests": rows}


def err(row: dict) -> float | None:
    p, m = row.get("call_predicted_ms"), row.get("call_ms")
    return None if p is None or not m else abs(p / m - 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--cpus", type=float, default=0.1)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.server, a.model, a.requests)))
        return 0

    from edge_process import edge_server, uptime

    from testbed.cgroups import CpuCgroup

    out = {"model": a.model, "cpus": a.cpus, "requests": a.requests, "load_before": uptime(), "rounds": []}
    with edge_server(ROOT) as port:  # the server's default threads (one on a 2-core machine: ``edge_server.cpus``)
        server = f"127.0.0.1:{port}"
        for r in range(a.rounds):
            with tempfile.TemporaryDirectory(prefix="coinfer-transport-") as d:
                got = {}
                for kind in ("first", "second"):
                    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COINFER_TRANSPORT_DIR": d}
                    argv = [sys.executable, __file__, "--child", "--server", server, "--model", a.model,
                            "--requests", str(a.requests)]
                    group = CpuCgroup(f"coinfer-tcache-{os.getpid()}-{r}-{kind}", a.cpus)
                    try:
                        proc = group.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                        so, se = proc.communicate(timeout=900)
                        if proc.returncode:
                            raise RuntimeError(f"child failed ({proc.returncode}): {se[-2000:]}")
                    finally:
                        group.close()
                    got[kind] = json.loads(so.strip().splitlines()[-1])
                    print(f"round {r} {kind}: started from {len(got[kind]['start_residuals'])} residuals; calls "
                          + ", ".join(f"{q['call_ms']:.0f} (pred {q['call_predicted_ms'] or 0:.0f})"
                                      for q in got[kind]["requests"]), flush=True)
                out["rounds"].append(got)
    out["load_after"] = uptime()
    print(f"\n{a.model}, UE at {a.cpus:g} of a core, {a.rounds} rounds; load {out['load_before']} -> "
          f"{out['load_after']}\n")
    print("| process | residuals at start (ms, mean) | first request after the slice's: median |pred/meas - 1| | "
          "all after it | signed, all after it |")
    print("|---|---|---|---|---|")
    summary = {}
    for kind in ("first", "second"):
        starts = [statistics.fmean(g[kind]["start_residuals"]) for g in out["rounds"] if g[kind]["start_residuals"]]
        firsts, rest, signed = [], [], []
        for g in out["rounds"]:
            reqs = [q for q in g[kind]["requests"] if q["server_ops"] and not q["fallback"]]
            after = reqs[1:]  # (the first defines the slice and uploads the weights)
            if after and err(after[0]) is not None:
                firsts.append(err(after[0]))
            rest += [e for e in map(err, after) if e is not None]
            signed += [q["call_predicted_ms"] / q["call_ms"] - 1 for q in after if q["call_predicted_ms"]]
        summary[kind] = {"start_mean_ms": statistics.fmean(starts) if starts else None,
                         "first_after_slice": statistics.median(firsts) if firsts else None,
                         "all_after_slice": statistics.median(rest) if rest else None,
                         "signed_all_after_slice": statistics.median(signed) if signed else None}
        s = summary[kind]
        fmt = (lambda v: "-" if v is None else f"{100 * v:.0f} %")
        print(f"| {kind} | {'none' if s['start_mean_ms'] is None else format(s['start_mean_ms'], '.1f')} | "
              f"{fmt(s['first_after_slice'])} | {fmt(s['all_after_slice'])} | {fmt(s['signed_all_after_slice'])} |")
    out["summary"] = summary
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
