"""The plan's CPU inside real requests, per decision path, and what a CFS quota does to its wall time.

    flock /work/wt/.bench.lock python bench/bench_request_plan.py [--models resnet18,mobilenet_v2,googlenet,
        densenet121] [--policies auto,fixed] [--requests 12] [--uplink-mbps 1000] [--cpus 0.1 --probe-ms 0.3]
        [--root CHECKOUT] [--json PATH]

One ``coinfer-edge serve`` (full CPU, loopback, from ``--root``) and one UE process (``CoinferClient``, the
library API, code from ``--root``: another checkout gives the before/after on the same machine) that runs, per
model and policy, a fresh client (a new tenant: a cold server) for ``--requests`` requests back to back with
decisions inline (``plan_background=False``, as the testbed's streams), the UE emulated 10x slower
(``ue_slowdown`` 10 with the kept cost graph's UE times x 10, ``docs/results/cold/session10/costgraphs``), a
``--uplink-mbps`` / 5 ms planning link. Policies: ``auto`` (coinfer), ``fixed`` (``server_ops`` = Neurosurgeon's
split of the cost graph: the serial baselines' client, its weights uploaded by its first request here), or any
``ue_client`` policy (``dads``, ``neurosurgeon``, ``ionn``, ...). Per request: ``plan_ms`` / ``plan_cpu_ms`` (the
report's: the whole decision on the request's clock, wall / the deciding thread's CPU) and ``plan_why``; the table
gives per decision path (``planned ahead``, ``reused``, ``warm target held``, a search ...) the median and max of
``plan_cpu_ms``. At full CPU (no ``--cpus``) that is what the decision costs.

With ``--cpus C`` (needs writable cgroups: root) the UE process builds its clients unthrottled, then runs inside a
CPU cgroup of C cores over 10 ms CFS periods (``testbed.cgroups.CpuCgroup``), and each request begins with one
timed window of its own before the decision, in turn: nothing (``noop``), a busy loop of ``--probe-ms`` of CPU
(``spin``), or none (``plan``: the decision is the first window). Each window's wall and CPU ms are recorded, and
the table counts the windows that waited at least half a CFS period beyond their CPU: the wait falls on whatever
runs when the period's quota is spent, with about the chance that the window's CPU crosses it; so it should be
rare for ``noop``, about as frequent for ``spin`` as for a decision of the same CPU, whatever the window does.
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
sys.path.insert(0, str(ROOT / "bench"))
COSTGRAPHS = "docs/results/cold/session10/costgraphs"
PATHS = ("planned ahead", "reused", "warm target held", "followed", "search")


def path_of(why: str) -> str:
    """The decision path of a request's ``plan_why``."""
    if "warm target held: no search" in why:
        return "warm target held"
    for p in ("planned ahead", "reused", "followed"):
        if why.startswith(p):
            return p
    return "search" if why else "none"


