"""Where the first warm remote request's time goes beyond what was predicted while connecting (session 33).

For each coinfer stream in the given bench directories (default: the two single-cell runs here and session 31's
grid), its first warm remote request (no weights sent, no new slice): the latency the testbed measured, the call's
time around its run (latency - run), the run's prediction, the run as measured, the server's predicted and measured
time (compute + queue), and what is left of the run beyond the server once the prediction's non-server part is
taken out (``run transport error``).

Usage (from the repository root): python docs/results/margin/session33/decompose.py [DIR ...]
"""
from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
HERE = Path(__file__).resolve().parent


def main() -> None:
    dirs = [Path(d) for d in sys.argv[1:]] or [HERE / "tb_probe1", HERE / "tb_probe2",
                                               ROOT / "docs/results/full/session31/logs"]
    print("| run | model | UE CPU | Mbit/s | latency | call around run | run pred | run meas | server pred | "
          "server meas | run transport error | UE process CPU ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        for f in sorted(glob.glob(str(d / "ue*.json"))):
            j = json.loads(Path(f).read_text())
            sp = j.get("spec")
            if not sp or "coinfer" not in j.get("streams", {}):
                continue
            warm = [r for r in j["streams"]["coinfer"]["requests"]
                    if r.get("server_ops") and not r.get("uploaded_bytes") and not r.get("new_slice")
                    and not r.get("fallback") and r.get("server_timings")]
            if not warm:
                continue
            r = warm[0]
            pp, st = r.get("predicted_parts") or {}, r["server_timings"]
            srv_meas = st["compute_ms"] + st["queue_ms"]
            srv_pred = pp.get("server_ms", 0.0)
            err = (r["measured_ms"] - srv_meas) - (r["predicted_ms"] - srv_pred)
            print(f"| {d.name if d.name != 'logs' else d.parent.name} | {sp['model'].split(':')[-1]} | "
                  f"{sp['cpu']:.0%} | {sp['uplink_mbps']:.0f} | {r['latency_ms']:.0f} | "
                  f"{r['latency_ms'] - r['measured_ms']:.0f} | {r['predicted_ms']:.0f} | {r['measured_ms']:.0f} | "
                  f"{srv_pred:.0f} | {srv_meas:.0f} | {err:+.0f} | {r.get('cpu_ms', 0):.1f} |")


if __name__ == "__main__":
    main()
