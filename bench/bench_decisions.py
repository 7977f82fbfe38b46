"""Decision time of the runtime's planning call (``ue_client.planning.choose``) per model and policy.

    .venv/bin/python bench/make_costgraphs.py --out CG
    .venv/bin/python bench/bench_decisions.py --captured CG [--repeats 2] [--json PATH]

For each captured graph: the offline step (``partitioner.online.precompute``: mjoa's search over the
grid, once per model and device pair; cic's compression) and then every online decision the runtime
makes, timed as ``DecisionCache.decide`` spends it on a new plan: the calibrated cost graph rebuilt for
a moved cost scale (``ue_client.calibration.CostModel.costs``; column ``copy``) plus the planning call
(decision, predictions, investment rule), over a grid of uplinks (10, 20, 100, 1000 Mbps), RTTs (2,
20 ms), server shares (1, 0.5), the UE's CPU cost of sending (free; 20 ns/B shared with computing) and
what the server holds (nothing; half of the warm target's weights; the whole warm target):

- ``auto``: progressive offloading with its warm target known (the runtime keeps it between requests),
  horizon 8: stay local, invest now, prefetch or offload gradually (the JSON counts each path per column,
  ``auto_paths``);
  ``auto (horizon 100)``: the same with 100 requests left (the prefetch search's longest);
  ``auto (warm target held)``: the warm re-plan; ``auto (link/share change)``: the warm target searched
  again (the first decision for a link estimate or share);
- ``mjoa``: this request's cold plan and the warm target;
- ``cic``, ``dads``: the warm min-cut planners through the same call;
- ``mjoa full search``: the tree search the online table replaces (``online=False``, 1 s budget), on
  the first scenarios only.

Every decision is made twice: on the profiled cost graph and on the same graph with the UE 10x slower (the
profile of a UE with 10 % of a core, where offloading, investing and prefetching pay); both go into the
same columns.

Times are the call's CPU time (``time.thread_time``): on a shared, loaded machine the wall time
(``decision_ms``, also in the JSON) includes waiting for a core. ``plan share on a 10 % UE``: planning on
a UE with 10 % of a core costs ~10x its CPU time; the column is over the auto/mjoa decisions on the 10x
slower graph, 10 x CPU ms / that decision's predicted latency. The aim is <= 5 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partitioner.compress import compress
from partitioner.costgraph import CostGraph, Link
from partitioner.online import precompute
from partitioner.state import ServerState, Shares
from partitioner.uecpu import UeCpu
from ue_client import planning
from ue_client.calibration import CostModel

log = logging.getLogger("bench_decisions")

UPLINKS = (10.0, 20.0, 100.0, 1000.0)
RTTS = (2.0, 20.0)
SHARES = (1.0, 0.5)
CPUS = (None, UeCpu(send_ms_per_byte=2e-5))
HORIZONS = (8, 100)
FULL_SEARCH_SCENARIOS = 6


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def load(captured: str) -> list[tuple[str, CostGraph]]:
    out = []
    for p in sorted(Path(captured).glob("*.json")):
        if p.name == "index.json":
            continue
        g = CostGraph.from_json(p)
        out.append((g.model or p.stem, g))
    return out


def slow_ue(g: CostGraph, factor: float) -> CostGraph:
    return replace(
        g, ops=tuple(replace(o, ue_ms=o.ue_ms * factor, ue_var=o.ue_var * factor**2) for o in g.ops), ue_samples_ms=None
    )


def path_of(c) -> str:
    """Which of auto's decisions a choice is (the JSON counts them per column)."""
    if c.details.get("warm_target_held"):
        return "warm target held"
    if c.gradual:
        return "gradual"
    if c.prefetch:
        return "prefetch"
    if c.invest:
        return "invest now"
    if c.server_ops:
        return "split"
    return "local"


