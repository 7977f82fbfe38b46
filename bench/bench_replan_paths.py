"""CPU of each decision along one cold-to-warm stream of ``auto`` (or another policy), in process, per request.

    flock /work/wt/.bench.lock env PYTHONPATH=CHECKOUT python bench/bench_replan_paths.py \
        [--models mobilenet_v2,googlenet,resnet18] [--policy auto] [--uplink-mbps 100] [--repeats 30] [--flush-mb 0]
        [--json PATH]

The stream of session 16's full grid where its 10 % UEs planned over 5 % of a request (``docs/results/full/
session16/logs``): ``DecisionCache.decide`` on the kept cost graph (``docs/results/cold/session10/costgraphs``) with
the UE 10x slower, a ``--uplink-mbps`` / 20 ms link, a shared send cost of 10 ns/B, horizon 8, and per request
what the runtime would see: request 0 planned while connecting (nothing held); each plan's upload and half its
background held by the next request; the server scale 1 -> 1.34 at request 2 (the cold request's calibration), the
whole model held from request 3 (the target's upload done), the UE scale 1 -> 1.34 at request 4 (a local run's
calibration), the transport residual 0 -> 14 ms at request 5. The same stream ``--repeats`` times with a fresh
cache (the prepared graphs' memos kept, as in one process); per request the median and min of the decision's
thread CPU (ms, ``time.thread_time``) and its ``plan_why``. The code measured is the one on ``PYTHONPATH``: run
it once per checkout, one after the other under the lock, for a before / after.

``--flush-mb N`` (session 19): before each decision, write N MB of memory (a numpy buffer, in place) so that the
decision starts with cold CPU caches, as in a real client, where the request's inference ran between two
decisions (there the same searches cost 2-4x what this bench measured with warm caches, session 18). 0: off.
With it, the online tables' memos keyed by a server state (``partitioner.online``'s bytes-left and held vectors,
``OnlineTable``'s held candidates) are emptied before each decision too: in a real client every request meets a new
held set, while here the repeats of one stream meet the same ones and found them memoised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COSTGRAPHS = ROOT / "docs/results/cold/session10/costgraphs"


def stream(name: str, policy: str, mbps: float, flush=None) -> list[tuple[float, str, int]]:
    """One stream's (CPU ms, ``plan_why``, server ops) per request (module docstring)."""
    from partitioner.costgraph import Link
    from partitioner.state import ServerState, Shares
    from partitioner.uecpu import UeCpu
    from ue_client.decisions import DecisionCache

    g = _graph(name)
    every = frozenset(g.weights)
    dc = DecisionCache(policy, fixed_server_ops=None, deadline_ms=None, plan_budget_s=0.3, horizon=8)
    link, ue_cpu = Link(mbps, rtt_ms=20.0), UeCpu(send_ms_per_byte=1e-5, shared=True)
    scale = {"ue": 1.0, "server": 1.0, "ue_overhead_ms": 0.0, "transport_ms": 0.0, "transport_sd_ms": 0.0,
             "transport_se_ms": 0.0}
    held: frozenset[str] = frozenset()
    out = []
    for n in range(8):
        costs = _calibrated(g, scale["ue"], scale["server"])
        kw = dict(costs=lambda c=costs: c, base=g, link=link, ue_cpu=ue_cpu, scale=dict(scale), measured_cv=None,
                  ue_cv=None)
        st = ServerState(held=held)
        if flush is not None:  # evict the caches (``--flush-mb``): in place, no allocation; forget the states
            flush += 1.0
            _forget_states()
        c0 = time.thread_time()
        ch = dc.decide(st, Shares(), n=n, **kw)
        out.append(((time.thread_time() - c0) * 1e3, ch.details.get("plan_why", ""), len(ch.server_ops)))
        held = held | frozenset(ch.upload_order) | frozenset(ch.background[: max(1, len(ch.background) // 2)])
        if n == 1:
            scale = {**scale, "server": 1.34}
        elif n == 2:
            held = every
        elif n == 3:
            scale = {**scale, "ue": 1.34}
        elif n == 4:
            scale = {**scale, "transport_ms": 14.0}
    return out


_GRAPHS: dict = {}


def _forget_states() -> None:
    """Empty the memos keyed by a server state (``--flush-mb``; the compiled partitions and tables are kept)."""
    from partitioner import online

    for _, (_, _, memo) in online._WEIGHT_INDEX.values():
        memo.clear()
    for tables in online._CACHE.values():
        for t in tables:
            for k in [k for k in t._memo if isinstance(k, tuple)]:
                del t._memo[k]


def _graph(name: str):
    from partitioner.costgraph import CostGraph

    if name not in _GRAPHS:
        _GRAPHS[name] = CostGraph.from_json(COSTGRAPHS / f"{name}.json").scaled(ue=10.0)
    return _GRAPHS[name]


def _calibrated(g, ue: float, server: float):
    """The calibrated copy, one per scale pair (as ``CostModel.costs`` keeps it while the scales stay)."""
    key = (id(g), ue, server)
    if key not in _GRAPHS:
        _GRAPHS[key] = g.scaled(ue=ue, server=server)
    return _GRAPHS[key]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,googlenet,resnet18")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--uplink-mbps", type=float, default=100.0)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--flush-mb", type=float, default=0.0, help="MB written before each decision (0: none)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import os

    import ue_client

    code = str(Path(ue_client.__file__).resolve().parents[1])
    load0 = os.getloadavg()
    rows = []
    flush = None
    if args.flush_mb > 0:
        import numpy as np

        flush = np.zeros(int(args.flush_mb * 2**20 / 8))
    print(f"code {code}, policy {args.policy}, uplink {args.uplink_mbps:g} Mbit/s, {args.repeats} streams per model, "
          f"{args.flush_mb:g} MB flushed before each decision")
    print("| model | request | plan_why | server ops | CPU ms median | min |")
    print("|---|---|---|---|---|---|")
    for m in args.models.split(","):
        runs = [stream(m, args.policy, args.uplink_mbps, flush) for _ in range(args.repeats)]
        for i in range(len(runs[0])):
            ts = [r[i][0] for r in runs]
            why, srv = runs[0][i][1], runs[0][i][2]
            rows.append({"model": m, "request": i, "plan_why": why, "server_ops": srv,
                         "cpu_median_ms": statistics.median(ts), "cpu_min_ms": min(ts),
                         "same_path_every_run": all(r[i][1] == why for r in runs)})
            print(f"| {m} | {i} | {why} | {srv} | {statistics.median(ts):.3f} | {min(ts):.3f} |")
    print(f"load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"code": code, "policy": args.policy, "uplink_mbps": args.uplink_mbps,
                                         "repeats": args.repeats, "flush_mb": args.flush_mb, "load_before": load0,
                                         "load_after": os.getloadavg(), "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
