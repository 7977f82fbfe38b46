"""Every cold request of a bench run's 10 % cells: prediction, measured latency and where the time went.

Usage: python docs/results/cold/session16/cold_rows.py RUN_DIR [RUN_DIR ...]  (a ``coinfer-testbed bench --out`` dir)

Per request: the stream's first request of coinfer and NS+serial and scenario b's parallel / serial runs;
``call`` the timed call, ``meas`` the client's own window (after planning and defining the slice), ``up`` a serial
baseline's timed UploadWeights, ``define`` the wall / CPU ms the request spent defining its slice (absent: defined
at connect), the server's validation and weight wait; then the serial uploads' CPU and the UploadWeights probe."""

from __future__ import annotations

import glob
import json
import statistics
import sys


def rows(run: str):
    for f in sorted(glob.glob(f"{run}/logs/ue*.json")):
        if f.endswith(".spec.json"):
            continue
        with open(f) as fh:
            d = json.load(fh)
        sp = d["spec"]
        if sp.get("cpu") != 0.1 or len(d.get("streams", {})) < 2:  # (multi-UE workers: coinfer alone)
            continue
        cell = f"{sp['model'].split(':')[-1]} {sp['cpu']:.0%} {sp['uplink_mbps']:.0f}"
        for pol, s in d.get("streams", {}).items():
            if pol in ("coinfer", "neurosurgeon-serial", "dads-serial") and s.get("requests"):
                yield cell, pol, s["requests"][0], s, d
        cc = d.get("cold_compare") or {}
        for kind in ("parallel", "serial"):
            if cc.get(kind):
                yield cell, f"cold-{kind}", cc[kind], {}, d


def main(runs: list[str]) -> None:
    for run in runs:
        print(f"## {run}")
        print("| cell | request | predicted | measured | error | call | meas | serial upload | define wall/CPU |"
              " server validation | weight wait | uploaded MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        errs = {"all": [], "cold": []}
        for cell, pol, r, _s, _d in rows(run):
            pred, lat = r.get("predicted_ms"), r["latency_ms"]
            if not pred:
                continue
            e = pred / lat - 1
            errs["all"].append(abs(e))
            if pol.startswith("cold-"):
                errs["cold"].append(abs(e))
            pp = r.get("predicted_parts") or {}
            st = r.get("server_timings") or {}
            de = f"{pp['define_ms']:.0f} / {pp['define_cpu_ms']:.1f}" if "define_ms" in pp else "-"
            print(f"| {cell} | {pol} | {pred:.0f} | {lat:.0f} | {e:+.0%} | {r['call_ms']:.0f} |"
                  f" {r['measured_ms']:.0f} | {r['upload_ms']:.0f} | {de} | {st.get('validation_ms', 0):.0f} |"
                  f" {st.get('weight_wait_ms', 0):.0f} | {r['uploaded_bytes'] / 1e6:.1f} |")
        for k, v in errs.items():
            if v:
                print(f"- median |error| {k}: {statistics.median(v):.0%} over {len(v)}")
        seen = set()
        for cell, pol, _r, s, d in rows(run):
            if s.get("serial_upload_cpu_ms") is not None:
                b = s["serial_upload_bytes"]
                print(f"- {cell} {pol}: UploadWeights {b / 1e6:.1f} MB, {s.get('serial_upload_weights')} weights in "
                      f"{s['serial_upload_ms']:.0f} ms, {s['serial_upload_cpu_ms']:.1f} ms CPU "
                      f"({s['serial_upload_cpu_ms'] / b * 1e6:.2f} ns/B)")
            if d.get("bulk_probe") and cell not in seen:
                seen.add(cell)
                print(f"- {cell}: UploadWeights probe at connect: {json.dumps(d['bulk_probe'])}")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
