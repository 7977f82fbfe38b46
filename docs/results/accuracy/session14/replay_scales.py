"""Replay of a grid's warm rows: does a new client's reset server cost scale mispredict its first requests?

The testbed's warm scenario opens a client per round (3 requests each); ``CostModel.scale`` starts at 1.0 in
every client while the transport residual outlives it (``calibration.TransportMemory``). For every client
whose requests all ran one split remotely, this replays the server's scale from the recorded rows
(``calibrate_server``: s <- 0.7 s + 0.3 x measured / (base / share), the client's base / share being its first
request's recorded server part at s = 1.0) and checks it against each recorded server part; then replays it
kept across the clients of one UE process in time order (one key per UE file: server, model, link) and
recomputes each prediction with that server part. Usage:
    python docs/results/accuracy/session14/replay_scales.py [LOGS_DIR] [--json PATH]
(no runs; reads ``ue*.json``; default LOGS_DIR docs/results/full/session13/logs)."""

import argparse
import glob
import json
import statistics as st
from collections import defaultdict


def replay(logs: str) -> dict:
    err = defaultdict(lambda: ([], []))
    skipped = defaultdict(int)
    mismatch = checked = 0
    for f in sorted(glob.glob(logs + "/ue*.json")):
        with open(f) as fh:
            j = json.load(fh)
        clients = defaultdict(list)
        for pol, v in (j.get("warm") or {}).items():
            for r in v["requests"]:
                clients[(pol, r["round"])].append(r)
        for rs in clients.values():
            rs.sort(key=lambda r: r["t_wall"])
        s_kept = None
        for key in sorted(clients, key=lambda k: clients[k][0]["t_wall"]):
            rs = clients[key]
            first = rs[0]
            if not all(r["server_ops"] > 0 and not r["fallback"] and r["server_timings"] and r["predicted_parts"]
                       and r["server_ops"] == first["server_ops"] for r in rs):
                skipped[key[0]] += 1
                continue
            base = first["predicted_parts"]["server_ms"]
            s_act, s_cf = 1.0, (1.0 if s_kept is None else s_kept)
            for pos, r in enumerate(rs):
                srv = r["predicted_parts"]["server_ms"]
                checked += 1
                mismatch += abs(srv - base * s_act) > 0.5
                kept = r["predicted_ms"] - srv + base * s_cf
                lat = r["latency_ms"]
                e0, e1 = abs(r["predicted_ms"] - lat) / lat, abs(kept - lat) / lat
                for k in ((key[0], pos), ("all", pos), ("all", "any")):
                    err[k][0].append(e0)
                    err[k][1].append(e1)
                ratio = (r["server_timings"]["compute_ms"] + r["server_timings"]["queue_ms"]) / base
                s_act = 0.7 * s_act + 0.3 * ratio
                s_cf = 0.7 * s_cf + 0.3 * ratio
            s_kept = s_cf
    rows = [{"policy": k[0], "position": k[1], "n": len(a), "median_err_reset": st.median(a),
             "median_err_kept": st.median(b), "mean_err_reset": st.mean(a), "mean_err_kept": st.mean(b)}
            for k, (a, b) in sorted(err.items(), key=lambda kv: str(kv[0]))]
    return {"logs": logs, "rows": rows, "server_parts_checked": checked, "server_parts_mismatched": mismatch,
            "clients_skipped": dict(skipped)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="?", default="docs/results/full/session13/logs")
    ap.add_argument("--json")
    a = ap.parse_args()
    out = replay(a.logs)
    print(f"server parts replayed: {out['server_parts_checked']}, off by > 0.5 ms: {out['server_parts_mismatched']}")
    print("median (mean) |pred - meas| / meas, remote warm rows, by position in a client: reset -> kept")
    for r in out["rows"]:
        print(f"{r['policy']:13s} {r['position']!s:4s} n={r['n']:3d}  {100 * r['median_err_reset']:5.1f}% -> "
              f"{100 * r['median_err_kept']:5.1f}%   ({100 * r['mean_err_reset']:5.1f}% -> "
              f"{100 * r['mean_err_kept']:5.1f}%)")
    print("clients skipped (not every request remote on one split):", out["clients_skipped"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
