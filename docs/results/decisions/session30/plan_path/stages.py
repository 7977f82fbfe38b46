"""Where a real request's ``plan_ms`` goes: the decision path's stages inside the UE process, per request.

    .venv/bin/python docs/results/decisions/session30/plan_path/stages.py [--root CHECKOUT] [--rounds 5]
        [--model resnet18] [--requests 5] [--uplink-mbps 400] [--profile PREFIX] [--json PATH]

Each round is what one model of ``bench/bench_request_plan.py`` runs: a fresh ``coinfer-edge serve --port 0`` of
``--root`` and a fresh UE process with ``--root``'s code (a new tenant; the kept cost graph's UE x 10,
``ue_slowdown`` 10, auto, ``--uplink-mbps`` / 5 ms planning link, decisions inline, horizon ``--requests``). In the
UE process each stage is a wrapper around one function of the decision path that adds its inclusive wall and
thread-CPU ms to the request's row, counted on the requests' thread inside a decision window only
(``WINDOWS``; a nested stage's time is in its parent's too). The wrappers cost ~2 us a call, so a row's stages sum
a little above an unwrapped ``plan_cpu_ms``. ``--profile PREFIX``: a cProfile (pstats) of requests 2 and 3's
decision windows, one file per round (PREFIX.ROUND). The table groups requests by request number and path
(``plan_why``: one round may suspend between requests where another does not).

Why: ``plan_ms`` is the whole decision path and ``choose`` under half of it (``../request_plan/README.md``); this
names the rest.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MAIN = HERE.parents[5]
COSTGRAPHS = MAIN / "docs/results/cold/session10/costgraphs"
WINDOWS = ("Decider.decide_now", "Decider.decide_offline", "UplinkBacklog.charge")
"""The stages that are a request's decision window or a part of it on their own: the others count only inside."""


PROFILED = tuple(int(x) for x in os.environ.get("STAGES_PROFILE_REQUESTS", "2,3").split(","))
"""The requests whose decision windows ``--profile`` records (env ``STAGES_PROFILE_REQUESTS``, default 2,3)."""
PROFILE_OFFLINE = os.environ.get("STAGES_PROFILE_OFFLINE", "1") == "1"
"""Whether ``--profile`` records the offline decision's window too (env ``STAGES_PROFILE_OFFLINE``, 0: no)."""


