"""Where can a cold request's upload hide behind the UE's local compute? The simulator's answer per cell.

    .venv/bin/python bench/make_costgraphs.py --out CG --threads 1 --speedup 1
    .venv/bin/python bench/bench_cold_hiding.py --captured CG [--probe-logs docs/results/full/session9/logs] \
        --json docs/results/cold/session10/cold_hiding.json

MJOA-MU (Zhang et al.) uploads the server part's weights while the UE computes its prefix ("parallel")
instead of before the request ("serial"), and reports up to 64.5 % lower latency. For one cell (model,
UE CPU share f, uplink R) this bench does what ``coinfer-testbed bench``'s cold scenario (b) does to
predict it (``testbed.bench.worker.Ue.cold_compare``): MJOA's cold partition as the paper plans it
(``planning.choose("mjoa", ...)``, no model of the UE's CPU cost of sending), then its latency with
parallel and with serial upload, both with the UE's sending and computing on one CPU budget
(``planning.predict(..., ue_cpu=...)``, ``partitioner.uecpu``), and their ratio.

The cost graph's UE times are one core's (``make_costgraphs --threads 1``, the testbed UE's one torch
thread) divided by f (a CPU quota of f of a core); the server's are its ``server_ms`` (``--speedup 1``:
the testbed's edge server runs on the same machine). The UE's send cost at f and R is

    send_ms_per_byte(f, R) = (b + c / R) / f

with b the CPU ms per byte and c the CPU share (of one core) that sending costs whatever its rate: the
least-squares fit of the testbed's own probes (``UeCpu.send_ms_per_byte`` of every cold-compare cell in
``--probe-logs``; session 9's grid: b = 0.62 ns/B, c = 0.0084 core), or ``--send-ns-per-byte`` /
``--send-core``.

Why the ratio is bounded (``partitioner.uecpu``): with prefix A (UE ms), the server part's weight bytes W,
server compute S and latency L, serial ~ W/R + A + S and parallel ~ max(A / (1 - R s), W/R) + S (the prefix
slowed by the CPU its concurrent sending takes, ``R s`` of the UE's budget while R s <= 1/2), so at best
(A / (1 - R s) = W/R, S -> 0) parallel / serial = 1 / (2 - R s): <= 0.6 needs R s <= 1/3, and the prefix as
long as the upload. With A = a / f (a: the prefix's CPU ms on one core) and W/R = A, R s = (b W + c W/R)
/ a: the CPU it takes to send the server part's weights over the CPU of the prefix they hide behind, a
property of the model and the machine more than of the cell.

Columns: ``ratio`` (MJOA's split, the bench's prediction), ``ratio_free`` (the same split with sending
free of CPU: MJOA-MU's model), ``best_cut_ratio`` (the least parallel / serial over every cut of the op
order that beats local when uploaded in parallel: what any chain split could do), ``beats_local`` (MJOA's
split in parallel, with the send cost, below local: MJOA plans without that cost), ``Rs`` (the UE budget
share sending at the link rate takes). Prints a table per model and writes JSON (one row per cell).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from partitioner.costgraph import CostGraph, Link
from partitioner.prep import prepare
from partitioner.simulate import Rates
from partitioner.uecpu import UeCpu, run_shared
from ue_client import planning

log = logging.getLogger("bench_cold_hiding")

CPUS = (0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25)
UPLINKS = (20.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 700.0, 1000.0)
TARGET = 0.6
"""Issue 12's must-show: cold parallel / serial <= 0.6 where the upload can hide."""
SESSION9_FIT = (0.62e-6, 0.0084)
"""(b ms/B, c core) fitted to session 9's full-grid probes (24 cells; residuals within +-35 %)."""


def fit_send_cost(logs: str) -> tuple[float, float, int]:
    """Least-squares fit of ``core share = b R + c`` to the testbed's probes: every worker result
    (``ue*.json``) in ``logs`` whose cold compare recorded ``ue_cpu``: core share = send_ms_per_byte x f x R.
    Returns (b ms/B, c core share, cells). Raises ValueError with fewer than 2 cells."""
    xs, ys = [], []
    for path in sorted(glob.glob(str(Path(logs) / "ue*.json"))):
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        spec, cc = d.get("spec") or {}, d.get("cold_compare")
        if not isinstance(cc, dict) or not cc.get("ue_cpu") or spec.get("cpu") is None:
            continue
        r = float(spec["uplink_mbps"]) * 125.0  # bytes/ms
        xs.append(r)
        ys.append(cc["ue_cpu"]["send_ms_per_byte"] * float(spec["cpu"]) * r)
    n = len(xs)
    if n < 2:
        raise ValueError(f"{logs}: {n} cells with a probed send cost; need 2")
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return b, my - b * mx, n


