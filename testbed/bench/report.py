"""Markdown tables of a bench run: one table per scenario, the coinfer / best-baseline ratio in every cell."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

STREAM_POLICIES = ("local", "neurosurgeon-serial", "dads-serial", "ionn", "coinfer")
HEAD = {"local": "local", "neurosurgeon-serial": "NS+serial", "dads-serial": "DADS+serial", "ionn": "IONN",
        "coinfer": "coinfer"}
WARM_POLICIES = ("local", "neurosurgeon", "dads", "coinfer")


def _f(x, nd: int = 0) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cells(rows: list[dict], scenario: str) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if r.get("scenario") == scenario:
            out[(r["model"], r["ue_cpu"], r["uplink_mbps"])][r["policy"]] = r
    return out


def _key_name(k) -> list[str]:
    model, cpu, up = k
    return [model, f"{cpu * 100:g} %", f"{up:g}"]


def _table(head: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return [*lines, ""]


def stream_table(rows: list[dict], key: str, title: str) -> list[str]:
    cells = _cells(rows, "stream")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(HEAD[p] for p in STREAM_POLICIES)]
    if key == "mean_ms":
        head.append("pre-deployed")
    head += ["best baseline", "coinfer / best baseline", "coinfer / local"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        vals = {p: c[p][key] if p in c else None for p in STREAM_POLICIES}
        row = _key_name(k) + [_f(vals[p]) for p in STREAM_POLICIES]
        if key == "mean_ms":
            row.append(_f(next((r.get("predeployed_ms") for r in c.values() if r.get("predeployed_ms")), None)))
        base = {p: v for p, v in vals.items() if p != "coinfer" and v is not None}
        best = min(base, key=base.get) if base else None
        co = vals.get("coinfer")
        row += [HEAD[best] if best else "n/a", _r(co / base[best] if co is not None and best else None),
                _r(co / vals["local"] if co is not None and vals.get("local") else None)]
        body.append(row)
    return [f"### {title}", "", *_table(head, body)]


def warm_progress_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "stream")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *(HEAD[p] for p in STREAM_POLICIES)]
    body = []
    for k in sorted(cells):
        c = cells[k]
        row = _key_name(k)
        for p in STREAM_POLICIES:
            r = c.get(p)
            if r is None or r.get("mean_ms") is None:
                row.append("n/a")
            elif r.get("warm_after_request") is None:
                row.append(f"not in {r['requests']} (last {_f(r.get('last_ms'))} vs {_f(r.get('warm_ms'))})")
            else:
                row.append(f"{_f(r['time_to_warm_ms'])} (#{r['warm_after_request'] + 1})")
        body.append(row)
    return ["### a. Stream: time until warm, ms of stream until the first request within 10 % (+5 ms) of the "
            "policy's own warm latency (request #)", "", *_table(head, body)]


def cold_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "cold")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", "local", "serial upload (same split)", "coinfer parallel upload",
            "parallel / serial", "parallel / local", "predicted parallel / serial"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        loc = c.get("local", {}).get("first_ms")
        ser = c.get("serial-same-split", {}).get("first_ms")
        par_row = c.get("coinfer-parallel", {})
        par = par_row.get("first_ms")
        ps = c.get("serial-same-split", {}).get("predicted_ms")
        pp = par_row.get("predicted_ms")
        note = par_row.get("note")
        body.append([*_key_name(k), _f(loc), _f(ser), _f(par) if par is not None else f"n/a ({note})",
                     _r(par / ser if par is not None and ser else None),
                     _r(par / loc if par is not None and loc else None),
                     _r(pp / ps if pp is not None and ps else None)])
    return ["### b. Cold single request: parallel vs serial upload of the same partition (MJOA-MU), vs local (ms)",
            "", *_table(head, body)]


def warm_table(rows: list[dict]) -> list[str]:
    cells = _cells(rows, "warm")
    if not cells:
        return []
    head = ["model", "UE CPU", "uplink Mbps", *WARM_POLICIES, "best measured", "coinfer / best"]
    body = []
    for k in sorted(cells):
        c = cells[k]
        vals = {p: c[p]["mean_ms"] if p in c else None for p in WARM_POLICIES}
        ok = {p: v for p, v in vals.items() if v is not None}
        best = min(ok.values()) if ok else None
        row = _key_name(k) + [_f(vals[p]) + (f" ({vals[p] / best:.2f}x)" if vals[p] and best else "")
                              for p in WARM_POLICIES]
        row += [_f(best), _r(vals["coinfer"] / best if vals.get("coinfer") and best else None)]
        body.append(row)
    return ["### c. Warm: median latency with the whole model on the server (ms; x = over the best measured)", "",
            *_table(head, body)]


def accuracy_table(rows: list[dict]) -> list[str]:
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") in ("stream", "warm", "multi_ue"):
            preds = r.get("predicted_per_request_ms") or []
            for p, m in zip(preds, r.get("latency_ms") or []):
                if p is not None and m:
                    pairs[f"{r['scenario']}:{r['policy']}"].append((p, m))
        elif r.get("scenario") == "cold" and r.get("predicted_ms") and r.get("first_ms"):
            pairs[f"cold:{r['policy']}"].append((r["predicted_ms"], r["first_ms"]))
    if not pairs:
        return []
    head = ["scenario:policy", "n", "median abs error", "median signed error (pred/meas - 1)", "within 25 %"]
    body = []
    for k in sorted(pairs):
        errs = [p / m - 1 for p, m in pairs[k]]
        body.append([k, str(len(errs)), f"{statistics.median(abs(e) for e in errs):.0%}",
                     f"{statistics.median(errs):+.0%}", f"{sum(abs(e) <= 0.25 for e in errs) / len(errs):.0%}"])
    return ["### d. Planner accuracy: predicted (the client's simulator, as reported) vs measured per request", "",
            *_table(head, body)]


def multi_table(rows: list[dict]) -> list[str]:
    by_n: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("scenario") == "multi_ue":
            by_n[r["n_ues"]].append(r)
    if not by_n:
        return []
    head = ["N UEs", "per-UE mean latency ms (model, uplink, CPU)", "mean over UEs", "server throughput req/s"]
    body = []
    for n in sorted(by_n):
        rs = sorted(by_n[n], key=lambda r: r["ue"])
        per = "; ".join(f"{_f(r['mean_ms'])} ({r['model']}, {r['uplink_mbps']:g}, {r['ue_cpu'] * 100:g} %)"
                        for r in rs)
        means = [r["mean_ms"] for r in rs if r["mean_ms"] is not None]
        body.append([str(n), per, _f(sum(means) / len(means) if means else None),
                     _r(rs[0].get("server_throughput_rps"))])
    return ["### e. Multi-UE: heterogeneous UEs on one edge server (coinfer, all streams at once)", "",
            *_table(head, body)]


def unavailable(rows: list[dict]) -> list[str]:
    notes = sorted({f"{r['policy']}: {r.get('unavailable') or r.get('error')}" for r in rows
                    if r.get("unavailable") or r.get("error")})
    return (["### Not available / errors", "", *(f"- {n}" for n in notes), ""]) if notes else []


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    m = meta.get("machine") or {}
    cpu = m.get("cpu_model") or m.get("cpu") or m.get("processor") or ""
    lines = [
        "## Results", "",
        f"- command: `{meta.get('command')}`",
        f"- commit {meta.get('commit')}, {meta.get('date')}, elapsed {meta.get('elapsed_s')} s"
        + ("" if meta.get("complete") else " (partial: still running or interrupted)"),
        f"- testbed: {meta.get('mode_description', meta.get('mode'))}",
        f"- machine: {cpu}, {m.get('logical_cores', '?')} logical cores, {m.get('memory_total_mb', 0) / 1024:.0f} GiB, "
        f"host {m.get('hostname', '?')}; torch {meta.get('torch', '?')}, python {meta.get('python', '?')}",
        "- policies: local; NS+serial = Neurosurgeon split, all its server weights uploaded first (timed "
        "UploadWeights), then the request; DADS+serial = the same with the DADS min-cut; IONN = best warm "
        "split among suffixes the server already holds, weights uploaded in the background by gain per byte; "
        "coinfer = mjoa + parallel upload + progressive offloading. Every stream starts on a cold server "
        "(a fresh tenant). Latencies in ms, measured by the UE. IONN caveat: the client cannot learn what another "
        "connection uploaded except by reconnecting, so the IONN worker reconnects before every request; that "
        "time is not in its latency while its background upload goes on (IONN rows are optimistic; the "
        "per-row `untimed_reconnect_ms` in results.json says by how much).",
        "",
        *stream_table(rows, "mean_ms", "a. Stream: mean latency over the stream (ms)"),
        *stream_table(rows, "first_ms", "a. Stream: first (cold) request (ms)"),
        *stream_table(rows, "last_ms", "a. Stream: last request of the stream (ms)"),
        *warm_progress_table(rows),
        *cold_table(rows),
        *warm_table(rows),
        *accuracy_table(rows),
        *multi_table(rows),
        *unavailable(rows),
    ]
    plots = meta.get("plots") or []
    if plots:
        lines += ["### Plots", "", *(f"![{Path(p).stem}]({Path(p).name})" for p in plots), ""]
    path.write_text("\n".join(lines))
