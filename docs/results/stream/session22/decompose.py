"""Session 22 (perf22): coinfer's stream mean against its stream lower bound, request by request.

For each grid cell where a remote baseline beats local and the bound (``testbed.bench.report.cell_bound``,
``partitioner.streambound``) is below 0.9 of the best baseline, coinfer's total over the K requests minus the
bound's total is split into terms that add up exactly:

- ``sequence``: the model's total (``partitioner.streambound``'s per-request terms, the cell's measured inputs) of
  the strategy coinfer took (its first request on the target, the bytes it uploaded inside its local requests
  before it) minus the bound's (the model's best strategy);
- ``local``: coinfer's local requests (with their prefetch bytes) measured minus the model's latency for them;
- ``cold``: coinfer's first request on the target measured minus the model's latency for it;
- ``warm``: coinfer's requests after it measured minus the target's warm latency ``w`` (the least warm mean over
  the cell's streams): ``warm_own`` is coinfer's own warm mean minus ``w`` times their count, the rest in ``warm``.

Also per cell: the send CPU per MB the bound used (``c``), coinfer's own cold/prefetch requests' send CPU per MB
(their CPU above the least CPU of the same policy's requests on as many server ops without an upload, else local's
least), and the bound with the socket floor's send CPU (0.45 ns/B, ``bench/bench_uplink_cpu.py``) in place of ``c``.

Run: ``.venv/bin/python docs/results/stream/session22/decompose.py [results.json] [logs dir]`` (defaults: session 21's
grid); writes ``decompose.json`` beside itself and prints the markdown tables.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from partitioner.streambound import (
    BYTES_PER_MS_PER_MBPS,
    Target,
    _strategy_total,
    first_remote_ms,
    local_ms_with_upload,
    stream_bound,
)
from testbed.bench.report import _cells, _goal, cell_bound

HERE = Path(__file__).resolve().parent
GRID = HERE.parents[1] / "full" / "session21"
FLOOR_NS_PER_BYTE = 0.45
GOODPUT = 1448 / 1514 * 16384 / 16413
"""TLS payload per byte the link's shaper counts: a 1448-byte TCP segment (MSS with timestamps) is a 1514-byte frame
(TCP 32 + IP 20 + Ethernet 14 bytes of headers; the testbed's tc tbf on a veth counts the frame), and a TLS record
carries 16384 bytes in 16413 (5 header + 24 tag/nonce): 0.955 of the link rate at most, before TCP's slow start."""


def _logs(logs: Path) -> dict[tuple, dict]:
    out = {}
    for p in sorted(logs.glob("ue*.json")):
        d = json.loads(p.read_text())
        s = d.get("spec", {})
        if "streams" not in d:
            continue
        out[(s["model"].split(":")[-1], s["cpu"], s["uplink_mbps"])] = {"file": p.name, **d}
    return out


def decompose(cell: dict, log: dict | None) -> dict | None:
    b = cell_bound(cell)
    goal = _goal(cell)
    if b is None or goal is None or b["first_remote"] is None:
        return None
    best, _ = goal
    best_ms = cell[best]["mean_ms"]
    co = cell["coinfer"]
    lat, up, ops = co["latency_ms"], co["uploaded_bytes_per_request"], co["server_ops"]
    K, ell, c = b["requests"], b["local_ms"], b["send_ms_per_byte"]
    R = b["uplink_mbps"] * BYTES_PER_MS_PER_MBPS
    rtt = b["rtt_ms"]
    tgt = Target(b["weight_bytes"], b["warm_ms"])
    w = tgt.warm_ms
    target_ops = b["target_server_ops"]
    jc = next((i + 1 for i, o in enumerate(ops) if o == target_ops), None)
    if jc is None:
        return None
    x_c = float(sum(up[:jc - 1]))
    model_co = _strategy_total(jc - 1, ell, tgt, x_c, R, c, rtt, (K - jc) * w)
    per_model = [local_ms_with_upload(ell, up[i], R, c) for i in range(jc - 1)]
    per_model.append(first_remote_ms(tgt, max(0.0, tgt.weight_bytes - x_c), R, c, rtt))
    per_model += [w] * (K - jc)
    local_term = sum(lat[i] - per_model[i] for i in range(jc - 1))
    cold_term = lat[jc - 1] - per_model[jc - 1]
    warm_lat = lat[jc:]
    warm_own = (statistics.fmean(warm_lat) - w) * len(warm_lat) if warm_lat else 0.0
    warm_rest = sum(x - w for x in warm_lat) - warm_own
    total_c = sum(lat)
    terms = {"sequence": model_co - b["total_ms"], "local": local_term, "cold": cold_term, "warm_own": warm_own,
             "warm": warm_rest}
    assert abs(sum(terms.values()) - (total_c - b["total_ms"])) < 1e-6
    cpu = co["ue_cpu"]
    floor_c = FLOOR_NS_PER_BYTE * 1e-6 / cpu
    tgts = [Target(t["weight_bytes"], t["warm_ms"]) for t in b["targets"]]
    b_floor = stream_bound(K, ell, tgts, b["uplink_mbps"], rtt, floor_c)
    b_goodput = stream_bound(K, ell, tgts, b["uplink_mbps"] * GOODPUT, rtt, c)
    # coinfer's own send CPU per MB in each uploading request
    cpu_ms = co["cpu_ms_per_request"]
    loc_cpu = min(x for x in cell["local"]["cpu_ms_per_request"] if x is not None)
    own = []
    for i, nb in enumerate(up):
        if nb < (1 << 20):
            continue
        same = [cpu_ms[k] for k in range(K) if not up[k] and ops[k] == ops[i]]
        base = min(same) if same else (loc_cpu if not ops[i] else None)
        if base is not None:
            own.append({"request": i + 1, "mb": nb / 1e6, "ns_per_byte": (cpu_ms[i] - base) / nb * 1e6})
    reqs = []
    for i in range(K):
        r = {"request": i + 1, "ms": lat[i], "model_ms": per_model[i], "bound_ms": b["per_request_ms"][i],
             "up_mb": up[i] / 1e6, "server_ops": ops[i], "cpu_ms": cpu_ms[i]}
        if log is not None:
            lr = log["streams"]["coinfer"]["requests"][i]
            r["plan_why"] = lr.get("plan_why")
            r["predicted_ms"] = lr.get("predicted_ms")
            r["reason"] = lr.get("reason")
        reqs.append(r)
    return {"cell": [co["model"], cpu, co["uplink_mbps"]], "log": None if log is None else log["file"],
            "best": best, "best_ms": best_ms, "coinfer_ms": total_c / K, "bound_ms": b["mean_ms"],
            "bound_strategy": [b["first_remote"], b["prefetch_bytes"]], "coinfer_strategy": [jc, x_c],
            "coinfer_model_ms": model_co / K, "terms_mean_ms": {k: v / K for k, v in terms.items()},
            "send_ms_per_mb": c * 1e6, "send_ns_per_byte": c * 1e6 * cpu, "own_send": own,
            "bound_floor_ms": b_floor.mean_ms, "bound_goodput_ms": b_goodput.mean_ms,
            "bound_goodput_strategy": [b_goodput.first_remote, b_goodput.prefetch_bytes],
            "bound_floor_strategy": [b_floor.first_remote, b_floor.prefetch_bytes],
            "local_ms": ell, "warm_ms": w, "weight_mb": tgt.weight_bytes / 1e6, "requests": reqs}


def strat(j: int | None, x: float) -> str:
    if j is None:
        return "all local"
    return f"local x{j - 1}, {x / 1e6:.1f} MB ahead, remote from #{j}" if j > 1 else "remote from #1"


def main() -> None:
    res = Path(sys.argv[1]) if len(sys.argv) > 1 else GRID / "results.json"
    logs = Path(sys.argv[2]) if len(sys.argv) > 2 else GRID / "logs"
    rows = json.loads(res.read_text())
    cells = _cells(rows, "stream")
    lg = _logs(logs)
    out = []
    for k in sorted(cells):
        d = decompose(cells[k], lg.get(k))
        if d is not None and round(d["bound_ms"] / d["best_ms"], 2) <= 0.90:
            out.append(d)
    (HERE / "decompose.json").write_text(json.dumps(out, indent=1))
    print("| cell | best | coinfer / best | bound / best | coinfer's strategy | bound's strategy | coinfer - bound "
          "(mean ms) | sequence | local | cold | warm (own mean) | warm (rest) | send ns/B (bound) | coinfer's "
          "send ns/B | bound at 0.45 ns/B / best | bound at the TLS goodput / best |")
    print("|" + "---|" * 16)
    for d in out:
        m, cpu, upm = d["cell"]
        t = d["terms_mean_ms"]
        own = ", ".join(f"{o['ns_per_byte']:.2f} (#{o['request']}, {o['mb']:.1f} MB)" for o in d["own_send"])
        print(f"| {m} {cpu * 100:g} % / {upm:g} | {d['best']} {d['best_ms']:.0f} | "
              f"{d['coinfer_ms'] / d['best_ms']:.2f} | {d['bound_ms'] / d['best_ms']:.2f} | "
              f"{strat(*d['coinfer_strategy'])} | {strat(*d['bound_strategy'])} | "
              f"{d['coinfer_ms'] - d['bound_ms']:+.1f} | {t['sequence']:+.1f} | {t['local']:+.1f} | "
              f"{t['cold']:+.1f} | {t['warm_own']:+.1f} | {t['warm']:+.1f} | {d['send_ns_per_byte']:.2f} | "
              f"{own or '-'} | {d['bound_floor_ms'] / d['best_ms']:.2f} | {d['bound_goodput_ms'] / d['best_ms']:.2f} |")
    for d in out:
        m, cpu, upm = d["cell"]
        print(f"\n#### {m} {cpu * 100:g} % / {upm:g} Mbit/s ({d['log']}): local {d['local_ms']:.0f} ms, warm "
              f"{d['warm_ms']:.0f} ms, {d['weight_mb']:.1f} MB\n")
        print("| # | coinfer ms | model of coinfer's strategy | bound's | MB up | server ops | UE CPU ms | "
              "predicted | plan_why |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in d["requests"]:
            print(f"| {r['request']} | {r['ms']:.0f} | {r['model_ms']:.0f} | {r['bound_ms']:.0f} | "
                  f"{r['up_mb']:.1f} | {r['server_ops']} | {r['cpu_ms']:.1f} | "
                  f"{(r.get('predicted_ms') or 0):.0f} | {r.get('plan_why') or ''} |")


if __name__ == "__main__":
    main()