def at_share(g: CostGraph, f: float) -> CostGraph:
    """The graph on a UE with ``f`` of a core: UE op times / f (variances / f^2), the server's unchanged."""
    ops = tuple(replace(op, ue_ms=op.ue_ms / f, ue_var=op.ue_var / f ** 2) for op in g.ops)
    return replace(g, ops=ops, ue_samples_ms=None)


def send_cost(b: float, c: float, f: float, mbps: float) -> UeCpu:
    """The UE's send cost at CPU share ``f`` and link rate ``mbps`` (module docstring)."""
    return UeCpu(send_ms_per_byte=(b + c / (mbps * 125.0)) / f)


def best_cut(g: CostGraph, link: Link, cpu: UeCpu, local_ms: float, step: int) -> tuple[float | None, int]:
    """The least parallel / serial over the cuts of the op order (ops k.. on the server, every ``step``-th k)
    whose parallel latency beats local; (None, 0) when none does. Returns (ratio, server ops)."""
    P = prepare(g)
    r = Rates.of(link, None)
    s = cpu.send_ms_per_byte
    n = len(g.ops)
    best: tuple[float | None, int] = (None, 0)
    for k in range(n - 1, -1, -step):
        smask = ((1 << n) - 1) ^ ((1 << k) - 1)
        par = run_shared(P, smask, r, s, "cold")[0].latency_ms
        if par >= local_ms:
            continue
        ser = run_shared(P, smask, r, s, "serial")[0].latency_ms
        if best[0] is None or par / ser < best[0]:
            best = (par / ser, n - k)
    return best


def cell(g: CostGraph, f: float, mbps: float, rtt_ms: float, b: float, c: float, step: int) -> dict:
    """One cell's predictions (module docstring)."""
    gf = at_share(g, f)
    link = Link(uplink_mbps=mbps, downlink_mbps=mbps, rtt_ms=rtt_ms)
    cpu = send_cost(b, c, f, mbps)
    local = sum(op.ue_ms for op in gf.ops)
    choice = planning.choose("mjoa", gf, link, budget_s=1.0)  # as the bench: no model of the send cost
    server = choice.server_ops
    row = {"model": g.model, "ue_cpu": f, "uplink_mbps": mbps, "rtt_ms": rtt_ms, "local_ms": local,
           "send_ms_per_byte": cpu.send_ms_per_byte, "Rs": mbps * 125.0 * cpu.send_ms_per_byte,
           "server_ops": len(server)}
    if server:
        par = planning.predict(gf, link, server, mode="cold", ue_cpu=cpu)
        ser = planning.predict(gf, link, server, mode="serial", ue_cpu=cpu)
        par0 = planning.predict(gf, link, server, mode="cold")
        ser0 = planning.predict(gf, link, server, mode="serial")
        wbytes = sum(gf.weights[w] for w in {w for op in gf.ops if op.name in server for w in op.weights})
        row.update(parallel_ms=par, serial_ms=ser, ratio=par / ser, ratio_free=par0 / ser0, beats_local=par < local,
                   prefix_ms=sum(op.ue_ms for op in gf.ops if op.name not in server),
                   upload_mb=wbytes / 1e6, upload_ms=wbytes / (mbps * 125.0))
    else:
        row.update(parallel_ms=None, serial_ms=None, ratio=None, ratio_free=None, beats_local=None, prefix_ms=local,
                   upload_mb=0.0, upload_ms=0.0)
    row["best_cut_ratio"], row["best_cut_server_ops"] = best_cut(gf, link, cpu, local, step)
    row["hides"] = row["ratio"] is not None and row["ratio"] <= TARGET
    return row


