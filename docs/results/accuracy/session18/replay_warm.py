"""Replay of a grid's logs: where coinfer's warm predictions miss, and what session 18's rules change.

For every UE process (``logs/ueN.json``) this walks coinfer's requests in time order (its stream, then the warm
scenario's clients: their warm-up requests and the recorded ones), replays the cost model's learned state from
the recorded measurements, and recomputes every prediction under two sets of rules:

- ``old`` (session 17's runtime): the server's cost scale learns compute + queue (``ServerTimings``), the
  transport residual learns the rest of measured + set-up beyond the link model, and the prediction ends
  where the client's ``measured_ms`` ends (the call's binding, planning and report work around it is in no
  term);
- ``new`` (session 18's): the server's scale learns the server's whole time for the request (its total
  less its waits for cut tensors and weights: ``calibration.server_busy_ms``; the executor's work between
  ops was in the residual, 8-34 ms a request on session 17's machine, and the residual was 0 on the first
  two warm requests), so the residual is the UE's and the link's part alone; and the call's prediction
  counts the time the call spent before its run (planning included; here ``plan_ms``, known when the
  prediction is made) and the mean of the earlier calls' time after it (here lat - measured - set-up -
  plan of the earlier requests, calls that connected or defined a slice left out).

Each request's prediction is split into its parts (the link model's part is recovered from the recorded
prediction: predicted - server part - residual - UE part); the ``old`` rules must give back the recorded
prediction (the script counts those that do not, within 1 ms). Errors: |pred / lat - 1| against the call's
latency as the testbed records it (``latency_ms``), for the warm requests (remote, no upload, no slice
defined, no fallback): the stream's requests 2-8 and the warm scenario's recorded ones.

Usage (no runs; reads the logs):
    python docs/results/accuracy/session18/replay_warm.py [LOGS_DIR ...] [--json PATH]
"""

import argparse
import glob
import json
import statistics as st
from collections import defaultdict

WINDOW = 32
CLIPS = (1.5, 2.0)
"""Variants: the server scale's EWMA with each request's ratio clipped to within this factor of the scale."""
MIN_TRANSPORT = 2


def _busy(t: dict) -> float:
    return t["total_ms"] - t.get("input_wait_ms", 0.0) - t.get("weight_wait_ms", 0.0)


class State:
    """One rule set's learned state for one memory key (server, model, link) of one process."""

    def __init__(self, new: bool):
        self.new = new
        self.scale = None  # the server scale kept (None: a new client starts at 1.0)
        self.res: list[float] = []
        self.after: list[float] = []


def _requests(j: dict) -> list[tuple[str, int, dict]]:
    """(scenario, client number, request) of coinfer's requests in time order."""
    out = []
    v = (j.get("streams") or {}).get("coinfer")
    if v:
        out += [("stream", 0, r) for r in v["requests"]]
    w = (j.get("warm") or {}).get("coinfer")
    if w:
        rounds = {r["round"]: k + 1 for k, r in enumerate(w.get("rounds") or [])}
        wu = sorted(w.get("warmups") or [], key=lambda r: r["t_wall"])
        for k, r in enumerate(wu):
            out.append(("warmup", k + 1, r))
        for r in w["requests"]:
            out.append(("warm", rounds.get(r.get("round"), 0) or (r.get("round", 0) + 1), r))
    return sorted(out, key=lambda x: x[2]["t_wall"])


