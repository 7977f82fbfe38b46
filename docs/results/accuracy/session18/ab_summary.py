"""Pool ``ab_cell.sh``'s runs per side: median |pred / lat - 1| of coinfer's requests as the bench's accuracy table
counts them (stream: every request of the stream; warm: the warm scenario's recorded ones), and of the stream's
warm requests alone (remote, nothing uploaded), per run and pooled. For the runs after the change, also the plan's
own prediction of its run against the run's measured time (``run_predicted_ms`` vs ``measured_ms``).
Usage: python ab_summary.py OUTDIR [--json PATH]   (OUTDIR holds before1, after1, before2, ...)"""

import argparse
import glob
import json
import os
import statistics as st
from collections import defaultdict


def _errs(rows, pred="predicted_ms", meas="latency_ms"):
    return [abs(r[pred] / r[meas] - 1) for r in rows if r.get(pred) is not None and r.get(meas)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--json")
    a = ap.parse_args()
    pooled = defaultdict(lambda: defaultdict(list))
    runs = {}
    for d in sorted(glob.glob(os.path.join(a.out, "*[0-9]"))):
        name = os.path.basename(d)
        side = name.rstrip("0123456789")
        with open(os.path.join(d, "logs", "ue0.json")) as f:
            j = json.load(f)
        stream = j["streams"]["coinfer"]["requests"]
        warm = j["warm"]["coinfer"]["requests"]
        sets = {"stream": stream, "warm": warm,
                "stream, warm requests": [r for r in stream if r["server_ops"] and not r["uploaded_bytes"]]}
        got = {}
        for k, rows in sets.items():
            e = _errs(rows)
            pooled[side][k] += e
            got[k] = (len(e), st.median(e) if e else None)
            if side == "after":
                e2 = _errs(rows, "run_predicted_ms", "measured_ms")
                pooled[side][k + " (run vs measured)"] += e2
                got[k + " (run vs measured)"] = (len(e2), st.median(e2) if e2 else None)
        runs[name] = got
        print(name, "  ".join(f"{k}: {100 * m:.0f}% ({n})" for k, (n, m) in got.items() if m is not None))
    out = {"runs": runs,
           "pooled": {s: {k: (len(v), st.median(v)) for k, v in d.items() if v} for s, d in pooled.items()}}
    for s, d in out["pooled"].items():
        print("pooled", s, "  ".join(f"{k}: {100 * m:.1f}% ({n})" for k, (n, m) in d.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
