"""Session 20's backlog A/B: per run and cell, coinfer's first remote request after a local prefetch (its plan's
prediction of its run, ``run_predicted_ms``, against ``measured_ms``; the uplink backlog the plan counted and
what it added, ``uplink_backlog_ms`` / ``uplink_backlog_added_ms``, absent before the change; the MB it
uploaded; the server's weight wait), and coinfer / best baseline per cell (``ab_table.rows``).

Usage: ``PYTHONPATH=. python docs/results/stream/session20/backlog/backlog_table.py RUN_DIR [RUN_DIR ...]``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("reconstruct", HERE.parent / "reconstruct.py")
reconstruct = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reconstruct)
_spec = importlib.util.spec_from_file_location("ab_table", HERE.parent / "ab_table.py")
ab_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_table)


def _f(x, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def first_after_prefetch(run: Path) -> list[str]:
    out = []
    for (model, cpu, up), d in sorted(reconstruct._stream_logs(run).items()):
        reqs = d["streams"]["coinfer"]["requests"]
        seen_prefetch = False
        for r in reqs:
            if (r.get("plan_reason") or "").startswith("prefetch"):
                seen_prefetch = True
                continue
            if r.get("server_ops") and seen_prefetch:
                st = r.get("server_timings") or {}
                pred, meas = r.get("run_predicted_ms"), r.get("measured_ms")
                out.append(f"| {run.name} | {model} {cpu * 100:g} % / {up:g} | #{r['i']} | {_f(pred)} | {_f(meas)} | "
                           f"{_f(None if pred is None or meas is None else meas - pred, '+.0f')} | "
                           f"{_f(r.get('uplink_backlog_ms'))} | {_f(r.get('uplink_backlog_added_ms'))} | "
                           f"{(r.get('uploaded_bytes') or 0) / 1e6:.1f} | {_f(st.get('weight_wait_ms'))} |")
                break
        else:
            out.append(f"| {run.name} | {model} {cpu * 100:g} % / {up:g} | no prefetch then remote "
                       f"({'prefetch' if seen_prefetch else 'no prefetch'}) | | | | | | | |")
    return out


def main(argv: list[str]) -> None:
    runs = [Path(a) for a in argv]
    print("| run | cell | request | run predicted | measured | measured - predicted | backlog ms | added ms | "
          "MB up | server weight wait |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print("\n".join(first_after_prefetch(r)))
    print()
    print("| run | cell | coinfer mean | best baseline mean | coinfer / best | bound / best | a remote baseline beats "
          "local | coinfer #1 | coinfer after its upload | local |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print("\n".join(ab_table.rows(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
