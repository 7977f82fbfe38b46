"""Side-by-side table of ``ab_request_plan.sh``'s runs: per model, policy and decision path, ``plan_cpu_ms`` median
(n) before / after, at a full core and under the 0.1-core quota (with the quota, only the ``plan`` windows: the
decision first; the ``noop`` / ``spin`` probe requests decide after their probe window).

    python docs/results/plan_ms/session21/summarize_rp.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[3] / "bench"))
from bench_request_plan import path_of  # noqa: E402


def paths(f: Path) -> dict:
    out: dict = {}
    if not f.exists():
        return out
    for res in json.loads(f.read_text())["results"]:
        for r in res["requests"]:
            out.setdefault((res["model"], res["policy"], path_of(r["plan_why"])), []).append(r["plan_cpu_ms"])
    return out


def main() -> None:
    for cpus in ("full", "0.1"):
        b, a = paths(HERE / f"rp_{cpus}_before.json"), paths(HERE / f"rp_{cpus}_after.json")
        if not b and not a:
            continue
        print(f"\n### {'a full core' if cpus == 'full' else 'a 0.1-core quota'}\n")
        print("| model | policy | path | before: plan_cpu_ms median (n) | after |")
        print("|---|---|---|---|---|")
        for k in sorted(set(b) | set(a)):
            cells = [f"{statistics.median(x[k]):.3f} ({len(x[k])})" if k in x else "-" for x in (b, a)]
            print(f"| {k[0]} | {k[1]} | {k[2]} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
