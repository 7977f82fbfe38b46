"""Replay of a full grid's warm scenario through the transport residual rule (session 13, warmacc).

Reads ``logs/ue*.json`` of a ``coinfer-testbed bench`` run and prints, for coinfer's warm requests (the bench's
planner-accuracy statistic: median |pred / meas - 1|, ``testbed.bench.report``):
- the recorded predictions (what the run reported);
- each request's prediction with its transport residual replaced by the mean of the residuals measured before it,
  under ``MIN`` samples (1 or 2) and the residuals kept per client (as the clients did: each round a new client,
  empty), per policy of this UE process, or per UE process and server (all clients of the cell: what
  ``ue_client.calibration.TransportMemory`` keeps, key = server, model, planning link);
- the errors by position in a round, and the parts of the recorded error (server compute, the server's time around
  it, the UE's side of the transport, the call's time outside the client's own measured window).
A residual is computed as ``ue_client.request.transport_residual`` does (requests that defined a slice or
uploaded weights teach none). Usage: ``python replay.py docs/results/full/session12 [--json OUT]``.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics as st
from collections import defaultdict


def residual(r: dict) -> float | None:
    pp, t = r.get("predicted_parts") or {}, r.get("server_timings")
    if not t or not pp or r.get("new_slice") or r.get("uploaded_bytes") or r.get("fallback"):
        return None
    own = r["ue_ops"] > 0
    m = r["measured_ms"] + pp.get("setup_ms", 0.0) - ((r.get("ue_compute_ms") or 0.0) if own else 0.0) \
        - t["compute_ms"] - t["queue_ms"]
    p = r["predicted_ms"] - pp.get("transport_ms", 0.0) - ((pp.get("ue_ms") or 0.0) if own else 0.0) - pp["server_ms"]
    return max(-1000.0, min(1000.0, m - p))


def cells(run: str):
    for f in sorted(glob.glob(f"{run}/logs/ue*.json")):
        if f.endswith("spec.json"):
            continue
        with open(f) as fh:
            d = json.load(fh)
        if d.get("warm"):
            yield d


def replay(run: str, scope: str, min_n: int) -> list[float]:
    errs = []
    for d in cells(run):
        seq = []
        for pol, w in d["warm"].items():
            if pol == "local":
                continue
            seq += [(r["t_wall"], pol, r, False) for r in w["requests"]]
            seq += [(r["t_wall"], pol, r, True) for r in w["warmups"]]
        seq.sort(key=lambda x: x[0])
        store: dict = defaultdict(list)
        for _, pol, r, warmup in seq:
            key = {"client": pol, "policy": pol, "process": "all"}[scope]
            if scope == "client" and warmup:
                store[key] = []  # a new client: its warm-up opens it
            if not warmup and pol == "coinfer":
                xs = store[key][-32:]
                tr = st.fmean(xs) if len(xs) >= min_n else 0.0
                pp = r.get("predicted_parts")
                pred = r["predicted_ms"]
                if pp and r["server_ops"]:
                    pred += tr - pp.get("transport_ms", 0.0)
                errs.append(pred / r["latency_ms"] - 1)
            x = residual(r)
            if x is not None:
                store[key].append(x)
    return errs


def summary(errs: list[float]) -> dict:
    return {"n": len(errs), "median_abs": round(st.median(abs(e) for e in errs), 4),
            "median_signed": round(st.median(errs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--json")
    a = ap.parse_args()
    out: dict = {"run": a.run}
    rec = [r["predicted_ms"] / r["latency_ms"] - 1 for d in cells(a.run) for r in d["warm"]["coinfer"]["requests"]]
    out["recorded"] = summary(rec)
    pos: dict = defaultdict(list)
    parts: dict = defaultdict(list)
    for d in cells(a.run):
        for r in d["warm"]["coinfer"]["requests"]:
            e = r["predicted_ms"] / r["latency_ms"] - 1
            pos[r["i"] % 3].append(e)
            pp, t, lat = r.get("predicted_parts"), r.get("server_timings"), r["latency_ms"]
            if pp and t and r["server_ops"] and not r["ue_ops"]:
                busy = t["compute_ms"] + t["queue_ms"]
                parts["server compute + queue (pred - meas)"].append((pp["server_ms"] - busy) / lat)
                parts["server time around compute (- meas)"].append(-(t["total_ms"] - busy) / lat)
                parts["call outside the client's measured window (- meas)"].append(-(lat - r["measured_ms"]) / lat)
                parts["transport: link model + residual added - UE-side meas"].append(
                    (r["predicted_ms"] - pp["server_ms"] - pp.get("setup_ms", 0.0)
                     - (r["measured_ms"] - t["total_ms"])) / lat)
    out["recorded_by_position_in_round"] = {str(k): summary(v) for k, v in sorted(pos.items())}
    out["recorded_parts_offload_all_median_fraction_of_latency"] = {k: round(st.median(v), 4) for k, v in parts.items()}
    out["replay"] = {f"{scope}, residual from {n} sample(s)": summary(replay(a.run, scope, n))
                     for n in (1, 2) for scope in ("client", "policy", "process")}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
