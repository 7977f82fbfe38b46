"""Score the call's prediction two ways on the same requests: session 19's (``predicted_ms``: the earlier calls'
mean time before the run, per kind of call, + the plan's prediction of its run + the earlier calls' mean time
after it) and session 18's formula (the call's own measured ``call_before_ms`` + ``run_predicted_ms`` +
``call_after_ms``), against the call's latency; median |pred / lat - 1| of coinfer's requests as the bench's
accuracy table counts them (stream: every request of the stream; warm: the warm scenario's recorded ones), per
run and pooled. Also the plan's own prediction of its run against ``measured_ms``.

With ``--replay18 DIR`` (session 18's ``cell/after*`` runs), the same two scores for its logs with the forecast
recomputed offline: each request's time before its run forecast by the mean of the earlier ones of its kind in
the UE process (kind 'first' for a client's first request: the stream's first and the warm clients' unrecorded
warm-ups; 'plan' for the others, as the runtime now keeps them; the light kinds' mean where a kind has none yet;
all of them, not the last 32).

OUTDIR holds run1, run2, ... (run_cell.sh) or runA1, runB1, ... (ab_cell.sh: pooled per side).
Usage: python summary.py OUTDIR [OUTDIR ...] [--replay18 DIR ...] [--json PATH]"""

import argparse
import glob
import json
import os
import statistics as st
from collections import defaultdict


def _err(p, m):
    return None if p is None or not m else abs(p / m - 1)


def _signed(p, m):
    return None if p is None or not m else p / m - 1


def _old(r):
    """Session 18's formula for this request (None where a term is missing)."""
    b, p, a = r.get("call_before_ms"), r.get("run_predicted_ms"), r.get("call_after_ms")
    return None if b is None or p is None or a is None else b + p + a


def _sets(j):
    stream = j["streams"]["coinfer"]["requests"]
    warm = j["warm"]["coinfer"]["requests"]
    return {"stream": stream, "warm": warm}


def _replayed(j):
    """Session 18's rows with ``predicted_ms`` recomputed: the forecast of the time before the run replaces the
    measured one (stream first, then the warm scenario with its clients' unrecorded warm-ups in time order, one
    UE process; see the module docstring)."""
    kept = defaultdict(list)
    out = {}
    stream = [(r, "first" if k == 0 else "plan", True) for k, r in enumerate(j["streams"]["coinfer"]["requests"])]
    w = j["warm"]["coinfer"]
    warm = sorted([(r, "plan", True) for r in w["requests"]] + [(r, "first", False) for r in w.get("warmups", [])],
                  key=lambda x: x[0]["t_wall"])
    for name, rows in (("stream", stream), ("warm", warm)):
        new = []
        for r, mode, recorded in rows:
            xs = kept[mode] or [x for m in ("first", "plan") for x in kept[m]]
            fc = st.fmean(xs) if xs else 0.0
            r2 = dict(r)
            if r.get("call_before_ms") is not None and r.get("run_predicted_ms") is not None:
                r2["predicted_ms"] = fc + r["run_predicted_ms"] + r["call_after_ms"]
                kept[mode].append(r["call_before_ms"])
            if recorded:
                new.append(r2)
        out[name] = new
    return out


def score(rows):
    e_new = [e for e in (_err(r.get("predicted_ms"), r.get("latency_ms")) for r in rows) if e is not None]
    s_new = [e for e in (_signed(r.get("predicted_ms"), r.get("latency_ms")) for r in rows) if e is not None]
    e_old = [e for e in (_err(_old(r), r.get("latency_ms")) for r in rows) if e is not None]
    s_old = [e for e in (_signed(_old(r), r.get("latency_ms")) for r in rows) if e is not None]
    e_run = [e for e in (_err(r.get("run_predicted_ms"), r.get("measured_ms")) for r in rows) if e is not None]
    return {"forecast": e_new, "forecast_signed": s_new, "measured_before (s18)": e_old,
            "measured_before_signed": s_old, "run vs measured": e_run}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="*")
    ap.add_argument("--replay18", nargs="*", default=[])
    ap.add_argument("--json")
    a = ap.parse_args()
    result = {}
    groups = []
    for d in a.out:  # runs named run1, run2, ... or runA1, runB1, ... (ab_cell.sh): one group per side
        sides = defaultdict(list)
        for r in sorted(glob.glob(os.path.join(d, "run*"))):
            sides[os.path.basename(r).rstrip("0123456789")].append(r)
        groups += [(f"{d} {side}" if len(sides) > 1 else d, runs, False) for side, runs in sorted(sides.items())]
    groups += [(d, sorted(glob.glob(os.path.join(d, "after*"))), True) for d in a.replay18]
    for label, dirs, replay in groups:
        pooled = defaultdict(lambda: defaultdict(list))
        runs = {}
        for d in dirs:
            with open(os.path.join(d, "logs", "ue0.json")) as f:
                j = json.load(f)
            sets = _replayed(j) if replay else _sets(j)
            got = {}
            for k, rows in sets.items():
                sc = score(rows)
                for kind, xs in sc.items():
                    pooled[k][kind] += xs
                got[k] = {kind: (len(xs), st.median(xs) if xs else None) for kind, xs in sc.items()}
            runs[os.path.basename(d)] = got
            print(label, os.path.basename(d), "  ".join(
                f"{k}: forecast {100 * g['forecast'][1]:.1f}% / s18 {100 * g['measured_before (s18)'][1]:.1f}%"
                f" ({g['forecast'][0]})" for k, g in got.items() if g["forecast"][1] is not None))
        pool = {k: {kind: (len(xs), st.median(xs) if xs else None) for kind, xs in d.items()}
                for k, d in pooled.items()}
        for k, d in pool.items():
            print(label, "pooled", k, "  ".join(f"{kind}: {100 * m:+.1f}% ({n})" if "signed" in kind else
                                                f"{kind}: {100 * m:.1f}% ({n})" for kind, (n, m) in d.items()
                                                if m is not None))
        result[label] = {"runs": runs, "pooled": pool, "replayed": replay}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
