"""Benchmark: N UEs on one shared cell uplink, ARA's shares vs equal shares, each UE pacing to its share.

Why: MJOA-MU's ARA divides the uplink (beta_n) and the server's compute (phi_n) across heterogeneous UEs;
this runs the same UEs (heterogeneous CPU quotas and models) twice on one shared bottleneck (``netns``
mode: one htb at the cell rate, a class per UE), once with ``--allocator equal`` and once with
``--allocator ara``, with every UE pacing its uplink to the share the server tells it. It reports the
weighted mean latency (all weights 1: the plain mean of the UEs' mean latencies) of each, and each UE's
measured uplink goodput against its share x cell rate.

    python -m testbed.bench_share [--n 2,4,8] [--cell-mbps 8] [--requests 3] [--json out.json]

The models are bench-only conv stacks (``convnet_wide``, ``convnet_narrow``: 32x32 inputs, so a cut or
an input is small while compute and weights are not), cycled over the UEs with the CPU quotas.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_SAMPLE_S = 0.5
"""Shortest goodput sample (one busy period under one share) that counts for the 10 % check."""


def _convnet(width: int, depth: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers).eval(), (torch.randn(1, 3, 32, 32),)


def convnet_wide() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """8 3x3 convs of 96 channels on 32x32 (~2.3 MB of weights, ~1.2 GFLOP); input 12 kB."""
    return _convnet(96, 8)


def convnet_narrow() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """16 3x3 convs of 48 channels on 32x32 (~1.3 MB of weights, ~0.7 GFLOP); input 12 kB."""
    return _convnet(48, 16)


MODELS = ("testbed.bench_share:convnet_wide", "testbed.bench_share:convnet_narrow")
CPUS = (0.1, 0.1, 0.12, 0.08)


def scenario(n: int, allocator: str, *, requests: int, policy: str, models=MODELS, cpus=CPUS, rtt_ms: float = 10.0):
    """``n`` UEs: model i and CPU quota i cycled, all on the same policy."""
    from testbed.scenarios import Scenario, UeSpec

    ues = tuple(UeSpec(model=models[i % len(models)], policy=policy, uplink_mbps=None, rtt_ms=rtt_ms,
                       cpu=cpus[i % len(cpus)], requests=requests) for i in range(n))
    return Scenario(f"share-n{n}-{allocator}", ues, server_threads=1, allocator=allocator)


def summarize(res: dict) -> dict:
    """Weighted mean latency and the per-UE uplink check of one run."""
    ues = res["ues"]
    means = [u["mean_ms"] for u in ues if u["mean_ms"] is not None]
    checked = [u for u in ues if u.get("uplink_error") is not None and (u.get("uplink_sample_s") or 0) >= MIN_SAMPLE_S]
    return {
        "weighted_mean_ms": statistics.fmean(means) if len(means) == len(ues) else None,
        "ok": res["ok"],
        "fallbacks": sum(u["fallbacks"] for u in ues),
        "uplink_checked": len(checked),
        "uplink_within_10pct": sum(1 for u in checked if abs(u["uplink_error"]) <= 0.10),
        "uplink_worst_error": max((abs(u["uplink_error"]) for u in checked), default=None),
        "ues": [{k: u.get(k) for k in ("model", "cpu", "mean_ms", "latency_ms", "uplink_mbps_measured",
                                        "uplink_share_mbps", "uplink_sample_s", "uplink_error", "error")}
                for u in ues],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench_share", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2,4,8", help="UE counts (comma list; default 2,4,8)")
    p.add_argument("--cell-mbps", type=float, default=8.0, help="the shared uplink, Mbit/s (default 8)")
    p.add_argument("--requests", type=int, default=3, help="requests per UE (default 3)")
    p.add_argument("--policy", default="dads", help="every UE's policy (default dads: offloads, cold upload)")
    p.add_argument("--ara-policy", default="dads",
                   help="the policy ARA plans the UEs with (coinfer-edge --ara-policy; default: dads, as the UEs)")
    p.add_argument("--enforce-shares", action="store_true",
                   help="also set each UE's htb class to its share (coinfer-testbed run --enforce-shares)")
    p.add_argument("--ignore-shares", action="store_true",
                   help="UEs do not pace to their shares (with --enforce-shares: enforced only)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--out", type=Path, help="keep the runs' logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from testbed.launcher import run_scenario

    ns = [int(x) for x in args.n.split(",") if x.strip()]
    out = args.out or Path(tempfile.mkdtemp(prefix="coinfer-bench-share-"))
    rows = []
    load = os.getloadavg()
    t0 = time.time()
    for n in ns:
        for allocator in ("equal", "ara"):
            sc = scenario(n, allocator, requests=args.requests, policy=args.policy)
            res = run_scenario(sc, out / sc.name, mode="netns", timeout_s=args.timeout,
                               shared_uplink_mbps=args.cell_mbps, server_args=["--ara-policy", args.ara_policy],
                               enforce_shares=args.enforce_shares, obey_shares=not args.ignore_shares)
            row = {"n": n, "allocator": allocator, **summarize(res), "wall_s": res["wall_s"]}
            rows.append(row)
            print(f"n={n} {allocator}: weighted mean {row['weighted_mean_ms']} ms; uplink within 10 %: "
                  f"{row['uplink_within_10pct']}/{row['uplink_checked']}", flush=True)
    print()
    print(f"{'N':>3} {'equal ms':>10} {'ARA ms':>10} {'ARA/equal':>10}  uplink within 10 % of share (equal; ARA)")
    pairs = []
    for n in ns:
        eq = next(r for r in rows if r["n"] == n and r["allocator"] == "equal")
        ara = next(r for r in rows if r["n"] == n and r["allocator"] == "ara")
        ratio = (ara["weighted_mean_ms"] / eq["weighted_mean_ms"]
                 if ara["weighted_mean_ms"] and eq["weighted_mean_ms"] else None)
        pairs.append({"n": n, "equal_ms": eq["weighted_mean_ms"], "ara_ms": ara["weighted_mean_ms"], "ratio": ratio})
        print(f"{n:>3} {eq['weighted_mean_ms'] or 0:>10.0f} {ara['weighted_mean_ms'] or 0:>10.0f} "
              f"{ratio or 0:>10.2f}  {eq['uplink_within_10pct']}/{eq['uplink_checked']}; "
              f"{ara['uplink_within_10pct']}/{ara['uplink_checked']}")
    print()
    print(f"{'N':>3} {'alloc':<6} {'ue':>3} {'model':<16} {'cpu':>5} {'mean ms':>9} {'up Mbps':>8} {'share':>7} "
          f"{'err':>7} {'sample s':>8}")
    for r in rows:
        for i, u in enumerate(r["ues"]):
            m, s, e = u["uplink_mbps_measured"], u["uplink_share_mbps"], u["uplink_error"]
            ms = "-" if m is None else f"{m:.2f}"
            ss = "-" if s is None else f"{s:.2f}"
            es = "-" if e is None else f"{e:+.1%}"
            print(f"{r['n']:>3} {r['allocator']:<6} {i:>3} {u['model'].split(':')[-1][:16]:<16} {u['cpu']:>5g} "
                  f"{u['mean_ms'] or 0:>9.0f} {ms:>8} {ss:>7} {es:>7} {u['uplink_sample_s'] or 0:>8.2f}")
    result = {"command": "python -m testbed.bench_share " + " ".join(sys.argv[1:] if argv is None else argv),
              "cell_mbps": args.cell_mbps, "requests": args.requests, "policy": args.policy,
              "ara_policy": args.ara_policy, "enforce_shares": args.enforce_shares,
              "obey_shares": not args.ignore_shares, "models": list(MODELS), "cpus": list(CPUS),
              "load_before": load, "load_after": os.getloadavg(), "cpu_count": os.cpu_count(),
              "elapsed_s": time.time() - t0, "pairs": pairs, "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