def child(args) -> int:
    """One round in this process (code from ``--root`` on ``PYTHONPATH``): print ``RESULT`` and the rows."""
    import torch

    from modelgraph import capture
    from modelgraph.tv_compat import import_torchvision
    from partitioner.costgraph import CostGraph
    from partitioner.uecpu import UeCpu
    from ue_client import (
        CoinferClient,
        backlog,
        calibration,
        decider,
        decisions,
        new_tenant,
        planning,
        probing,
        request,
        trajectory,
        uploads,
    )

    if os.environ.get("STAGES_PATCH"):  # a scratch module of sub-step timers, imported first
        import importlib.util
        spec = importlib.util.spec_from_file_location("stages_patch", os.environ["STAGES_PATCH"])
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    cur: dict = {}
    main_thread = threading.get_ident()
    depth = [0]

    def stage(name: str, fn):
        if os.environ.get("STAGES_NOWRAP"):  # (a profile or the plain numbers without the wrappers' cost)
            return fn
        window = name in WINDOWS

        @functools.wraps(fn)
        def w(*a, **k):
            if threading.get_ident() != main_thread or not (window or depth[0]):
                return fn(*a, **k)
            depth[0] += 1
            c0, t0 = time.thread_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                c1, t1 = time.thread_time(), time.perf_counter()
                depth[0] -= 1
                s = cur.setdefault(name, [0.0, 0.0, 0])
                s[0] += (t1 - t0) * 1e3
                s[1] += (c1 - c0) * 1e3
                s[2] += 1
        return w

    def wrap(obj, attr, name=None):
        name = name or f"{getattr(obj, '__name__', obj)}.{attr}"
        setattr(obj, attr, stage(name, getattr(obj, attr)))

    D, DC, CM = decider.Decider, decisions.DecisionCache, calibration.CostModel
    for m in ("decide_now", "decide_offline", "shares", "inputs", "quick_reuse", "decide"):
        wrap(D, m)
    wrap(uploads.UploadScheduler, "server_state")
    wrap(request.RequestPath, "sync_refusals")
    wrap(request.RequestPath, "exclusion")
    for m in ("decide", "reuse", "drift", "key", "reusable", "held_answer", "_plan_held_ahead", "_target_held",
              "_target_weights", "_changed"):
        wrap(DC, m)
    p = CM.costs
    CM.costs = property(stage("CostModel.costs (calibrated graph)", p.fget), p.fset)
    for m in ("transport_sd_ms", "transport_se_ms", "ue_cv"):
        wrap(CM, m)
    wrap(probing.LinkProbe, "planning_link")
    wrap(probing.LinkProbe, "ue_cpu")
    for m in ("choose", "evolve", "refresh_reused"):
        wrap(planning, m, f"planning.{m}")
    from partitioner import online
    for m in ("_invest_best", "_prefetch_best", "_gradual_best", "_scorer", "prepare"):
        wrap(planning, m, f"planning.{m}")
    for m in ("std", "order", "__call__"):
        wrap(planning._Score, m, f"planning._Score.{m}")
    for m in ("decide", "background", "suffix_targets", "_held_candidates", "_cold_bounds", "_climb", "_compiled"):
        wrap(online.OnlineTable, m, f"OnlineTable.{m}")
    if os.environ.get("STAGES_ONLINE"):  # the table's inner functions too (more wrapper cost inside ``decide``)
        for m in ("evaluate_shared", "evaluate", "lower_bound", "_group_bytes", "_bytes_left", "_held_vec",
                  "compile_partition"):
            wrap(online, m, f"online.{m}")
    if os.environ.get("STAGES_INPUTS"):  # the inputs' reads inside ``server_state`` and ``charge`` too
        from ue_client import data_channel, session
        wrap(uploads.UploadScheduler, "_key")
        wrap(uploads.UploadScheduler, "_held_and_waiting")
        wrap(backlog.UplinkBacklog, "ms")
        wrap(backlog, "with_backlog", "backlog.with_backlog")
        wrap(data_channel, "socket_unacked_bytes", "data_channel.socket_unacked_bytes")
        wrap(session.UplinkQueue, "paced_backlog_s")
    trajectory.Trajectory.from_choice = classmethod(stage("Trajectory.from_choice",
                                                          trajectory.Trajectory.from_choice.__func__))
    wrap(backlog.UplinkBacklog, "charge")

    import gc

    gc_t: list = [0.0]

    def on_gc(phase, info):  # a collection inside a decision window: its CPU as the stage "gc (generation)"
        if threading.get_ident() != main_thread or not depth[0]:
            return
        if phase == "start":
            gc_t[0] = time.thread_time()
        else:
            st = cur.setdefault(f"gc (generation {info['generation']})", [0.0, 0.0, 0])
            dt = (time.thread_time() - gc_t[0]) * 1e3
            st[0] += dt
            st[1] += dt
            st[2] += 1

    gc.callbacks.append(on_gc)
    tv = import_torchvision()
    torch.set_num_threads(1)
    mod = getattr(tv.models, args.model)().eval()
    x = torch.randn(1, 3, 224, 224)
    g = capture(mod, (x,), name=args.model)
    costs = CostGraph.from_json(COSTGRAPHS / f"{args.model}.json").scaled(ue=10.0)
    c = CoinferClient(g, (x,), server=args.server, policy="auto", link={"uplink_mbps": args.uplink_mbps, "rtt_ms": 5.0},
                      tenant=new_tenant(), ue_slowdown=10.0, costs=costs, probe=False,
                      send_cpu=UeCpu(send_ms_per_byte=1e-5), horizon=args.requests, plan_background=False,
                      timeout_ms=120000.0)
    eng = c.engine
    eng.connect()
    prof = cProfile.Profile() if args.profile else None
    profiling = [False]

    def profiled(fn):
        def w(*a, **k):
            if not profiling[0]:
                return fn(*a, **k)
            prof.enable()
            try:
                return fn(*a, **k)
            finally:
                prof.disable()
        return w

    if prof is not None:
        eng._decide_now = profiled(eng._decide_now)
        if PROFILE_OFFLINE:
            eng.decider.decide_offline = profiled(eng.decider.decide_offline)
    rows = []
    for i in range(args.requests):
        cur.clear()
        profiling[0] = i + 1 in PROFILED
        c(x)
        r = c.last_report
        rows.append({"request": i + 1, "plan_ms": r.plan_ms, "plan_cpu_ms": r.plan_cpu_ms, "plan_why": r.plan_why,
                     "server_ops": r.server_ops, "stages": {k: list(v) for k, v in cur.items()}})
    c.close()
    if prof is not None:
        prof.dump_stats(str(args.profile))
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=MAIN)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--uplink-mbps", type=float, default=400.0)
    ap.add_argument("--profile", type=str)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    sys.path.insert(0, str(MAIN / "bench"))
    from edge_process import edge_server

    root = args.root.resolve()
    rows: list[dict] = []
    for rnd in range(args.rounds):
        with edge_server(root) as port:
            cmd = [sys.executable, str(HERE), "--child", "--server", f"127.0.0.1:{port}", "--model", args.model,
                   "--requests", str(args.requests), "--uplink-mbps", str(args.uplink_mbps)]
            if args.profile:
                cmd += ["--profile", f"{args.profile}.{rnd}"]
            p = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                               text=True, timeout=900)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(p.stdout[-2000:], p.stderr[-3000:])
            return 1
        if os.environ.get("STAGES_PATCH"):
            print(p.stderr[-3000:])
        rows += [dict(r, round=rnd) for r in json.loads(line[len("RESULT "):])]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["request"], r["plan_why"]), []).append(r)
    for (req, why), rs in sorted(groups.items()):
        wall = " / ".join(f"{r['plan_ms']:.2f}" for r in rs)
        cpu = " / ".join(f"{r['plan_cpu_ms']:.2f}" for r in rs)
        print(f"\nrequest {req}, {len(rs)} of {args.rounds} rounds, plan_why {why!r}: plan_ms {wall}, "
              f"plan_cpu_ms {cpu}")
        if req not in (2, 3):
            continue
        names = sorted({k for r in rs for k in r["stages"]},
                       key=lambda k: -statistics.median(r["stages"].get(k, [0, 0, 0])[1] for r in rs))
        print("| stage | calls | wall ms median | CPU ms median |")
        print("|---|---|---|---|")
        for k in names:
            st = [r["stages"].get(k, [0.0, 0.0, 0]) for r in rs]
            print(f"| {k} | {statistics.median(s[2] for s in st):g} | {statistics.median(s[0] for s in st):.3f} | "
                  f"{statistics.median(s[1] for s in st):.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"root": str(root), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
