"""Session 33, item 1: ProfileGraph of mobilenet_v2 on ``coinfer-edge serve --threads 2`` beside a CPU hog, per
OMP_WAIT_POLICY variant of the server's environment ("unset" is what the user gets without setting it).

    .venv/bin/python docs/results/cli/session33/omp_profile.py [--hogs 1] [--variants unset,PASSIVE,ACTIVE]

Prints, per variant: the policy the server logged, ProfileGraph wall time, the server's CPU seconds over the call,
the profile's whole-graph sum of op means (ms per iteration), and whether the default 10 CPU s budget would have
refused it. The hog is a busy loop that ends by itself (bounded) and is killed by PID in a finally."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
HOG = "import time\nt = time.monotonic() + {s}\nwhile time.monotonic() < t: pass\n"


def spec_json(model: str) -> str:
    from modelgraph import capture, load_model, make_slice

    lm = load_model(model)
    graph = capture(lm.module, lm.example_inputs, name=lm.name)
    return make_slice(graph, graph.split(op.name for op in graph.ops), with_hashes=False).to_json()


def one(variant: str, spec: str, extra: list[str]) -> dict:
    from ue_client import wire

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    if variant != "unset":
        env["OMP_WAIT_POLICY"] = variant
    proc = subprocess.Popen([sys.executable, "-m", "edge_server.cli", "serve", "--port", "0", "--threads", "2",
                             "--profile-cpu-s", "0", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        address = line.split()[2]
        ps = psutil.Process(proc.pid)
        ch = wire.channel(address)
        c0, t0 = ps.cpu_times(), time.monotonic()
        try:
            prof = wire.profile_graph(wire.stub(ch), spec, timeout_s=300.0)
            err = ""
        except Exception as e:  # reported
            prof, err = None, str(e)[:120]
        wall = time.monotonic() - t0
        c1 = ps.cpu_times()
        ch.close()
    finally:
        proc.terminate()
        try:
            _, log = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, log = proc.communicate()
    policy = next((ln.split("edge_server: ", 1)[-1] for ln in log.splitlines() if "OpenMP" in ln), "(not logged)")
    cpu = (c1.user + c1.system + c1.children_user + c1.children_system) - (c0.user + c0.system + c0.children_user
                                                                          + c0.children_system)
    return {"variant": variant, "policy_log": policy, "wall_s": wall, "cpu_s": cpu,
            "sum_op_ms": None if prof is None else sum(m for m, _ in prof.ops.values()), "error": err}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="torchvision:mobilenet_v2")
    ap.add_argument("--hogs", type=int, default=1)
    ap.add_argument("--variants", default="unset,PASSIVE,ACTIVE")
    ap.add_argument("--hog-s", type=float, default=400.0, help="each hog ends by itself after this long")
    a = ap.parse_args()
    spec = spec_json(a.model)
    print(f"{a.model}: --threads 2, {a.hogs} busy-loop hog(s), {os.cpu_count()} cores, "
          f"loadavg before {os.getloadavg()[0]:.2f}", flush=True)
    hogs = []
    try:
        hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=a.hog_s)]) for _ in range(a.hogs)]
        for v in a.variants.split(","):
            r = one(v, spec, [])
            over = r["cpu_s"] > 10.0
            print(f"OMP_WAIT_POLICY={r['variant']:<8} ProfileGraph {r['wall_s']:7.2f} s wall, server CPU "
                  f"{r['cpu_s']:6.2f} s{' (> 10 CPU s: the default budget refuses it)' if over else ''}, "
                  f"sum of op means {r['sum_op_ms'] if r['sum_op_ms'] is None else round(r['sum_op_ms'], 1)} ms"
                  f"{'; ' + r['error'] if r['error'] else ''}\n    server log: {r['policy_log']}", flush=True)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
