"""Before / after on the real client's recorded ``planning.choose`` calls (``capture.py`` -> ``calls.pkl``):
``replay.py`` in fresh processes, the two checkouts alternating (which goes first alternates too), ROUNDS
processes per side; per call the first pass's thread CPU (a fresh process, 64 MB written before each call) and
whether every answer equals the recorded one. Prints a table (median [min-max] per side, the paired difference).

    python ab_replay.py BEFORE_ROOT AFTER_ROOT [ROUNDS] [CALLS.pkl]
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    roots = {"before": sys.argv[1], "after": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    calls = sys.argv[4] if len(sys.argv) > 4 else str(HERE / "calls.pkl")
    got: dict = {s: {} for s in roots}
    meta: dict = {}
    same = {s: True for s in roots}
    loads = []
    for r in range(rounds):
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            out = subprocess.run(
                [sys.executable, str(HERE / "replay.py"), calls],
                cwd="/tmp",
                env=dict(os.environ, PYTHONPATH=roots[side]),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            line = next(ln for ln in out.splitlines() if ln.startswith("REPLAY "))
            for row in json.loads(line[len("REPLAY ") :]):
                got[side].setdefault(row["i"], []).append(row["cpu_ms"])
                meta[row["i"]] = (row["model"], row["policy"])
                same[side] &= row["same"]
        loads.append(os.getloadavg()[0])
    print(
        f"{rounds} processes per side, load {min(loads):.1f}-{max(loads):.1f}; every answer as recorded: "
        f"before {same['before']}, after {same['after']}"
    )
    print(
        "| call | model | policy | before median [min-max] | after median [min-max] | paired after - before"
        " | after lower |"
    )
    print("|---|---|---|---|---|---|---|")
    for i in sorted(meta):
        b, a = got["before"][i], got["after"][i]
        d = [y - x for x, y in zip(b, a, strict=True)]
        print(
            f"| {i} | {meta[i][0]} | {meta[i][1]} | {statistics.median(b):.3f} [{min(b):.3f}-{max(b):.3f}] | "
            f"{statistics.median(a):.3f} [{min(a):.3f}-{max(a):.3f}] | {statistics.median(d):+.3f} | "
            f"{sum(x < 0 for x in d)} of {len(d)} |"
        )


if __name__ == "__main__":
    main()