def replay(logs: list[str]) -> dict:
    rows = []
    mism = checked = smism = 0
    for d in logs:
        for f in sorted(glob.glob(d + "/ue*.json")):
            if f.endswith(".spec.json"):
                continue
            with open(f) as fh:
                j = json.load(fh)
            spec = j.get("spec") or {}
            model = str(spec.get("model", "?")).split(":")[-1]
            cell = f"{model} {spec.get('cpu')}/{spec.get('uplink_mbps')}"
            st_old, st_new = State(False), State(True)
            clip_kept: dict = {}
            clients: dict = {}
            for scen, client, r in _requests(j):
                pp, t = r.get("predicted_parts"), r.get("server_timings")
                if not r.get("server_ops") or r.get("fallback") or not pp or not t or r.get("predicted_ms") is None:
                    continue
                key = (scen if scen == "stream" else "warm", client)
                first = key not in clients
                if first:  # a new client: the server scale from the memory (1.0 before any), residuals kept
                    clients[key] = {"old": st_old.scale or 1.0, "new": st_new.scale or 1.0, "base": None,
                                    **{f"clip{f}": clip_kept.get(f) or 1.0 for f in CLIPS}}
                c = clients[key]
                s_rec = c["old"]
                base = pp["server_ms"] / s_rec  # base / share of this split (the recorded part at the old scale)
                if c["base"] is None:
                    c["base"] = base
                smism += abs(base - c["base"]) > 0.01 * c["base"]  # the replayed old scale is not the runtime's
                checked += 1
                resid_old = statistics_mean(st_old.res) if len(st_old.res) >= MIN_TRANSPORT else 0.0
                mism += abs(resid_old - pp.get("transport_ms", 0.0)) > 1.0
                link = r["predicted_ms"] - pp["server_ms"] - pp.get("transport_ms", 0.0) - pp.get("ue_ms", 0.0)
                own = pp.get("ue_ms", 0.0) > 0 and r.get("ue_ops", 0) > 0
                lat, meas, setup = r["latency_ms"], r["measured_ms"], pp.get("setup_ms", 0.0)
                plan = r.get("plan_ms", 0.0)
                warm = not r.get("uploaded_bytes") and not r.get("new_slice")
                srv_new = base * c["new"]
                resid_new = statistics_mean(st_new.res) if len(st_new.res) >= MIN_TRANSPORT else 0.0
                after = statistics_mean(st_new.after) if st_new.after else 0.0
                pred_old = r["predicted_ms"]
                pred_new = link + pp.get("ue_ms", 0.0) + srv_new + resid_new + plan + after
                pred_new_srv = link + pp.get("ue_ms", 0.0) + srv_new + resid_new  # without the call's terms
                pred_old_call = pred_old + plan + after  # the call's terms alone
                resid_min1 = statistics_mean(st_old.res) if st_old.res else 0.0  # one residual is enough
                pred_call_min1 = pred_old - pp.get("transport_ms", 0.0) + resid_min1 + plan + after
                pred_clip = {f: pred_old - pp["server_ms"] + base * c[f"clip{f}"] + plan + after for f in CLIPS}
                m_side = meas + setup - (r.get("ue_compute_ms", 0.0) if own else 0.0)
                row = {"file": f, "cell": cell, "model": model, "scenario": scen, "client": client, "i": r.get("i"),
                       "warm": warm, "lat": lat, "pred_old": pred_old, "pred_new": pred_new,
                       "pred_new_server_only": pred_new_srv, "pred_old_call_only": pred_old_call,
                       "pred_call_min1": pred_call_min1, **{f"pred_clip{f}": v for f, v in pred_clip.items()},
                       "parts": {"link": link, "server_pred_old": pp["server_ms"], "server_pred_new": srv_new,
                                 "server_meas_old": t["compute_ms"] + t["queue_ms"], "server_meas_new": _busy(t),
                                 "resid_old": resid_old, "resid_new": resid_new,
                                 "resid_meas_old": m_side - (t["compute_ms"] + t["queue_ms"]) - link,
                                 "resid_meas_new": m_side - _busy(t) - link,
                                 # outside: the rest of the call (lat - measured - set-up - planning)
                                 "plan": plan, "after_pred": after, "outside": lat - meas - setup - plan}}
                rows.append(row)
                # learn (the runtime's order: the residual against the server part before the scale moves)
                if warm:
                    st_old.res = [*st_old.res, m_side - (t["compute_ms"] + t["queue_ms"]) - link][-WINDOW:]
                    st_new.res = [*st_new.res, m_side - _busy(t) - link][-WINDOW:]
                if scen != "warmup" and not r.get("new_slice"):  # a warm-up connected inside its call
                    st_new.after = [*st_new.after, lat - meas - setup - plan][-WINDOW:]
                for name, meas_s in (("old", t["compute_ms"] + t["queue_ms"]), ("new", _busy(t))):
                    ratio = min(4.0, max(0.25, meas_s / base))  # (share 1: one UE per cell)
                    c[name] = 0.7 * c[name] + 0.3 * ratio
                for f in CLIPS:  # one request's ratio clipped to [scale / f, scale x f] before the EWMA
                    k = f"clip{f}"
                    ratio = min(4.0, max(0.25, (t["compute_ms"] + t["queue_ms"]) / base))
                    ratio = min(c[k] * f, max(c[k] / f, ratio))
                    c[k] = clip_kept[f] = 0.7 * c[k] + 0.3 * ratio
                st_old.scale, st_new.scale = c["old"], c["new"]
    return {"rows": rows, "checked": checked, "residual_mismatch": mism, "server_mismatch": smism}


