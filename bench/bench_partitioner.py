"""Decision time and optimality gap of every partitioner policy vs graph size, on captured and synthetic graphs.

Captured graphs come from ``bench/make_costgraphs.py`` (CostGraph JSONs, UE costs profiled on the machine
that made them, server costs a labelled what-if unless profiled):

    .venv/bin/python bench/make_costgraphs.py --out bench/costgraphs
    .venv/bin/python bench/bench_partitioner.py --captured bench/costgraphs --sizes 50 200 500 1000 2000 \
        --out bench/out

Per graph and uplink: each policy's median decision time over ``--repeats`` (the fast ones) and the cold
latency of its plan on the one simulator. ``dads`` builds its flow network and runs a max-flow per
decision (that rebuild is what a DADS decision costs); ``dads_prebuilt`` is the max-flow alone on a
network built beforehand, so cic is compared with both. ``cic``'s offline compression (once per model and
device pair) is reported separately as ``compress_ms``. The reference for gaps is ``optimal`` (exhaustive,
cold objective) when it finishes in its budget, else ``mjoa`` when its branch and bound proved its plan
exact, else none (gaps are then left out, and the table says so).
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
from partitioner.mincut import CutStructure, dads
from partitioner.planners import plan
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.synthetic import random_dag

log = logging.getLogger("bench_partitioner")
POLICIES = ("local", "offload", "neurosurgeon", "dads", "cic", "mjoa", "robust", "optimal")
FAST = ("local", "offload", "neurosurgeon", "dads", "cic")


def load_graphs(paths: list[str], captured: str | None) -> list[tuple[str, CostGraph]]:
    files = [Path(p) for p in paths]
    if captured:
        files += sorted(p for p in Path(captured).glob("*.json") if p.name != "index.json")
    out = []
    for path in files:
        g = CostGraph.from_json(path)
        if not any(op.server_ms for op in g.ops):
            g = g.with_server_speedup(10.0)
        out.append((g.model or path.stem, g))
    return out


def time_dads_prebuilt(g: CostGraph, link: Link, repeats: int) -> float:
    P = prepare(g)
    r = Rates.of(link)
    cs = CutStructure(P)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dads(P, r, structure=cs)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_graph(g: CostGraph, link: Link, repeats: int, mjoa_budget: float, opt_budget: float,
                robust_budget: float) -> dict:
    rows: dict[str, dict] = {}
    for pol in POLICIES:
        opts: dict = {}
        if pol == "mjoa":
            opts = {"budget_s": mjoa_budget}
        elif pol == "robust":
            opts = {"deadline_ms": 0.9 * sum(op.ue_ms for op in g.ops), "budget_s": robust_budget}
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
                     "predicted_ms": p.predicted_ms, "objective_ms": p.details.get("objective_ms"),
                     "server_ops": len(p.server_ops), "exact": p.exact,
                     "feasible": p.feasible}
        if pol == "cic":
            rows[pol].update({k: p.details.get(k) for k in ("compressed_ops", "compress_ms", "candidate_cuts",
                                                             "scope")})
        if pol == "mjoa":
            rows[pol].update(warm_target_ms=p.details.get("warm_target_ms"),
                             warm_target_exact=p.details.get("warm_target_exact"))
    rows["dads_prebuilt"] = {"decision_ms_median": time_dads_prebuilt(g, link, repeats)}
    ref, ref_name = None, "none"
    if "cold_ms" in rows.get("optimal", {}):
        ref, ref_name = rows["optimal"]["cold_ms"], "optimal"
    elif rows.get("mjoa", {}).get("exact"):
        ref, ref_name = rows["mjoa"]["cold_ms"], "mjoa-exact"
    else:  # nothing proved: the best plan any policy found (robust's even if it misses its deadline)
        known = [r["cold_ms"] for r in rows.values() if "cold_ms" in r]
        if known:
            ref, ref_name = min(known), "best-known (unproven)"
    for r in rows.values():
        if ref and "cold_ms" in r:
            r["gap_to_optimal"] = r["cold_ms"] / ref - 1.0
    # warm policies (neurosurgeon, dads, cic) optimise the warm latency: their gap to mjoa's warm target
    mj = rows.get("mjoa", {})
    if mj.get("warm_target_exact"):
        for k in ("neurosurgeon", "dads", "cic"):
            if "warm_ms" in rows.get(k, {}):
                rows[k]["warm_gap"] = rows[k]["warm_ms"] / mj["warm_target_ms"] - 1.0
    cic, dd = rows.get("cic", {}), rows.get("dads", {})
    if "decision_ms_median" in cic and "decision_ms_median" in dd:
        cic["speedup_vs_dads"] = dd["decision_ms_median"] / max(cic["decision_ms_median"], 1e-9)
        cic["speedup_vs_dads_prebuilt"] = rows["dads_prebuilt"]["decision_ms_median"] / max(
            cic["decision_ms_median"], 1e-9)
        # same min-cut objective: cic must find dads' additive optimum (up to dads' integer capacities)
        cic["additive_vs_dads"] = cic["objective_ms"] / dd["objective_ms"] - 1.0
    return {"policies": rows, "reference": ref_name}


def fmt_gap(r: dict) -> str:
    """Cold-latency gap to the reference."""
    if "error" in r:
        return "n/a"
    return f"{100 * r['gap_to_optimal']:.2f}%" if "gap_to_optimal" in r else "-"


def markdown(results: list[dict]) -> str:
    lines = ["| graph | ops | Mbps | dads ms | dads prebuilt ms | cic ms | cic/dads | cic/prebuilt | "
             "compress ms | cuts | mjoa ms | mjoa exact | reference | gap local | offload | neurosurgeon | "
             "dads | cic | mjoa | robust | warm gap dads | warm gap cic |",
             "|" + "---|" * 22]
    for res in results:
        p = res["policies"]
        c = p["cic"]
        mj = p.get("mjoa", {})
        lines.append(
            f"| {res['graph']} | {res['ops']} | {res['uplink_mbps']:g} | {p['dads']['decision_ms_median']:.3f} | "
            f"{p['dads_prebuilt']['decision_ms_median']:.3f} | {c['decision_ms_median']:.4f} | "
            f"{c['speedup_vs_dads']:.0f}x | {c['speedup_vs_dads_prebuilt']:.0f}x | {c['compress_ms']:.0f} | "
            f"{c['candidate_cuts']} | {mj.get('decision_ms_median', float('nan')):.0f} | {mj.get('exact')} | "
            f"{res['reference']} | " + " | ".join(fmt_gap(p[k]) for k in
                                                 ("local", "offload", "neurosurgeon", "dads", "cic", "mjoa",
                                                  "robust"))
            + " | " + " | ".join(f"{100 * p[k]['warm_gap']:.2f}%" if "warm_gap" in p[k] else "-"
                                 for k in ("dads", "cic")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graphs", nargs="*", default=[], help="CostGraph JSON files (captured models)")
    ap.add_argument("--captured", default=None, help="a directory of CostGraph JSONs (bench/make_costgraphs.py)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[50, 200, 500, 1000, 2000])
    ap.add_argument("--kinds", nargs="*", default=["residual", "chain", "random"])
    ap.add_argument("--uplink-mbps", nargs="*", type=float, default=[10.0, 100.0])
    ap.add_argument("--rtt-ms", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--mjoa-budget", type=float, default=2.0)
    ap.add_argument("--robust-budget", type=float, default=1.0)
    ap.add_argument("--optimal-budget", type=float, default=10.0)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    graphs = load_graphs(args.graphs, args.captured)
    for kind in args.kinds:
        for n in args.sizes:
            graphs.append((f"synthetic-{kind}-{n}", random_dag(1000 + n, n, kind, speedup=10.0)))

    results = []
    hdr = (f"{'graph':>24} {'ops':>5} {'Mbps':>6} {'policy':>13} {'decide_ms':>10} {'cold_ms':>10} "
           f"{'warm_ms':>9} {'gap':>8} {'exact':>6} note")
    print(hdr, flush=True)
    for name, g in graphs:
        t0 = time.perf_counter()
        comp = compress(g)  # offline, once per model and device pair
        if comp.complete:
            scope = f"{len(comp.candidates)} candidate cuts for all links and shares"
        else:
            sl = comp.candidates_for(Rates.of(Link(args.uplink_mbps[0])))
            scope = (f"4-D enumeration stopped at {len(comp.candidates)} cuts; default slice: "
                     f"{len(sl) if sl is not None else 'incomplete'} cuts")
        print(f"# {name}: cic offline {comp.compress_ms:.0f} ms, {len(g)} -> {len(comp.graph)} contracted ops, "
              f"{scope}", flush=True)
        for mbps in args.uplink_mbps:
            link = Link(mbps, rtt_ms=args.rtt_ms)
            t0 = time.perf_counter()
            res = bench_graph(g, link, args.repeats, args.mjoa_budget, args.optimal_budget, args.robust_budget)
            res.update({"graph": name, "ops": len(g), "uplink_mbps": mbps, "rtt_ms": args.rtt_ms,
                        "server_costs": str(g.meta.get("server_costs", "profiled")),
                        "wall_s": time.perf_counter() - t0})
            results.append(res)
            for pol, r in res["policies"].items():
                if "error" in r:
                    print(f"{name:>24} {len(g):>5} {mbps:>6g} {pol:>13} {'-':>10} {'-':>10} {'-':>9} {'-':>8} "
                          f"{'-':>6} {r['error'][:70]}")
                    continue
                if "cold_ms" not in r:
                    print(f"{name:>24} {len(g):>5} {mbps:>6g} {pol:>13} {r['decision_ms_median']:>10.4f}")
                    continue
                extra = ""
                if pol == "cic":
                    extra = (f"{r['speedup_vs_dads']:.0f}x vs dads, {r['speedup_vs_dads_prebuilt']:.0f}x vs "
                             f"prebuilt; additive vs dads {100 * r['additive_vs_dads']:+.5f}%")
                print(f"{name:>24} {len(g):>5} {mbps:>6g} {pol:>13} {r['decision_ms_median']:>10.4f} "
                      f"{r['cold_ms']:>10.2f} {r['warm_ms']:>9.2f} {fmt_gap(r):>8} {r['exact']!s:>6} {extra}",
                      flush=True)
            print(f"{'':>24} reference for gaps: {res['reference']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_partitioner.json").write_text(json.dumps({"results": results}, indent=1))
    md = markdown(results)
    (out / "bench_partitioner.md").write_text(md + "\n")
    print(md)
    print(f"wrote {out / 'bench_partitioner.json'} and {out / 'bench_partitioner.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
