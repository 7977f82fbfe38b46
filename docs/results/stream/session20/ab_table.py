"""The A/B table of session 20's stream runs: per run and cell, coinfer / best baseline and bound / best
(``testbed.bench.report``'s own rules: ``_goal``, ``cell_bound``), coinfer's first request and the mean of its
requests after its last upload, beside the best baseline's.

Usage: ``PYTHONPATH=. python docs/results/stream/session20/ab_table.py RUN_DIR [RUN_DIR ...]`` (markdown)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from testbed.bench.report import _cells, _goal, _warm_after_upload, best_baseline, cell_bound


def rows(run: Path) -> list[str]:
    out = []
    cells = _cells(json.loads((run / "results.json").read_text()), "stream")
    for key in sorted(cells):
        c = cells[key]
        co = c.get("coinfer") or {}
        bb = best_baseline(c)
        if not co.get("latency_ms") or bb is None:
            continue
        g = _goal(c)
        b = cell_bound(c)
        best = c[bb.policy]
        warm = _warm_after_upload(co)
        model, cpu, up = key
        bound = "n/a" if b is None else f"{b['mean_ms'] / best['mean_ms']:.2f}"
        out.append(f"| {run.name} | {model} {cpu * 100:g} % / {up:g} | {co['mean_ms']:.1f} | {bb.policy} "
                   f"{best['mean_ms']:.1f} | **{co['mean_ms'] / best['mean_ms']:.2f}** | "
                   f"{bound} | "
                   f"{'yes' if g is not None else 'no (local best)'} | {co['latency_ms'][0]:.0f} | "
                   f"{statistics.fmean(warm) if warm else float('nan'):.0f} | "
                   f"{c.get('local', {}).get('mean_ms', float('nan')):.0f} |")
    return out


def main(argv: list[str]) -> int:
    print("| run | cell | coinfer mean | best baseline mean | coinfer / best | bound / best | a remote baseline "
          "beats local | coinfer #1 | coinfer after its upload | local |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for a in argv[1:]:
        print("\n".join(rows(Path(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
