"""Benchmark: N UEs on one shared cell uplink, ARA's shares vs equal shares, each UE pacing to its share.

Why: MJOA-MU's ARA divides the uplink (beta_n) and the server's compute (phi_n) across heterogeneous UEs;
this runs the same UEs (heterogeneous CPU quotas, models and ARA weights; the same seeded inputs) on one
shared bottleneck (``netns`` mode: one htb at the cell rate, a class per UE) with ``--allocator ara``
and ``--allocator equal``, interleaved (ARA, equal, equal, ARA, ...: the first of each pair alternates
so load drift hits both), ``--reps`` times, for each way the shares reach the cell (``--modes``: the UEs
pace to them, the htb classes are set to them, or both). It reports the weighted mean latency
(sum w_n x UE n's mean latency / sum w_n, with the weights ARA is given), its spread over the
repetitions and the per-repetition ARA / equal ratio, per-UE rows, and each UE's measured uplink
goodput against its share x cell rate.

    python -m testbed.bench_share [--n 2,4,8] [--reps 3] [--modes obeyed,enforced,both] [--json out.json]

The models are bench-only conv stacks (``convnet_wide``, ``convnet_narrow``: 32x32 inputs, so a cut or
an input is small while compute and weights are not), cycled over the UEs with the CPU quotas.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from testbed.launcher import UPLINK_MIN_SAMPLE_BYTES as MIN_SAMPLE_BYTES
from testbed.launcher import UPLINK_MIN_SAMPLE_S as MIN_SAMPLE_S

log = logging.getLogger(__name__)

RULE = ("uplink check: a sample is one busy period of a UE's uplink under one share, counted when it lasts "
        f">= {MIN_SAMPLE_S:g} s and carries >= {MIN_SAMPLE_BYTES >> 10} KiB; its uplink rate is what the cell's "
        "htb class of that UE carried (goodput) from the UE's first chunk handed over to its last "
        "(testbed.cellwatch, polled every 10 ms); within 10 % of share x R. Per UE: its longest such sample. "
        "Goodput (first chunk to last acknowledgement) and delivery (first to last acknowledgement) are the "
        "UE's own views, shown beside it: they also count the data queued ahead of the link, the round trip "
        "and the commit once.")
"""The per-UE rule, printed with the results (README: Shared cell uplink)."""


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
WEIGHTS = (1.0, 1.0, 0.5, 1.0, 0.5)
"""Cycled over the UEs (period 5 against the models' 2 and the quotas' 4, so every model and quota gets
both weights by N = 8)."""
MODES = {"obeyed": (True, False), "enforced": (False, True), "both": (True, True)}
"""Shares reach the cell by: the UEs pacing to them (obeyed), the htb classes set to them (enforced), both.
Values: (obey_shares, enforce_shares) of ``testbed.launcher.run_scenario``."""


def scenario(n: int, allocator: str, *, requests: int, policy: str, models=MODELS, cpus=CPUS, weights=WEIGHTS,
             rtt_ms: float = 10.0):
    """``n`` UEs: model i, CPU quota i and weight i cycled, all on the same policy."""
    from testbed.scenarios import Scenario, UeSpec

    ues = tuple(UeSpec(model=models[i % len(models)], policy=policy, uplink_mbps=None, rtt_ms=rtt_ms,
                       cpu=cpus[i % len(cpus)], requests=requests, weight=weights[i % len(weights)])
                for i in range(n))
    return Scenario(f"share-n{n}-{allocator}", ues, server_threads=1, allocator=allocator)


def weighted_mean(values: list[float | None], weights: list[float]) -> float | None:
    """sum w_n x_n / sum w_n (ms), None if any x_n is missing. The objective ARA minimises, per request."""
    if not values or any(v is None for v in values):
        return None
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def summarize(res: dict) -> dict:
    """Weighted mean latency (each UE's mean over its requests, weighted by its ARA weight) and the per-UE
    uplink check of one run."""
    ues = res["ues"]
    checked = [u for u in ues if u.get("uplink_error") is not None and (u.get("uplink_sample_s") or 0) >= MIN_SAMPLE_S]
    dchecked = [u for u in ues if u.get("uplink_delivery_error") is not None
                and (u.get("uplink_delivery_s") or 0) >= MIN_SAMPLE_S]
    cchecked = [u for u in ues if u.get("uplink_cell_error") is not None
                and (u.get("uplink_sample_s") or 0) >= MIN_SAMPLE_S
                and (u.get("uplink_sample_bytes") or 0) >= MIN_SAMPLE_BYTES]
    csamples = [x for u in ues for x in u.get("uplink_samples") or []
                if x.get("share_mbps") and x.get("cell_mbps") and x["seconds"] >= MIN_SAMPLE_S
                and x["bytes"] >= MIN_SAMPLE_BYTES]
    dsamples = [x for u in ues for x in u.get("uplink_samples") or []
                if x.get("share_mbps") and x.get("delivery_mbps") and (x.get("delivery_s") or 0) >= MIN_SAMPLE_S
                and x["delivery_bytes"] >= MIN_SAMPLE_BYTES]
    samples = [x for u in ues for x in u.get("uplink_samples") or []
               if x.get("share_mbps") and x["seconds"] >= MIN_SAMPLE_S and x["bytes"] >= MIN_SAMPLE_BYTES]
    return {
        "weighted_mean_ms": weighted_mean([u["mean_ms"] for u in ues], [u.get("weight", 1.0) for u in ues]),
        "ok": res["ok"],
        "fallbacks": sum(u["fallbacks"] for u in ues),
        "uplink_checked": len(checked),
        "uplink_within_10pct": sum(1 for u in checked if abs(u["uplink_error"]) <= 0.10),
        "uplink_worst_error": max((abs(u["uplink_error"]) for u in checked), default=None),
        # every paced sample of at least MIN_SAMPLE_S and MIN_SAMPLE_BYTES, not only each UE's longest
        "samples_checked": len(samples),
        "samples_within_10pct": sum(1 for x in samples if abs(x["mbps"] / x["share_mbps"] - 1) <= 0.10),
        # the same by the delivery rate (acknowledgement to acknowledgement; UploadScheduler.uplink_samples)
        "delivery_checked": len(dchecked),
        "delivery_within_10pct": sum(1 for u in dchecked if abs(u["uplink_delivery_error"]) <= 0.10),
        "delivery_samples_checked": len(dsamples),
        "delivery_samples_within_10pct": sum(1 for x in dsamples
                                             if abs(x["delivery_mbps"] / x["share_mbps"] - 1) <= 0.10),
        # the check: the rate the cell carried each UE at while it sent (testbed.cellwatch; RULE)
        "cell_checked": len(cchecked),
        "cell_within_10pct": sum(1 for u in cchecked if abs(u["uplink_cell_error"]) <= 0.10),
        "cell_worst_error": max((u["uplink_cell_error"] for u in cchecked), key=abs, default=None),
        "cell_samples_checked": len(csamples),
        "cell_samples_within_10pct": sum(1 for x in csamples if abs(x["cell_mbps"] / x["share_mbps"] - 1) <= 0.10),
        "cell_samples_worst_error": max((x["cell_mbps"] / x["share_mbps"] - 1 for x in csamples), key=abs,
                                        default=None),
        "ues": [{k: u.get(k) for k in ("model", "cpu", "weight", "mean_ms", "latency_ms", "predicted_ms",
                                        "offloaded", "share_log", "send_mbps", "send_cpu_mbps", "send_updates",
                                        "uplink_mbps_measured", "uplink_share_mbps", "uplink_samples",
                                        "uplink_sample_s", "uplink_sample_bytes", "uplink_error",
                                        "uplink_delivery_mbps", "uplink_delivery_s", "uplink_delivery_error",
                                        "uplink_cell_mbps", "uplink_cell_error", "uplink_cell_backlog_max", "error")}
                for u in ues],
    }


def _spread(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def pair_table(rows: list[dict], ns: list[int], modes: list[str]) -> list[dict]:
    """Per (N, mode): equal and ARA weighted means over the repetitions and the per-repetition ratio."""
    out = []
    for n in ns:
        for mode in modes:
            eq = {r["rep"]: r for r in rows if r["n"] == n and r["mode"] == mode and r["allocator"] == "equal"}
            ar = {r["rep"]: r for r in rows if r["n"] == n and r["mode"] == mode and r["allocator"] == "ara"}
            reps = sorted(set(eq) & set(ar))
            ratios = [ar[k]["weighted_mean_ms"] / eq[k]["weighted_mean_ms"] for k in reps
                      if ar[k]["weighted_mean_ms"] and eq[k]["weighted_mean_ms"]]
            eqm = _spread([eq[k]["weighted_mean_ms"] for k in reps])
            arm = _spread([ar[k]["weighted_mean_ms"] for k in reps])
            out.append({"n": n, "mode": mode, "equal_ms": eqm, "ara_ms": arm, "ratio": _spread(ratios),
                        "ratio_of_means": (arm["mean"] / eqm["mean"] if arm["mean"] and eqm["mean"] else None),
                        "ara_wins": sum(1 for x in ratios if x <= 1.0), "reps": len(reps),
                        "uplink": {a: (sum(r["uplink_within_10pct"] for r in d.values()),
                                       sum(r["uplink_checked"] for r in d.values()))
                                   for a, d in (("equal", eq), ("ara", ar))},
                        "samples": {a: (sum(r.get("samples_within_10pct", 0) for r in d.values()),
                                        sum(r.get("samples_checked", 0) for r in d.values()))
                                    for a, d in (("equal", eq), ("ara", ar))},
                        "delivery": {a: (sum(r.get("delivery_within_10pct", 0) for r in d.values()),
                                         sum(r.get("delivery_checked", 0) for r in d.values()))
                                     for a, d in (("equal", eq), ("ara", ar))},
                        "delivery_samples": {a: (sum(r.get("delivery_samples_within_10pct", 0) for r in d.values()),
                                                 sum(r.get("delivery_samples_checked", 0) for r in d.values()))
                                             for a, d in (("equal", eq), ("ara", ar))},
                        "cell": {a: (sum(r.get("cell_within_10pct", 0) for r in d.values()),
                                     sum(r.get("cell_checked", 0) for r in d.values()))
                                 for a, d in (("equal", eq), ("ara", ar))},
                        "cell_samples": {a: (sum(r.get("cell_samples_within_10pct", 0) for r in d.values()),
                                             sum(r.get("cell_samples_checked", 0) for r in d.values()))
                                         for a, d in (("equal", eq), ("ara", ar))},
                        "cell_worst": {a: max((r["cell_samples_worst_error"] for r in d.values()
                                               if r.get("cell_samples_worst_error") is not None),
                                              key=abs, default=None)
                                       for a, d in (("equal", eq), ("ara", ar))}})
    return out


def plot(pairs: list[dict], path: Path) -> Path | None:
    """ARA / equal weighted mean latency per N and mode, the bar at the mean of the per-repetition ratios,
    the whisker from their min to max."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = sorted({p["mode"] for p in pairs}, key=list(MODES).index)
    ns = sorted({p["n"] for p in pairs})
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(ns) * len(modes), 3.4))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        for i, n in enumerate(ns):
            p = next((q for q in pairs if q["n"] == n and q["mode"] == mode), None)
            if p is None or p["ratio"]["mean"] is None:
                continue
            r = p["ratio"]
            x = i + (j - (len(modes) - 1) / 2) * width
            ax.bar(x, r["mean"], width * 0.9, color=f"C{j}", label=mode if i == 0 else None)
            ax.errorbar(x, r["mean"], yerr=[[r["mean"] - r["min"]], [r["max"] - r["mean"]]], color="k", capsize=3)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_xticks(range(len(ns)), [f"N = {n}" for n in ns])
    ax.set_ylabel("ARA / equal, weighted mean latency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(rows: list[dict], ns: list[int], modes: list[str]) -> list[dict]:
    """Print the pair table and the per-UE rows of ``rows``; returns ``pair_table``'s pairs."""
    pairs = pair_table(rows, ns, modes)
    print()
    print(RULE)
    print(f"{'N':>3} {'mode':<9} {'equal ms':>17} {'ARA ms':>17} {'ARA/equal (min-max)':>22} {'ARA<=eq':>8}  "
          "at the cell, within 10 % (equal; ARA): per UE  every sample  worst  | UE's goodput: per UE  every "
          "sample  | delivery rate: per UE  every sample")
    for q in pairs:
        e, a, r = q["equal_ms"], q["ara_ms"], q["ratio"]
        if r["mean"] is None:
            print(f"{q['n']:>3} {q['mode']:<9} (no complete pair)")
            continue
        print(f"{q['n']:>3} {q['mode']:<9} {e['mean']:>6.0f} ({e['min']:.0f}-{e['max']:.0f}) "
              f"{a['mean']:>6.0f} ({a['min']:.0f}-{a['max']:.0f}) {r['mean']:>8.2f} ({r['min']:.2f}-{r['max']:.2f}) "
              f"{q['ara_wins']:>4}/{q['reps']}  "
              + "  ".join(f"{q[k]['equal'][0]}/{q[k]['equal'][1]}; {q[k]['ara'][0]}/{q[k]['ara'][1]}"
                          for k in ("cell", "cell_samples"))
              + "  " + "; ".join("-" if q["cell_worst"][a] is None else f"{q['cell_worst'][a]:+.1%}"
                                 for a in ("equal", "ara"))
              + f"  | {q['uplink']['equal'][0]}/{q['uplink']['equal'][1]}; "
              f"{q['uplink']['ara'][0]}/{q['uplink']['ara'][1]}  "
              f"{q['samples']['equal'][0]}/{q['samples']['equal'][1]}; "
              f"{q['samples']['ara'][0]}/{q['samples']['ara'][1]}  | "
              + "  ".join(f"{q[k]['equal'][0]}/{q[k]['equal'][1]}; {q[k]['ara'][0]}/{q[k]['ara'][1]}"
                          for k in ("delivery", "delivery_samples")))
    print()
    print(f"{'N':>3} {'mode':<9} {'alloc':<6} {'ue':>3} {'model':<15} {'cpu':>5} {'w':>4} {'mean ms (reps)':<24} "
          f"{'pred 1st':>8} {'probe':>6} {'send':>6} {'up Mbps':>8} {'share':>6} {'cell err':>8} {'err':>7} "
          f"{'dl err':>7}  sustained")
    for n in ns:
        for mode in modes:
            for alloc in ("equal", "ara"):
                rs = [r for r in rows if r["n"] == n and r["mode"] == mode and r["allocator"] == alloc]
                for i in range(n):
                    us = [r["ues"][i] for r in rs]
                    u = us[0]
                    means = " ".join("-" if x["mean_ms"] is None else f"{x['mean_ms']:.0f}" for x in us)
                    pred = [x["predicted_ms"][0] for x in us if x.get("predicted_ms")]
                    errs = [x["uplink_error"] for x in us if x.get("uplink_error") is not None]
                    derrs = [x["uplink_delivery_error"] for x in us if x.get("uplink_delivery_error") is not None]
                    cerrs = [x["uplink_cell_error"] for x in us if x.get("uplink_cell_error") is not None]
                    m = [x["uplink_mbps_measured"] for x in us if x.get("uplink_mbps_measured") is not None]
                    sh = [x["uplink_share_mbps"] for x in us if x.get("uplink_share_mbps") is not None]
                    send = [x["send_mbps"] for x in us if x.get("send_mbps")]
                    probe = [x["send_cpu_mbps"] for x in us if x.get("send_cpu_mbps")]
                    sus = " ".join(f"{m:.2f}" for x in us for _, m, src in x.get("send_updates") or []
                                   if src == "sustained")
                    print(f"{n:>3} {mode:<9} {alloc:<6} {i:>3} {u['model'].split(':')[-1][:15]:<15} {u['cpu']:>5g} "
                          f"{u['weight']:>4g} {means:<24} {statistics.fmean(pred) if pred else 0:>8.0f} "
                          f"{statistics.fmean(probe) if probe else 0:>6.2f} "
                          f"{statistics.fmean(send) if send else 0:>6.2f} "
                          f"{statistics.fmean(m) if m else 0:>8.2f} {statistics.fmean(sh) if sh else 0:>6.2f} "
                          f"{max(cerrs, key=abs) if cerrs else 0:>+8.1%} {max(errs, key=abs) if errs else 0:>+7.1%} "
                          f"{max(derrs, key=abs) if derrs else 0:>+7.1%}  {sus}")
    return pairs


def combine(paths: list[Path], out: Path | None) -> int:
    """``--combine``: one report over the runs of several result files (their commands kept)."""
    docs = [json.loads(p.read_text()) for p in paths]
    rows = [r for d in docs for r in d["runs"]]
    ns = sorted({r["n"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    pairs = report(rows, ns, modes)
    if out:
        out.write_text(json.dumps({"combined": [str(p) for p in paths], "commands": [d["command"] for d in docs],
                                   "load": [[d["load_before"], d["load_after"]] for d in docs],
                                   "weights": docs[0]["weights"], "pairs": pairs, "runs": rows}, indent=1))
        png = plot(pairs, out.with_suffix(".png"))
        print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


def _uptime() -> str | None:
    """``uptime``'s line (the load beside the numbers), None where it cannot run."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.bench_share", description=__doc__.splitlines()[0])
    p.add_argument("--n", default="2,4,8", help="UE counts (comma list; default 2,4,8)")
    p.add_argument("--cell-mbps", type=float, default=8.0, help="the shared uplink, Mbit/s (default 8)")
    p.add_argument("--requests", type=int, default=3, help="requests per UE (default 3)")
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of each (N, mode) pair, ARA and equal interleaved (default 3)")
    p.add_argument("--modes", default="obeyed",
                   help="how shares reach the cell, comma list of obeyed (UEs pace), enforced (htb class rates), "
                        "both (default obeyed)")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS),
                   help="the UEs' ARA weights, cycled (comma list, each in (0, 1]: the testbed's tenants may claim "
                        "at most 1; default %(default)s)")
    p.add_argument("--cpus", default=",".join(f"{c:g}" for c in CPUS),
                   help="the UEs' CPU quotas (share of a core), cycled (comma list; default %(default)s)")
    p.add_argument("--policy", default="dads", help="every UE's policy (default dads: offloads, cold upload)")
    p.add_argument("--ara-policy", default="dads",
                   help="the policy ARA plans the UEs with (coinfer-edge --ara-policy; default: dads, as the UEs)")
    p.add_argument("--json", type=Path, help="write the results here (and a PNG beside it)")
    p.add_argument("--out", type=Path, help="keep the runs' logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    p.add_argument("--settle-s", type=float, default=2.0,
                   help="open every UE's session, then wait until the server's log is quiet this long before "
                        "the requests start (the allocation for all N; default 2; 0: start at once, each UE "
                        "planning under whatever share it holds while the others join)")
    p.add_argument("--no-watch-cell", dest="watch_cell", action="store_false",
                   help="do not poll the cell's htb counters (testbed.cellwatch): no uplink rate at the cell, only "
                        "the UEs' own goodput and delivery rates")
    p.add_argument("--combine", metavar="A.json,B.json",
                   help="run nothing: merge the runs of these earlier --json files (e.g. one per N, each run under "
                        "its own lock) into one table, --json and PNG")
    args = p.parse_args(argv)
    if args.combine:
        return combine([Path(x) for x in args.combine.split(",") if x.strip()], args.json)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from testbed.launcher import run_scenario

    ns = [int(x) for x in args.n.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    weights = tuple(float(w) for w in args.weights.split(",") if w.strip())
    cpus = tuple(float(c) for c in args.cpus.split(",") if c.strip())
    if not cpus or any(not 0 < c <= 1 for c in cpus):
        p.error("--cpus: each in (0, 1]")
    if not weights or any(not 0 < w <= 1 for w in weights):
        p.error("--weights: each in (0, 1] (a larger claim is capped at the tenant's compute_weight, 1.0 here)")
    out = args.out or Path(tempfile.mkdtemp(prefix="coinfer-bench-share-"))
    rows = []
    load = os.getloadavg()
    uptime0 = _uptime()
    t0 = time.time()
    for n in ns:
        for rep in range(args.reps):
            for mode in modes:
                # interleaved, the first of the pair alternating: load drift hits both allocators alike
                for allocator in (("ara", "equal") if rep % 2 == 0 else ("equal", "ara")):
                    sc = scenario(n, allocator, requests=args.requests, policy=args.policy, weights=weights, cpus=cpus)
                    obey, enforce = MODES[mode]
                    la = os.getloadavg()[0]
                    res = run_scenario(sc, out / f"{sc.name}-{mode}-r{rep}", mode="netns", timeout_s=args.timeout,
                                       shared_uplink_mbps=args.cell_mbps, server_args=["--ara-policy", args.ara_policy],
                                       enforce_shares=enforce, obey_shares=obey, settle_s=args.settle_s,
                                       watch_cell=args.watch_cell)
                    row = {"n": n, "rep": rep, "mode": mode, "allocator": allocator, **summarize(res),
                           "wall_s": res["wall_s"], "load_1m": la}
                    rows.append(row)
                    print(f"n={n} rep={rep} {mode} {allocator}: weighted mean {row['weighted_mean_ms'] or 0:.0f} ms; "
                          f"uplink within 10 % at the cell: per UE {row['cell_within_10pct']}/{row['cell_checked']}, "
                          f"every sample {row['cell_samples_within_10pct']}/{row['cell_samples_checked']}; "
                          f"by goodput {row['uplink_within_10pct']}/{row['uplink_checked']} (load {la:.1f})",
                          flush=True)
    pairs = report(rows, ns, modes)
    result = {"command": "python -m testbed.bench_share " + " ".join(sys.argv[1:] if argv is None else argv),
              "cell_mbps": args.cell_mbps, "requests": args.requests, "reps": args.reps, "modes": modes,
              "policy": args.policy, "ara_policy": args.ara_policy, "models": list(MODELS), "cpus": list(cpus),
              "weights": list(weights), "settle_s": args.settle_s, "load_before": load, "load_after": os.getloadavg(),
              "uptime_before": uptime0, "uptime_after": _uptime(), "rule": RULE,
              "cpu_count": os.cpu_count(), "elapsed_s": time.time() - t0, "pairs": pairs, "runs": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        png = plot(pairs, args.json.with_suffix(".png"))
        print(f"wrote {args.json}" + (f" and {png}" if png else ""))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
