"""Planning inside requests on a CPU-throttled UE: ``plan_ms`` per request as a share of the request.

    flock /work/wt/.bench.lock python bench/bench_plan_ms.py --cpus 0.1 --model torchvision:googlenet \
        --requests 8 --json OUT.json [--root CHECKOUT] -- --uplink-mbps 400 --rtt-ms 20

Starts ``coinfer-edge serve`` (full CPU, loopback) and one ``coinfer-ue run --policy auto`` inside a cgroup
with a CPU quota of ``--cpus`` cores over 10 ms CFS periods (``testbed.cgroups.CpuCgroup``; needs root and
cgroups), both from the checkout ``--root`` (default: this one; another checkout gives the before/after
comparison on the same profile cache, ``COINFER_CACHE_DIR`` = ``--cache``). Arguments after ``--`` go to
``coinfer-ue run`` (e.g. the planning link; ``--plan inline|background`` on checkouts that have it,
``--interval-ms MS`` for a caller that pauses). Prints every request's ``plan_ms`` (the whole decision on the
request's clock, wall ms under the quota, a wait for the background decision included), its latency and the
share, the decisions made in full (and for which drift: ``scale``, the transport residual), and writes
``coinfer-ue run``'s JSON report to ``--json`` with a ``plan_share`` summary added; ``plan_next_ms``: what
the client spent after the request deciding the next one (session 11's ``plan_after``, in reports of checkouts
before session 13), ``plan_bg_ms``: the background decision's (``ClientOptions.plan_background``), both outside
every request's latency. ``--show``
prints the table of an existing report. The issue-12 aim: ``plan_ms`` <= 5 % of every request on a UE with
10 % of a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from edge_process import edge_server  # noqa: E402

from testbed.cgroups import CpuCgroup  # noqa: E402

SEARCHED = ("first", "link", "scale", "send cost", "spread", "changed")
"""``plan_why`` prefixes of a decision made in full (a search), wherever it ran; the others ('reused',
'planned ahead', 'followed') are checks."""


def searched(why: str) -> str:
    """The reason a request's decision was made in full ('' when it was a check): ``plan_why`` itself, or the
    one inside 'planned in the background (WHY)' / 'planned after the previous request (WHY)'."""
    inner = why
    for pre in ("planned in the background (", "planned after the previous request ("):
        if why.startswith(pre):
            inner = why[len(pre):-1]
    return inner if inner.startswith(SEARCHED) else ""


def summary(d: dict) -> dict:
    """Print the per-request table of a ``coinfer-ue run --json`` report; its ``plan_share`` summary.
    ``plan_ms`` counts a wait for the background decision (``plan_wait_ms``); ``plan_bg_ms``: that decision's
    own wall ms on the worker thread (outside the request's clock), ``plan_bg``: taken / stale (what moved)."""
    print("| request | policy | server ops | plan_ms | plan_cpu_ms | waited ms | measured ms | plan share | "
          "planned because | background (ms, CPU ms) | plan_next_ms (CPU) | plan reason |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shares = []
    for r in d["requests"]:
        share = r["plan_ms"] / r["measured_ms"] if r["measured_ms"] > 0 else 0.0
        shares.append(share)
        bg = r.get("plan_bg", "")
        bgs = f"{bg} ({r.get('plan_bg_ms', 0.0):.2f}, {r.get('plan_bg_cpu_ms', 0.0):.2f})" if bg else ""
        print(f"| {r['request']} | {r['policy']} | {r['server_ops']} | {r['plan_ms']:.2f} | "
              f"{r.get('plan_cpu_ms', 0.0):.2f} | {r.get('plan_wait_ms', 0.0):.2f} | {r['measured_ms']:.1f} | "
              f"{100 * share:.1f} % | {r.get('plan_why', '')} | {bgs} | "
              f"{r.get('plan_next_ms', 0.0):.2f} ({r.get('plan_next_cpu_ms', 0.0):.2f}) | "
              f"{r.get('plan_reason', '')[:60]} |")
    out = {"max": max(shares), "over_5pct": sum(s > 0.05 for s in shares), "requests": len(shares)}
    print(f"max plan share {100 * out['max']:.1f} %, {out['over_5pct']} of {len(shares)} requests over 5 %")
    whys = [searched(r.get("plan_why", "")) for r in d["requests"]]
    out.update(searches=sum(bool(w) for w in whys), scale_replans=sum(w.startswith("scale") for w in whys),
               transport_replans=sum("transport_ms" in w for w in whys),
               bg_taken=sum(r.get("plan_bg", "") == "taken" for r in d["requests"]),
               bg_stale=sum(r.get("plan_bg", "").startswith("stale") for r in d["requests"]),
               plan_bg_cpu_ms_total=sum(r.get("plan_bg_cpu_ms", 0.0) for r in d["requests"]),
               measured_ms_total=sum(r["measured_ms"] for r in d["requests"]),
               measured_ms_after_first=sum(r["measured_ms"] for r in d["requests"][1:]))
    print(f"decisions made in full {out['searches']} (scale {out['scale_replans']}, of them transport "
          f"{out['transport_replans']}); background decisions taken {out['bg_taken']}, stale {out['bg_stale']} "
          f"({out['plan_bg_cpu_ms_total']:.1f} ms CPU on the worker)")
    # wherever it ran: the request's own decision plus the one made for it after the previous request (outside
    # every request's ``measured_ms``, inside the caller's time between two results)
    rs, prev, wide = d["requests"], 0.0, []
    for r in rs:
        wide.append((r["plan_ms"] + prev) / r["measured_ms"] if r["measured_ms"] > 0 else 0.0)
        prev = r.get("plan_next_ms", 0.0)
    out.update(with_previous_max=max(wide), with_previous_over_5pct=sum(s > 0.05 for s in wide),
               plan_ms_total=sum(r["plan_ms"] + r.get("plan_next_ms", 0.0) for r in rs),
               plan_cpu_ms_total=sum(r.get("plan_cpu_ms", 0.0) + r.get("plan_next_cpu_ms", 0.0) for r in rs))
    print(f"with the decision made after the previous request: max {100 * out['with_previous_max']:.1f} %, "
          f"{out['with_previous_over_5pct']} over 5 %; all decisions {out['plan_ms_total']:.1f} ms wall, "
          f"{out['plan_cpu_ms_total']:.1f} ms CPU")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose code runs (default: this one)")
    ap.add_argument("--cpus", type=float, default=0.1, help="the UE's CPU quota in cores (default 0.1)")
    ap.add_argument("--model", default="torchvision:googlenet")
    ap.add_argument("--policy", default="auto")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/coinfer-bench-plan-ms"),
                    help="COINFER_CACHE_DIR of the UE (one profile for both checkouts)")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--label", default="", help="a label kept in the report's plan_share (e.g. before / after)")
    ap.add_argument("--show", action="store_true", help="only print the table of the report at --json")
    args = ap.parse_args(argv)
    if args.show:
        summary(json.loads(args.json.read_text()))
        return 0
    root = args.root.resolve()
    args.json = args.json.resolve()  # the UE runs in ``root``: a relative path would land in that checkout
    env = dict(os.environ, PYTHONPATH=str(root), COINFER_CACHE_DIR=str(args.cache))
    with edge_server(root) as port, CpuCgroup(f"coinfer-plan-ms-{os.getpid()}", args.cpus) as cg:
        t0 = time.time()
        p = cg.popen([sys.executable, "-m", "ue_client.cli", "run", "--server", f"127.0.0.1:{port}", "--model",
                      args.model, "--policy", args.policy, "--requests", str(args.requests), "--json",
                      str(args.json), *extra], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True)
        out, _ = p.communicate(timeout=args.timeout_s)
        wall = time.time() - t0
        throttle = cg.throttle_stats()
    if p.returncode != 0:
        print(out[-4000:])
        print(f"coinfer-ue run exited {p.returncode}")
        return 1
    d = json.loads(args.json.read_text())
    print(f"{args.model} {args.policy} on {args.cpus:g} cores, code from {root} ({wall:.0f} s)")
    d["plan_share"] = {**summary(d), "cpus": args.cpus, "root": str(root), "wall_s": wall, "throttle": throttle,
                       "label": args.label, "ue_args": extra,
                       "commit": subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip()}
    args.json.write_text(json.dumps(d, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