def statistics_mean(xs):
    return sum(xs) / len(xs)


def summary(rows: list[dict]) -> list[dict]:
    """Median |pred / lat - 1| (and signed) of the warm requests per (model, scenario) under each rule set:
    ``old`` (as recorded), ``server`` (the server term alone), ``call`` (the call's terms alone), ``new`` (both);
    the stream's requests also by position (2-3: the first two warm ones after the cold request; 4-8)."""
    groups = defaultdict(list)
    for r in rows:
        if not r["warm"] or r["scenario"] == "warmup":
            continue
        keys = [("all", r["scenario"]), (r["model"], r["scenario"]), ("all", "any")]
        if r["scenario"] == "stream":
            keys.append(("all", "stream, requests 2-3" if r["i"] in (1, 2) else "stream, requests 4-8"))
        for k in keys:
            groups[k].append(r)
    out = []
    variants = {"old": "pred_old", "server": "pred_new_server_only", "call": "pred_old_call_only", "new": "pred_new",
                "call_min1": "pred_call_min1", **{f"clip{f}": f"pred_clip{f}" for f in CLIPS}}
    for (model, scen), rs in sorted(groups.items()):
        row = {"model": model, "scenario": scen, "n": len(rs)}
        for v, key in variants.items():
            row[v] = st.median(abs(x[key] / x["lat"] - 1) for x in rs)
            row[v + "_signed"] = st.median(x[key] / x["lat"] - 1 for x in rs)
        out.append(row)
    return out


def parts(rows: list[dict]) -> dict:
    """Median of each part's miss (measured - predicted, ms) over the warm requests, old and new rules."""
    warm = [r for r in rows if r["warm"] and r["scenario"] != "warmup"]
    p = [r["parts"] for r in warm]
    if not p:
        return {}
    return {
        "server_old": st.median(x["server_meas_old"] - x["server_pred_old"] for x in p),
        "server_new": st.median(x["server_meas_new"] - x["server_pred_new"] for x in p),
        "transport_old": st.median(x["resid_meas_old"] - x["resid_old"] for x in p),
        "transport_new": st.median(x["resid_meas_new"] - x["resid_new"] for x in p),
        "server_gap (total - waits - compute - queue)": st.median(x["server_meas_new"] - x["server_meas_old"]
                                                                  for x in p),
        "the call outside its run (lat - measured - setup)": st.median(x["outside"] + x["plan"] for x in p),
        "of it planning (plan_ms)": st.median(x["plan"] for x in p),
        "of it the rest (lat - measured - setup - plan_ms)": st.median(x["outside"] for x in p),
        "the rest less its forecast (the earlier calls' mean)": st.median(x["outside"] - x["after_pred"] for x in p),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="*", default=["docs/results/full/session17/logs", "docs/results/full/session16/logs"])
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {}
    for d in a.logs:
        out = replay([d])
        rows = out["rows"]
        s = summary(rows)
        pr = parts(rows)
        res[d] = {"summary": s, "parts_median_ms": pr, "checked": out["checked"],
                  "residual_mismatch": out["residual_mismatch"], "server_mismatch": out["server_mismatch"]}
        print(f"== {d}: {out['checked']} remote requests replayed, old-rule residual off by > 1 ms: "
              f"{out['residual_mismatch']}, server base moved > 1 %: {out['server_mismatch']}")
        print("median |pred / lat - 1| of the warm requests: recorded (old) -> the call's terms (session 18's "
              "runtime) [server term alone; both; the call's terms with a residual from one sample]; "
              "median signed old -> call")
        for x in s:
            print(f"  {x['model']:13s} {x['scenario']:22s} n={x['n']:3d}  {100 * x['old']:5.1f}% -> "
                  f"{100 * x['call']:5.1f}%  [{100 * x['server']:5.1f}%; {100 * x['new']:5.1f}%; "
                  f"{100 * x['call_min1']:5.1f}%]  ({100 * x['old_signed']:+5.1f}% -> {100 * x['call_signed']:+5.1f}%)"
                  + "  clipped server ratio: " + ", ".join(f"x{f}: {100 * x[f'clip{f}']:4.1f}%" for f in CLIPS))
        print("  median miss per part (measured - predicted, ms):")
        for k, v in pr.items():
            print(f"    {k}: {v:+.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