class Clock:
    """CPU time (this thread) and wall time of each decision as the runtime makes it: the calibrated cost
    graph rebuilt for a moved scale (``CostModel.costs``, what ``DecisionCache.decide`` does before every
    new plan; the scale moves by 0.01 per call, so every call gets a new copy) and ``planning.choose`` on
    it. On a shared, loaded machine the wall time includes waiting for a core; the CPU time is what the
    call costs "at full CPU" (and what a CPU quota charges), so the table reports CPU time and the JSON both."""

    def __init__(self) -> None:
        self.cpu: dict[str, list[float]] = {}
        self.wall: dict[str, list[float]] = {}
        self.build: list[float] = []
        self.paths: dict[str, dict[str, int]] = {}
        self.models: dict[int, CostModel] = {}
        self.k = 0

    def __call__(self, key: str, policy: str, g: CostGraph, link: Link, **kw):
        model = self.models.get(id(g))
        if model is None:
            model = self.models[id(g)] = CostModel(g)
            # the base prepared once, as the runtime's first plan (while connecting) does
            planning.choose("mjoa", model.costs, Link(100.0))
        self.k += 1
        model.scale = {"ue": 1.0 + 0.01 * (self.k % 50 + 1), "server": 1.0 - 0.005 * (self.k % 40 + 1)}
        t0 = time.thread_time_ns()
        w0 = time.perf_counter()
        costs = model.costs
        t1 = time.thread_time_ns()
        c = planning.choose(policy, costs, link, **kw)
        cpu = (time.thread_time_ns() - t0) / 1e6
        self.build.append((t1 - t0) / 1e6)
        self.cpu.setdefault(key, []).append(cpu)
        self.wall.setdefault(key, []).append((time.perf_counter() - w0) * 1e3)
        if policy == "auto":
            pk = self.paths.setdefault(key, {})
            pk[path_of(c)] = pk.get(path_of(c), 0) + 1
        return c, cpu


