"""Decision time and optimality gap of every partitioner policy vs graph size.

Runs on synthetic DAGs now; on captured graphs given as CostGraph JSON (``--graphs a.json b.json``);
and, when the profiler package provides ``profile_model``, on the model zoo it can capture.

    .venv/bin/python bench/bench_partitioner.py --sizes 50 200 500 1000 2000 --out bench/out
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partitioner.compress import compress
from partitioner.costgraph import CostGraph, Link
from partitioner.errors import PartitionerError
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.synthetic import random_dag

log = logging.getLogger("bench_partitioner")
ZOO = ("resnet18", "resnet50", "mobilenet_v2", "googlenet", "densenet121", "vit_b_16")
FAST = ("local", "offload", "neurosurgeon", "dads", "cic")


def zoo_graphs() -> tuple[list[CostGraph], str]:
    try:
        from profiler import profile_model  # type: ignore[attr-defined]
    except ImportError as e:
        return [], f"profiler.profile_model not available ({e}); captured zoo skipped"
    out, notes = [], []
    for name in ZOO:
        try:
            g = profile_model(name)
            if not isinstance(g, CostGraph):
                raise TypeError(f"profile_model returned {type(g).__name__}")
            if not any(op.server_ms for op in g.ops):
                g = g.with_server_speedup(10.0)
            out.append(g)
        except Exception as e:  # the profiler is another team's work in progress: report, go on
            notes.append(f"{name}: {e}")
    return out, "; ".join(notes)


def bench_graph(g: CostGraph, link: Link, repeats: int, mjoa_budget: float, opt_budget: float) -> dict:
    rows = {}
    for pol in ("local", "offload", "neurosurgeon", "dads", "cic", "mjoa", "robust", "optimal"):
        opts: dict = {}
        if pol == "mjoa":
            opts = {"budget_s": mjoa_budget}
        elif pol == "robust":
            opts = {"deadline_ms": 0.9 * sum(op.ue_ms for op in g.ops), "max_enum": 2000}
        elif pol == "optimal":
            opts = {"budget_s": opt_budget, "limit": 2_000_000}
        reps = repeats if pol in FAST else 1
        times, p = [], None
        try:
            for _ in range(reps):
                p = plan(pol, g, link, **opts)
                times.append(p.decision_ms)
        except PartitionerError as e:
            rows[pol] = {"error": str(e)}
            continue
        rows[pol] = {"decision_ms_median": statistics.median(times), "cold_ms": p.cold_ms, "warm_ms": p.warm_ms,
                     "predicted_ms": p.predicted_ms, "server_ops": len(p.server_ops), "exact": p.exact,
                     "feasible": p.feasible}
    opt = rows.get("optimal", {}).get("cold_ms")
    for r in rows.values():
        if opt and "cold_ms" in r:
            r["gap_to_optimal"] = r["cold_ms"] / opt - 1.0
    if "cic" in rows and "dads" in rows and "decision_ms_median" in rows["cic"]:
        rows["cic"]["speedup_vs_dads"] = rows["dads"]["decision_ms_median"] / max(
            rows["cic"]["decision_ms_median"], 1e-9)
        rows["cic"]["compressed_ops"] = len(compress(g).graph)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", nargs="*", default=[], help="CostGraph JSON files (captured models)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[16, 50, 200, 500, 1000, 2000])
    ap.add_argument("--kinds", nargs="*", default=["residual", "chain", "random"])
    ap.add_argument("--uplink-mbps", nargs="*", type=float, default=[10.0, 100.0])
    ap.add_argument("--rtt-ms", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mjoa-budget", type=float, default=1.0)
    ap.add_argument("--optimal-budget", type=float, default=20.0)
    ap.add_argument("--no-zoo", action="store_true", help="do not try profiler.profile_model")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    graphs: list[tuple[str, CostGraph]] = []
    for path in args.graphs:
        g = CostGraph.from_json(path)
        if not any(op.server_ms for op in g.ops):
            g = g.with_server_speedup(10.0)
        graphs.append((g.model or Path(path).stem, g))
    note = "zoo not requested"
    if not args.no_zoo:
        zg, note = zoo_graphs()
        graphs += [(g.model, g) for g in zg]
    if note:
        print(f"note: {note}")
    for kind in args.kinds:
        for n in args.sizes:
            graphs.append((f"synthetic-{kind}-{n}", random_dag(1000 + n, n, kind, speedup=10.0)))

    results = []
    hdr = (f"{'graph':>24} {'ops':>5} {'Mbps':>6} {'policy':>12} {'decide_ms':>10} {'cold_ms':>10} "
           f"{'warm_ms':>9} {'gap':>8} {'exact':>6} note")
    print(hdr)
    for name, g in graphs:
        for mbps in args.uplink_mbps:
            link = Link(mbps, rtt_ms=args.rtt_ms)
            t0 = time.perf_counter()
            rows = bench_graph(g, link, args.repeats, args.mjoa_budget, args.optimal_budget)
            results.append({"graph": name, "ops": len(g), "uplink_mbps": mbps, "rtt_ms": args.rtt_ms,
                            "policies": rows, "wall_s": time.perf_counter() - t0})
            for pol, r in rows.items():
                if "error" in r:
                    print(f"{name:>24} {len(g):>5} {mbps:>6g} {pol:>12} {'-':>10} {'-':>10} {'-':>9} {'-':>8} "
                          f"{'-':>6} {r['error'][:60]}")
                    continue
                gap = f"{100 * r['gap_to_optimal']:.2f}%" if "gap_to_optimal" in r else "-"
                extra = ""
                if pol == "cic":
                    extra = f"{r['compressed_ops']} ops after compression, {r['speedup_vs_dads']:.0f}x vs dads"
                print(f"{name:>24} {len(g):>5} {mbps:>6g} {pol:>12} {r['decision_ms_median']:>10.3f} "
                      f"{r['cold_ms']:>10.2f} {r['warm_ms']:>9.2f} {gap:>8} {r['exact']!s:>6} {extra}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_partitioner.json").write_text(json.dumps({"note": note, "results": results}, indent=1))
    print(f"wrote {out / 'bench_partitioner.json'}")
    _ = prepare, Rates
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
