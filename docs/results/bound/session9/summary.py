"""Summary of the before/after runs: per cell coinfer, the best baseline, their ratio, the stream bound.
``PYTHONPATH=. python docs/results/bound/session9/summary.py RUNS_DIR OUT.json [GROUPS]`` (RUNS_DIR holds the
benches' ``before_G`` / ``after_G`` output folders)."""

import json
import sys

from testbed.bench.report import HEAD, _cells, _goal, cell_bound


def main(root: str, path: str, groups: list[str]) -> None:
    out: dict = {}
    for w in ("before", "after"):
        for g in groups:
            with open(f"{root}/{w}_{g}/results.json") as f:
                rows = json.load(f)
            for k, c in _cells(rows, "stream").items():
                base = {p: r for p, r in c.items() if p != "coinfer" and r.get("mean_ms") is not None}
                best = min(base, key=lambda p: base[p]["mean_ms"])
                b = cell_bound(c)
                co = c["coinfer"]
                out.setdefault(k, {})[w] = {
                    "coinfer_ms": co["mean_ms"], "best": best, "best_ms": base[best]["mean_ms"],
                    "local_ms": c["local"]["mean_ms"], "ratio": co["mean_ms"] / base[best]["mean_ms"],
                    "goal": _goal(c) is not None, "bound_ms": None if b is None else b["mean_ms"],
                    "bound_ratio": None if b is None else b["mean_ms"] / base[best]["mean_ms"],
                    "bound_plan": None if b is None else (b["first_remote"], b["prefetch_bytes"]),
                    "coinfer_latency_ms": co["latency_ms"], "coinfer_server_ops": co["server_ops"],
                    "coinfer_uploaded_bytes_per_request": co["uploaded_bytes_per_request"],
                    "commit": co.get("commit")}
    lines = ["| model | UE CPU | uplink Mbps | before: coinfer / best (best) | after: coinfer / best (best) | "
             "bound / best before, after | coinfer's first requests after (ms, MB up) |",
             "|---|---|---|---|---|---|---|"]
    for k in sorted(out):
        b, a = out[k]["before"], out[k]["after"]
        up = list(zip(a["coinfer_latency_ms"], a["coinfer_uploaded_bytes_per_request"]))[:4]
        first = ", ".join(f"{x:.0f} ({u / 1e6:.1f})" for x, u in up)
        lines.append(
            f"| {k[0]} | {k[1] * 100:g} % | {k[2]:g} | "
            f"{b['coinfer_ms']:.0f} / {b['best_ms']:.0f} = **{b['ratio']:.2f}** ({HEAD[b['best']]}) | "
            f"{a['coinfer_ms']:.0f} / {a['best_ms']:.0f} = **{a['ratio']:.2f}** ({HEAD[a['best']]}) | "
            f"{b['bound_ratio']:.3f}, {a['bound_ratio']:.3f} | {first} |")
    print("\n".join(lines))
    with open(path, "w") as f:
        json.dump({f"{k[0]} {k[1]} {k[2]}": v for k, v in out.items()}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else ["c", "b", "a"])