def bench_graph(g: CostGraph, repeats: int) -> dict:
    t0 = time.perf_counter()
    table = precompute(g, use_cache=False)
    pre_ms = (time.perf_counter() - t0) * 1e3
    precompute(g)  # into the cache, as the runtime finds it
    comp = compress(g)
    g10 = slow_ue(g, 10.0)
    clock = Clock()
    worst_share = 0.0
    worst_at = None
    shares: list[float] = []
    scen = 0
    # what the offline steps and the graphs left in the heap is frozen, as after a UE's start: a full
    # collection then walks this bench's own later garbage only (the UE process collected at its start only:
    # 7 full collections in the first 3.7 s of a 30-request googlenet run, none during its requests)
    gc.collect()
    gc.freeze()
    for up in UPLINKS:
        for rtt in RTTS:
            for sh in SHARES:
                for cpu in CPUS:
                    link = Link(up, rtt_ms=rtt)
                    share = Shares(compute=sh)
                    for gg, slow in ((g, False), (g10, True)):  # the profiled UE, and 10x slower (a 10 % UE)
                        first = planning.choose("auto", gg, link, share=share, ue_cpu=cpu, horizon=8)
                        target = first.warm_target or frozenset()
                        tw = sorted({w for op in gg.ops if op.name in target for w in op.weights})
                        states = {
                            "none": None,
                            "half": ServerState(held=frozenset(tw[: len(tw) // 2])),
                            "target": ServerState(held=frozenset(tw)),
                        }
                        for _ in range(repeats):
                            # a link or share change: the warm target is searched again
                            clock("auto (link/share change)", "auto", gg, link, share=share, ue_cpu=cpu, horizon=8)
                            for sname, st in states.items():
                                timed = []
                                for h in HORIZONS if sname != "target" else HORIZONS[:1]:
                                    key = ("auto (warm target held)" if sname == "target" else
                                           "auto" if h == HORIZONS[0] else f"auto (horizon {h})")
                                    c, ms = clock(key, "auto", gg, link, share=share, ue_cpu=cpu, state=st,
                                                  target=target, horizon=h)
                                    timed.append((c, ms, "auto", h))
                                c, ms = clock("mjoa", "mjoa", gg, link, share=share, ue_cpu=cpu, state=st)
                                timed.append((c, ms, "mjoa", None))
                                for pol in ("cic", "dads"):
                                    clock(pol, pol, gg, link, share=share, ue_cpu=cpu, state=st)
                                if not slow:
                                    continue
                                # on a 10 % UE planning costs ~10x its CPU time: its share of the request
                                for c, ms, pol, h in timed:
                                    ratio = 10 * ms / c.predicted_ms
                                    shares.append(ratio)
                                    if ratio > worst_share:
                                        worst_share = ratio
                                        worst_at = (pol, up, rtt, sh, cpu is not None, sname, h, path_of(c),
                                                    c.predicted_ms)
                    if scen < FULL_SEARCH_SCENARIOS:
                        clock("mjoa full search", "mjoa", g, link, share=share, ue_cpu=cpu, online=False, budget_s=1.0)
                    scen += 1
    gc.unfreeze()
    autos = [x for k, xs in clock.cpu.items() if k.startswith("auto") for x in xs]
    row = {
        "ops": len(g),
        "precompute_ms": pre_ms,
        "candidates": len(table.candidates),
        "grid_searches": table.grid_points,
        "grid_exact": table.exact_points,
        "cic_compress_ms": comp.compress_ms,
        "calibrated_copy_ms": {"median": statistics.median(clock.build), "p99": pct(clock.build, 0.99)},
        "auto_all": {"median_ms": statistics.median(autos), "p99_ms": pct(autos, 0.99), "max_ms": max(autos),
                     "n": len(autos)},
        "auto_paths": clock.paths,
        "plan_share_10pct_ue_max": worst_share,
        "plan_share_10pct_ue_median": statistics.median(shares),
        "plan_share_10pct_ue_over_5pct": sum(x > 0.05 for x in shares) / len(shares),
        "plan_share_worst_case": worst_at,
        "policies": {},
    }
    for k, xs in clock.cpu.items():
        ws = clock.wall[k]
        row["policies"][k] = {
            "median_ms": statistics.median(xs),
            "p99_ms": pct(xs, 0.99),
            "max_ms": max(xs),
            "wall_median_ms": statistics.median(ws),
            "wall_p99_ms": pct(ws, 0.99),
            "n": len(xs),
        }
    return row


def fmt(row: dict, k: str) -> str:
    p = row["policies"].get(k)
    return "-" if p is None else f"{p['median_ms']:.3f} / {p['p99_ms']:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captured", required=True, help="directory of CostGraph JSONs (bench/make_costgraphs.py)")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of every scenario (default 2)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    results = {}
    cols = ("auto", "auto (horizon 100)", "auto (warm target held)", "auto (link/share change)", "mjoa", "cic", "dads",
            "mjoa full search")
    print("decision CPU ms median / p99 per policy (calibrated copy + planning.choose); offline = online table"
          " precompute (wall); auto, all = every auto decision of the row")
    print(
        "| model | ops | offline s | candidates | copy | "
        + " | ".join(cols)
        + " | auto, all | plan share on a 10 % UE: median, max, > 5 % |"
    )
    print("|---" * (len(cols) + 7) + "|")  # model, ops, offline, candidates, copy, policies..., auto all, share
    for name, g in load(args.captured):
        row = bench_graph(g, args.repeats)
        results[name] = row
        print(
            f"| {name} | {row['ops']} | {row['precompute_ms'] / 1e3:.1f} | {row['candidates']} | "
            f"{row['calibrated_copy_ms']['median']:.3f} | "
            + " | ".join(fmt(row, k) for k in cols)
            + f" | {row['auto_all']['median_ms']:.3f} / {row['auto_all']['p99_ms']:.2f}"
            f" | {100 * row['plan_share_10pct_ue_median']:.2f} %, {100 * row['plan_share_10pct_ue_max']:.1f} %, "
            f"{100 * row['plan_share_10pct_ue_over_5pct']:.0f} % of decisions |",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "uplinks_mbps": UPLINKS,
                    "horizons": HORIZONS,
                    "rtts_ms": RTTS,
                    "shares": SHARES,
                    "repeats": args.repeats,
                    "graphs": results,
                },
                indent=1,
                default=str,
            )
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
