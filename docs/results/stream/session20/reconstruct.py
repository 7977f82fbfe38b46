"""Reconstruct coinfer's stream request by request in the cells where a remote baseline beats local, beside the
stream lower bound (``partitioner.streambound``) and the bound's model of the strategy coinfer actually ran.

Usage: ``PYTHONPATH=. python docs/results/stream/session20/reconstruct.py RESULTS_DIR [MODEL:CPU:MBPS ...]``
(RESULTS_DIR holds ``results.json`` and ``logs/ue*.json`` of a ``coinfer-testbed bench`` run; default cells:
every stream cell with a bound). Prints markdown.

Per request: the decision (``invest`` / ``prefetch`` / local / remote warm) and its reason, predicted and
measured latency, the weight bytes that went up in it, the UE's CPU (ms of process CPU; at a 10 % share each
CPU ms is ~10 ms of wall), the plan's wall ms, the server's total / compute / weight wait. Then the
decomposition of (coinfer's total - the bound's total) into

- decision: the bound's model (``local_ms_with_upload``, ``first_remote_ms``, warm) of the strategy coinfer
  ran (its per-request upload bytes and sides), minus the bound (the least of that model over the space);
- runtime and noise: coinfer's measured request minus the same model's request, per request.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from partitioner.streambound import BYTES_PER_MS_PER_MBPS, Target, first_remote_ms, local_ms_with_upload
from testbed.bench.report import _cells, _goal, cell_bound


def _stream_logs(root: Path) -> dict[tuple, dict]:
    """(model, cpu, uplink) -> the worker log holding that cell's stream policies."""
    out = {}
    for f in sorted((root / "logs").glob("ue*.json")):
        if f.name.endswith(".spec.json"):
            continue
        d = json.loads(f.read_text())
        sp = d.get("spec") or {}
        if "coinfer" not in (d.get("streams") or {}):
            continue
        model = str(sp.get("model", "")).split(":")[-1]
        out[(model, float(sp["cpu"]), float(sp["uplink_mbps"]))] = d
    return out


def _kind(r: dict) -> str:
    reason = r.get("plan_reason") or ""
    if reason.startswith("prefetch"):
        return "prefetch (local)"
    if reason.startswith("invest"):
        return "invest"
    if reason.startswith("gradual"):
        return "gradual"
    if not r.get("server_ops"):
        return "local"
    return "remote" + (" cold" if r.get("uploaded_bytes") else "")


def reconstruct(root: Path, cells: list[tuple] | None = None) -> list[str]:
    rows = json.loads((root / "results.json").read_text())
    cs = _cells(rows, "stream")
    logs = _stream_logs(root)
    out: list[str] = []
    for key in sorted(cs):
        if cells is not None and key not in cells:
            continue
        c = cs[key]
        g = _goal(c)
        b = cell_bound(c)
        if g is None or b is None or key not in logs:
            continue
        best, ratio = g
        bm = c[best]["mean_ms"]
        reqs = logs[key]["streams"]["coinfer"]["requests"]
        model, cpu, up = key
        out += [f"### {model} {cpu * 100:g} % / {up:g} Mbit/s", "",
                f"coinfer mean {c['coinfer']['mean_ms']:.1f} ms, best baseline {best} {bm:.1f} "
                f"(coinfer / best {ratio:.2f}); bound {b['mean_ms']:.1f} (bound / best {b['mean_ms'] / bm:.2f}; "
                f"local {b['local_ms']:.0f}, warm {b['warm_ms']:.0f}, target {b['weight_bytes'] / 1e6:.1f} MB, "
                f"send {b['send_ms_per_byte'] * 1e6:.2f} ms/MB; its strategy: first remote #{b['first_remote']}, "
                f"{b['prefetch_bytes'] / 1e6:.1f} MB ahead). Target for <= 0.9: mean <= {0.9 * bm:.1f}.", ""]
        R = up * BYTES_PER_MS_PER_MBPS
        ell, c_b, rtt = b["local_ms"], b["send_ms_per_byte"], b["rtt_ms"]
        t = Target(b["weight_bytes"], b["warm_ms"])
        left = b["weight_bytes"]
        model_ms = []
        out += ["| # | decision | predicted | measured | bound's model of it | bound | MB up | UE CPU ms | plan ms "
                "| server total / compute / weight wait | reason |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(reqs):
            x = (r.get("uploaded_bytes") or 0) + (r.get("background_bytes") or 0)
            if not r.get("server_ops"):
                m = local_ms_with_upload(ell, x, R, c_b)
            else:
                m = first_remote_ms(t, min(x, left), R, c_b, rtt) if x else t.warm_ms
            left = max(0.0, left - x)
            model_ms.append(m)
            st = r.get("server_timings") or {}
            srv = (f"{st.get('total_ms', 0):.0f} / {st.get('compute_ms', 0):.0f} / {st.get('weight_wait_ms', 0):.0f}"
                   if st else "")
            pred = r.get("predicted_ms")
            out.append(f"| {i} | {_kind(r)} | {'' if pred is None else f'{pred:.0f}'} | {r['latency_ms']:.0f} "
                       f"| {m:.0f} | {b['per_request_ms'][i]:.0f} | {x / 1e6:.1f} | {r.get('cpu_ms', 0):.1f} "
                       f"| {r.get('plan_ms', 0):.1f} | {srv} | {(r.get('plan_reason') or '')[:120]} |")
        meas = sum(r["latency_ms"] for r in reqs)
        mod = sum(model_ms)
        ups = [i for i, r in enumerate(reqs) if (r.get("uploaded_bytes") or 0) + (r.get("background_bytes") or 0)]
        last = max(ups, default=-1)
        parts = {"the requests that uploaded": range(0, last + 1),
                 "the first request after them": range(last + 1, min(len(reqs), last + 2)),
                 "the rest": range(last + 2, len(reqs))}
        split = "; ".join(f"{k} {sum(reqs[i]['latency_ms'] - model_ms[i] for i in v):+.0f} ms ({len(v)})"
                          for k, v in parts.items())
        out += ["", f"- totals: measured {meas:.0f} ms, the bound's model of coinfer's strategy {mod:.0f}, bound "
                f"{b['total_ms']:.0f}: decision (model - bound) {mod - b['total_ms']:+.0f} ms "
                f"({(mod - b['total_ms']) / len(reqs):+.1f} in the mean), runtime and noise (measured - model) "
                f"{meas - mod:+.0f} ms ({(meas - mod) / len(reqs):+.1f} in the mean)",
                f"- runtime and noise by requests: {split}",
                "- per request (measured - model): "
                + ", ".join(f"#{i} {r['latency_ms'] - m:+.0f}" for i, (r, m) in enumerate(zip(reqs, model_ms))),
                f"- coinfer's strategy under the bound's model: mean {mod / len(reqs):.1f} = {mod / len(reqs) / bm:.2f}"
                f" of the best baseline's measured mean", ""]
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[1])
    cells = None
    if len(argv) > 2:
        cells = []
        for s in argv[2:]:
            m, cpu, up = s.split(":")
            cells.append((m, float(cpu), float(up)))
    print("\n".join(reconstruct(root, cells)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