def child(args) -> int:
    """The UE process: build each (model, policy) client, run its requests, print one JSON line."""
    import torch

    from modelgraph import capture
    from modelgraph.tv_compat import import_torchvision
    from partitioner.costgraph import CostGraph, Link
    from partitioner.uecpu import UeCpu
    from ue_client import CoinferClient, new_tenant, planning
    from ue_client.client import window_clocks

    tv = import_torchvision()
    torch.set_num_threads(1)
    probes = ("plan", "noop", "spin") if args.cpus else ("plan",)
    spin_s = args.probe_ms / 1e3
    out = []
    window: list = []

    def timed(fn):  # the clocks in the client's order (ue_client.client.window_clocks: thread CPU clock first)
        t, c = window_clocks()
        r = fn()
        t1, c1 = window_clocks()
        window.append(((t1 - t) * 1e3, (c1 - c) * 1e3))
        return r

    def spin():
        c = time.thread_time()
        while time.thread_time() - c < spin_s:
            pass

    clients = []
    for m in args.models.split(","):
        mod = getattr(tv.models, m)().eval()
        x = torch.randn(1, 3, 224, 224)
        g = capture(mod, (x,), name=m)
        costs = CostGraph.from_json(Path(args.costgraphs) / f"{m}.json").scaled(ue=10.0)
        for pol in args.policies.split(","):
            kw = dict(policy=pol, link={"uplink_mbps": args.uplink_mbps, "rtt_ms": 5.0}, tenant=new_tenant(),
                      ue_slowdown=10.0, costs=costs, probe=False, send_cpu=UeCpu(send_ms_per_byte=1e-5),
                      horizon=args.requests, plan_background=False, timeout_ms=120000.0)
            if pol == "fixed":
                so = planning.choose("neurosurgeon", costs, Link(args.uplink_mbps, rtt_ms=5.0)).server_ops
                kw.update(policy="auto", server_ops=sorted(so))
            clients.append((m, pol, CoinferClient(g, (x,), server=args.server, **kw), x))
    if args.cpus:
        print("READY", flush=True)
        sys.stdin.readline()  # the parent has applied the quota
    for m, pol, c, x in clients:  # one session open at a time (another would halve its compute share)
        eng = c.engine
        eng.connect()  # (plans request 1 ahead; under the quota with ``--cpus``)
        orig = eng._decide_now
        kind = ["plan"]

        def wrapped(orig=orig, kind=kind):
            window.clear()
            if kind[0] == "noop":
                timed(lambda: None)
            elif kind[0] == "spin":
                timed(spin)
            return timed(orig)

        eng._decide_now = wrapped
        rows = []
        for i in range(args.requests):
            kind[0] = probes[i % len(probes)] if i > 0 else "plan"
            t = time.perf_counter()
            c(x)
            lat = (time.perf_counter() - t) * 1e3
            r = c.last_report
            first = window[0] if window else (None, None)
            rows.append({"request": i + 1, "plan_ms": r.plan_ms, "plan_cpu_ms": r.plan_cpu_ms, "plan_why": r.plan_why,
                         "latency_ms": lat, "server_ops": r.server_ops, "probe": kind[0],
                         "first_window_ms": first[0], "first_window_cpu_ms": first[1],
                         "decision_window_ms": window[-1][0] if window else None,
                         "decision_window_cpu_ms": window[-1][1] if window else None})
        c.close()
        out.append({"model": m, "policy": pol, "requests": rows})
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def table(results: list[dict], period_ms: float, cpus: float | None) -> dict:
    """Print the per-path table (and the windows' table under a quota); the summary dict."""
    print("| model | policy | path | requests | plan_cpu_ms median | max | plan_ms median | max |")
    print("|---|---|---|---|---|---|---|---|")
    summary: dict = {"paths": {}, "windows": {}}
    for res in results:
        by: dict[str, list] = {}
        for r in res["requests"]:
            by.setdefault(path_of(r["plan_why"]), []).append(r)
        for p in (*PATHS, "none"):
            rs = by.get(p)
            if not rs:
                continue
            cpu, wall = [r["plan_cpu_ms"] for r in rs], [r["plan_ms"] for r in rs]
            print(f"| {res['model']} | {res['policy']} | {p} | {len(rs)} | {statistics.median(cpu):.3f} | "
                  f"{max(cpu):.3f} | {statistics.median(wall):.3f} | {max(wall):.3f} |")
            summary["paths"][f"{res['model']}/{res['policy']}/{p}"] = {
                "n": len(rs), "cpu_median_ms": statistics.median(cpu), "cpu_max_ms": max(cpu),
                "wall_median_ms": statistics.median(wall), "wall_max_ms": max(wall)}
        warm = [r["plan_cpu_ms"] for r in res["requests"][1:]]
        if warm:
            summary["paths"][f"{res['model']}/{res['policy']}/after the first"] = {
                "n": len(warm), "cpu_median_ms": statistics.median(warm), "cpu_p99_ms": pct(warm, 0.99)}
    if cpus:
        print(f"\nfirst window of each request on a {cpus:g}-core quota ({period_ms:g} ms CFS period): waited = wall - "
              "CPU >= half a period")
        print("| window | windows | CPU ms median | waited | share waited | wall ms median | decision > 5 % |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("noop", "spin", "plan"):
            ws = [r for res in results for r in res["requests"][1:] if r["probe"] == kind
                  and r["first_window_ms"] is not None]
            if not ws:
                continue
            waited = [r for r in ws if r["first_window_ms"] - r["first_window_cpu_ms"] >= period_ms / 2]
            over = [r for r in ws if r["decision_window_ms"] > 0.05 * r["latency_ms"]]
            cpu = statistics.median(r["first_window_cpu_ms"] for r in ws)
            print(f"| {kind} | {len(ws)} | {cpu:.3f} | {len(waited)} | {len(waited) / len(ws):.0%} | "
                  f"{statistics.median(r['first_window_ms'] for r in ws):.3f} | {len(over)} |")
            summary["windows"][kind] = {"n": len(ws), "cpu_median_ms": cpu, "waited": len(waited),
                                        "decision_over_5pct": len(over)}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,googlenet,densenet121")
    ap.add_argument("--policies", default="auto,fixed")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--uplink-mbps", type=float, default=1000.0)
    ap.add_argument("--cpus", type=float, default=None, help="the UE's CPU quota in cores (default: none)")
    ap.add_argument("--probe-ms", type=float, default=0.3, help="the spin window's CPU ms (with --cpus)")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose code runs (default: this one)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--costgraphs", default=str(ROOT / COSTGRAPHS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    from edge_process import edge_server

    root = args.root.resolve()
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--models", args.models, "--policies",
           args.policies, "--requests", str(args.requests), "--uplink-mbps", str(args.uplink_mbps), "--probe-ms",
           str(args.probe_ms), "--costgraphs", str(ROOT / COSTGRAPHS)]
    t0, load0 = time.time(), os.getloadavg()
    with edge_server(root) as port:
        cmd += ["--server", f"127.0.0.1:{port}"] + (["--cpus", str(args.cpus)] if args.cpus else [])
        throttle, period_ms = None, 10.0
        if args.cpus:
            from testbed.cgroups import CpuCgroup

            with CpuCgroup(f"coinfer-reqplan-{os.getpid()}", float(os.cpu_count() or 1)) as cg:
                p = cg.popen(cmd, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                line = p.stdout.readline()
                if not line.startswith("READY"):
                    print(line, p.communicate()[0][-3000:])
                    return 1
                cg.set_cpus(args.cpus)
                period_ms = cg.effective_period_us / 1e3
                p.stdin.write("go\n")
                p.stdin.flush()
                text, _ = p.communicate(timeout=3600)
                throttle = cg.throttle_stats()
        else:
            p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
            text = p.stdout
    got = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    if not got:
        print(text[-3000:], getattr(p, "stderr", "") or "")
        return 1
    results = json.loads(got[-1][len("RESULT "):])
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"code {root} ({commit}), UE quota {args.cpus or 'none'}, uplink {args.uplink_mbps:g} Mbit/s, "
          f"{time.time() - t0:.0f} s, load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    summary = table(results, period_ms, args.cpus)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"root": str(root), "commit": commit, "cpus": args.cpus,
                                         "period_ms": period_ms, "uplink_mbps": args.uplink_mbps,
                                         "load_before": load0, "load_after": os.getloadavg(), "throttle": throttle,
                                         "summary": summary, "results": results}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
