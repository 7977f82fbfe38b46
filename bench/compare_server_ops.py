"""Side by side: two policies' warm remote requests on the server, op kind by op kind.

Reads a UE log of ``coinfer-testbed bench --op-timings`` (``logs/ueN.json``: every remote request's row has
``server_op_ms``, ``[[op, start ms, ms], ...]``) and prints, per policy, each warm request's server compute,
input wait, latency and UE CPU, the run time of each op kind (``conv2d``, ``max_pool2d``, ... : the op name
without its ``_N`` suffix) summed over the request, and the ops whose median run time differs most between
the two policies. Writes the same as JSON with ``--json``.

Why: issue 12 (session 9's grid, googlenet at UE 10 % / 400 Mbit/s) had coinfer's warm requests compute the
same 197-op slice in 52-70 ms against DADS+serial's 36-47 ms. Whether a difference is in a few ops (a weight
laid out differently, a cache) or spread over all of them (the server's cores taken by something else) shows
in these tables.

Usage: ``python bench/compare_server_ops.py LOGS/ue0.json [--a coinfer] [--b dads-serial] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

_SUFFIX = re.compile(r"_\d+$")


def op_kind(name: str) -> str:
    """``conv2d_12`` -> ``conv2d`` (the captured graph numbers repeated ops)."""
    return _SUFFIX.sub("", name)


def warm_rows(log: dict[str, Any], policy: str) -> list[dict[str, Any]]:
    """The policy's stream requests after its first that ran on the server, uploaded nothing and defined no
    slice (warm), and carry per-op timings. Raises KeyError for a policy the log does not have."""
    rows = log["streams"][policy]["requests"]
    return [r for r in rows if r["i"] > 0 and r.get("server_timings") and r.get("server_op_ms")
            and not r.get("uploaded_bytes") and not r.get("new_slice")]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per request: i, latency, server compute / input wait (ms), UE CPU (ms) and the ms of each op kind."""
    out = []
    for r in rows:
        kinds: dict[str, float] = {}
        for name, _start, ms in r["server_op_ms"]:
            k = op_kind(name)
            kinds[k] = kinds.get(k, 0.0) + ms
        st = r["server_timings"]
        out.append({"i": r["i"], "latency_ms": r["latency_ms"], "compute_ms": st["compute_ms"],
                    "input_wait_ms": st["input_wait_ms"], "ue_cpu_ms": r["cpu_ms"], "plan_ms": r.get("plan_ms", 0.0),
                    "kinds_ms": kinds})
    mean = (lambda xs: statistics.fmean(xs) if xs else None)
    return {"requests": out, "mean_latency_ms": mean([x["latency_ms"] for x in out]),
            "mean_compute_ms": mean([x["compute_ms"] for x in out]),
            "mean_input_wait_ms": mean([x["input_wait_ms"] for x in out]),
            "mean_ue_cpu_ms": mean([x["ue_cpu_ms"] for x in out])}


def op_medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median run time (ms) of each op over the requests."""
    per: dict[str, list[float]] = {}
    for r in rows:
        for name, _start, ms in r["server_op_ms"]:
            per.setdefault(name, []).append(ms)
    return {k: statistics.median(v) for k, v in per.items()}


def compare(log: dict[str, Any], a: str, b: str, top: int = 10) -> dict[str, Any]:
    ra, rb = warm_rows(log, a), warm_rows(log, b)
    ma, mb = op_medians(ra), op_medians(rb)
    common = [k for k in ma if k in mb]
    diffs = sorted(common, key=lambda k: abs(ma[k] - mb[k]), reverse=True)[:top]
    return {"a": a, "b": b, a: summarize(ra), b: summarize(rb),
            "top_op_differences": [{"op": k, f"{a}_ms": ma[k], f"{b}_ms": mb[k]} for k in diffs]}


def print_table(res: dict[str, Any]) -> None:
    a, b = res["a"], res["b"]
    kinds = sorted({k for p in (a, b) for r in res[p]["requests"] for k in r["kinds_ms"]})
    head = ["policy", "i", "latency", "compute", "input wait", "UE CPU", "plan", *kinds]
    print(" | ".join(head))
    for p in (a, b):
        for r in res[p]["requests"]:
            print(" | ".join([p, str(r["i"]), f"{r['latency_ms']:.0f}", f"{r['compute_ms']:.1f}",
                              f"{r['input_wait_ms']:.1f}", f"{r['ue_cpu_ms']:.1f}", f"{r['plan_ms']:.1f}",
                              *(f"{r['kinds_ms'].get(k, 0.0):.1f}" for k in kinds)]))
        s = res[p]
        if s["mean_latency_ms"] is not None:
            print(f"{p} mean: latency {s['mean_latency_ms']:.1f} ms, compute {s['mean_compute_ms']:.1f} ms, "
                  f"input wait {s['mean_input_wait_ms']:.1f} ms, UE CPU {s['mean_ue_cpu_ms']:.2f} ms")
    print(f"ops whose median differs most ({a} vs {b}, ms):")
    for d in res["top_op_differences"]:
        print(f"  {d['op']}: {d[f'{a}_ms']:.2f} vs {d[f'{b}_ms']:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="logs/ueN.json of a `coinfer-testbed bench --op-timings` run")
    p.add_argument("--a", default="coinfer")
    p.add_argument("--b", default="dads-serial")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    log = json.loads(args.log.read_text())
    try:
        res = compare(log, args.a, args.b)
    except KeyError as e:
        print(f"{args.log}: no stream {e}", file=sys.stderr)
        return 2
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