def load(captured: str, names: list[str] | None) -> list[CostGraph]:
    out = []
    for path in sorted(Path(captured).glob("*.json")):
        if path.name == "index.json":
            continue
        g = CostGraph.from_json(path)
        if names and g.model not in names and path.stem not in names:
            continue
        out.append(g)
    if not out:
        raise SystemExit(f"no cost graphs in {captured} (make them with bench/make_costgraphs.py)")
    return out


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict], cpus: list[float], uplinks: list[float]) -> str:
    """Per model: parallel / serial of MJOA's split (``*`` where <= 0.6; ``!``: its parallel latency with the send
    cost is not below local; ``L``: its cold plan is local), UE CPU down, uplink across."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {(r["ue_cpu"], r["uplink_mbps"]): r for r in rows if r["model"] == model}
        loc = {f: by[(f, uplinks[0])]["local_ms"] for f in cpus}
        lines.append(f"\n{model}: MJOA's cold split, predicted parallel / serial (best cut of the op order in "
                     f"brackets; L = the plan is local; ! = not below local once sending costs CPU; * <= {TARGET})")
        lines.append("| UE CPU | local ms | " + " | ".join(f"{u:g} Mbps" for u in uplinks) + " |")
        lines.append("|---|---|" + "---|" * len(uplinks))
        for f in cpus:
            cells = []
            for u in uplinks:
                r = by[(f, u)]
                v = "L" if r["ratio"] is None else (fmt(r["ratio"]) + ("*" if r["hides"] else "")
                                                     + ("" if r["beats_local"] else "!"))
                cells.append(f"{v} ({fmt(r['best_cut_ratio'])})")
            lines.append(f"| {f * 100:g} % | {loc[f]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captured", required=True, help="directory of CostGraph JSONs (bench/make_costgraphs.py)")
    ap.add_argument("--models", nargs="*", help="only these (model names or file stems)")
    ap.add_argument("--cpus", type=lambda s: [float(x) for x in s.split(",")], default=list(CPUS),
                    help="UE CPU shares (fractions of a core), comma list")
    ap.add_argument("--uplinks", type=lambda s: [float(x) for x in s.split(",")], default=list(UPLINKS),
                    help="uplink rates (Mbit/s), comma list")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="RTT (the testbed's: 20 ms)")
    ap.add_argument("--probe-logs", help="fit the send cost to the testbed's probes in this logs/ directory")
    ap.add_argument("--send-ns-per-byte", type=float, help="b: CPU ns per byte sent, one core")
    ap.add_argument("--send-core", type=float, help="c: CPU share (of a core) sending costs at any rate")
    ap.add_argument("--cut-step", type=int, default=1, help="best_cut: every n-th cut of the op order")
    ap.add_argument("--json", type=Path, help="write the rows and the settings here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    b, c = SESSION9_FIT
    source = "session 9's full-grid probes (default)"
    if args.probe_logs:
        b, c, n = fit_send_cost(args.probe_logs)
        source = f"fitted to {n} probes in {args.probe_logs}"
    if args.send_ns_per_byte is not None:
        b, source = args.send_ns_per_byte * 1e-6, "given"
    if args.send_core is not None:
        c, source = args.send_core, "given"
    print(f"send cost: b = {b * 1e6:.3f} ns/B, c = {c:.4f} core ({source})")
    t0 = time.perf_counter()
    rows = []
    for g in load(args.captured, args.models):
        t = time.perf_counter()
        for f in args.cpus:
            for u in args.uplinks:
                rows.append(cell(g, f, u, args.rtt_ms, b, c, args.cut_step))
        log.info("%s: %d ops, %.1f MB, %.1f ms on one core (%.1f s)", g.model, len(g.ops),
                 g.total_weight_bytes / 1e6, sum(op.ue_ms for op in g.ops), time.perf_counter() - t)
    print(table(rows, args.cpus, args.uplinks))
    hiding = [r for r in rows if r["hides"]]
    print(f"\ncells where MJOA's split is predicted <= {TARGET}: {len(hiding)} of {len(rows)}"
          + "".join(f"\n  {r['model']} {r['ue_cpu'] * 100:g} % / {r['uplink_mbps']:g} Mbps: {r['ratio']:.2f} "
                    f"(free sending {r['ratio_free']:.2f}; Rs {r['Rs']:.2f}; prefix {r['prefix_ms']:.0f} ms, "
                    f"upload {r['upload_mb']:.1f} MB = {r['upload_ms']:.0f} ms at the link rate)" for r in hiding))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "settings": {"captured": args.captured, "cpus": args.cpus, "uplinks": args.uplinks,
                         "rtt_ms": args.rtt_ms, "send_ms_per_byte_core": b, "send_core_share": c,
                         "send_cost_source": source, "target": TARGET, "elapsed_s": time.perf_counter() - t0,
                         "graphs": {g: next(r["local_ms"] * r["ue_cpu"] for r in rows if r["model"] == g)
                                    for g in dict.fromkeys(r["model"] for r in rows)}},
            "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
