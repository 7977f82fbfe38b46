"""What the weights' value check (``ue_client.weight_values.ValueCheck``) costs a UE per call, at a full core and
inside a CPU quota, beside the model's own forward at the same share.

    python bench/bench_value_check.py [--models resnet18,mobilenet_v2,googlenet] [--cpus 1,0.25,0.1]
        [--calls 40] [--mode sampled|full] [--json PATH]

Per model and share, one child process (in a CPU cgroup of that many cores over 10 ms CFS periods,
``testbed.cgroups.CpuCgroup``, for a share below 1; needs root and writable cgroups) builds the check over the
model's parameters and buffers as ``WeightWatch`` does, then times ``--calls`` calls of ``changed()`` and
``--calls`` / 4 eager forwards (batch 1, 224 x 224, torch's threads: 1), alternating, as wall and the thread's CPU
ms. The table gives the medians and the check's share of the forward (wall over wall, both at that share). The
cost at a share is measured here, not scaled from the full core's (session 30's README computed it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model: str, calls: int, mode: str) -> dict:
    """Build the model and its check, time both; one JSON-able dict."""
    import torch

    from modelgraph.tv_compat import import_torchvision
    from ue_client.weight_values import ValueCheck

    torch.set_num_threads(1)
    tv = import_torchvision()
    m = getattr(tv.models, model)(weights=None).eval()
    tensors = [(f"parameter {k}", p) for k, p in m.named_parameters()] + [
        (f"buffer {k}", b) for k, b in m.named_buffers()]
    t0 = time.perf_counter()
    check = ValueCheck(tensors, mode)
    build_ms = (time.perf_counter() - t0) * 1e3
    x = torch.randn(1, 3, 224, 224)
    check_wall, check_cpu, fwd_wall, fwd_cpu = [], [], [], []
    with torch.inference_mode():
        m(x)
        check.changed()
        for i in range(calls):
            w, c = time.perf_counter(), time.thread_time()
            assert check.changed() is None
            check_wall.append((time.perf_counter() - w) * 1e3)
            check_cpu.append((time.thread_time() - c) * 1e3)
            if i % 4 == 0:
                w, c = time.perf_counter(), time.thread_time()
                m(x)
                fwd_wall.append((time.perf_counter() - w) * 1e3)
                fwd_cpu.append((time.thread_time() - c) * 1e3)
    med = statistics.median
    return {"model": model, "mode": mode, "build_ms": build_ms, "calls": calls,
            "check_wall_ms": med(check_wall), "check_wall_p90_ms": sorted(check_wall)[int(0.9 * (calls - 1))],
            "check_cpu_ms": med(check_cpu), "forward_wall_ms": med(fwd_wall), "forward_cpu_ms": med(fwd_cpu),
            "check_over_forward": med(check_wall) / med(fwd_wall)}


def run_one(model: str, cpus: float, calls: int, mode: str) -> dict:
    """``child`` in a fresh process, inside a CPU cgroup of ``cpus`` cores when below 1."""
    argv = [sys.executable, __file__, "--child", model, "--calls", str(calls), "--mode", mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if cpus >= 1:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    else:
        from testbed.cgroups import CpuCgroup

        group = CpuCgroup(f"coinfer-vcheck-{os.getpid()}", cpus)
        try:
            proc = group.popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate(timeout=600)
            if proc.returncode:
                raise RuntimeError(f"child failed ({proc.returncode}): {err[-2000:]}")
        finally:
            group.close()
    row = json.loads(out.strip().splitlines()[-1])
    row["cpus"] = cpus
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,googlenet")
    ap.add_argument("--cpus", default="1,0.25,0.1", help="shares of a core, comma-separated")
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--mode", choices=("sampled", "full"), default="sampled")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.calls < 4:
        ap.error("--calls must be at least 4")
    if a.child:
        print(json.dumps(child(a.child, a.calls, a.mode)))
        return 0
    shares = [float(c) for c in a.cpus.split(",")]
    if any(not c > 0 for c in shares):
        ap.error("--cpus: shares must be > 0")
    rows = [run_one(m, c, a.calls, a.mode) for m in a.models.split(",") for c in shares]
    print(f"value check ({a.mode}) per call vs the eager forward at the same CPU share "
          f"(medians of {a.calls} checks / {(a.calls + 3) // 4} forwards, batch 1, 1 thread; "
          f"load {os.getloadavg()[0]:.2f})")
    print("| model | cpus | check wall ms | check p90 ms | check CPU ms | forward wall ms | check / forward |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cpus']:g} | {r['check_wall_ms']:.2f} | {r['check_wall_p90_ms']:.2f} | "
              f"{r['check_cpu_ms']:.2f} | {r['forward_wall_ms']:.1f} | {100 * r['check_over_forward']:.1f} % |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"mode": a.mode, "calls": a.calls, "load": os.getloadavg()[0],
                                      "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
