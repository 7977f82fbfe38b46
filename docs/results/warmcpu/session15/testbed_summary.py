"""Per model and policy of testbed result dirs (``logs/ue*.json``): warm medians (requests 1.. of each stream) of
latency_ms, cpu_ms, the calling thread's CPU (``thread_cpu_ms["main"]``, with COINFER_BENCH_THREAD_CPU=1), plan_ms,
plan_cpu_ms, the background decision's CPU outside the request (``plan_bg_cpu_ms``); the requests whose plan_ms
is over 5 % of their latency (warm / all), and those with plan_cpu_ms over 5 % (what the decision itself costs); and
why each coinfer request planned. ``python testbed_summary.py LABEL=DIR ...`` prints a markdown table and writes
testbed_summary.json beside this script."""

import glob
import json
import statistics
import sys
from pathlib import Path


def med(rs: list[dict], f) -> float:
    xs = [f(r) for r in rs]
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else float("nan")


def summary(rs: list[dict]) -> dict:
    warm = rs[1:]
    over = [r for r in rs if r["plan_ms"] > 0.05 * r["latency_ms"]]
    return {"n_warm": len(warm),
            "latency_ms": med(warm, lambda r: r["latency_ms"]), "cpu_ms": med(warm, lambda r: r["cpu_ms"]),
            "main_cpu_ms": med(warm, lambda r: (r.get("thread_cpu_ms") or {}).get("main")),
            "plan_ms": med(warm, lambda r: r["plan_ms"]), "plan_cpu_ms": med(warm, lambda r: r["plan_cpu_ms"]),
            "plan_bg_cpu_ms": med(warm, lambda r: r.get("plan_bg_cpu_ms", 0.0)),
            "over5_warm": sum(1 for r in over if r["i"] >= 1), "over5_all": len(over), "n_all": len(rs),
            "cpu_over5_all": sum(1 for r in rs if r["plan_cpu_ms"] > 0.05 * r["latency_ms"]),
            "plan_ms_all": [round(r["plan_ms"], 2) for r in rs],
            "plan_cpu_ms_all": [round(r["plan_cpu_ms"], 3) for r in rs],
            "whys": [(r.get("plan_why") or "")[:48] for r in rs]}


def main(args: list[str]) -> None:
    rows: dict = {}
    print("| run | model | policy | warm n | latency ms | UE cpu_ms | main thread ms | plan_ms | plan_cpu_ms | "
          "bg decision CPU ms | plan_ms > 5 % (warm / all) | plan_cpu_ms > 5 % |")
    print("|---" * 12 + "|")
    for a in args:
        label, d = a.split("=", 1)
        for f in sorted(glob.glob(f"{d}/logs/ue*.json")):
            j = json.loads(Path(f).read_text())
            sp = j.get("spec")
            if not sp or "streams" not in j:
                continue
            model = sp.get("model", "?").split(":")[-1]
            for p, s in j["streams"].items():
                rs = s.get("requests", [])
                if len(rs) < 2:
                    continue
                o = summary(rs)
                rows.setdefault(label, {})[f"{model}/{p}"] = o
                print(f"| {label} | {model} | {p} | {o['n_warm']} | {o['latency_ms']} | {o['cpu_ms']} | "
                      f"{o['main_cpu_ms']} | {o['plan_ms']} | {o['plan_cpu_ms']} | {o['plan_bg_cpu_ms']} | "
                      f"{o['over5_warm']} / {o['over5_all']} of {o['n_all']} | {o['cpu_over5_all']} |")
    for label, r in rows.items():
        for k, o in r.items():
            if k.endswith("/coinfer"):
                print(f"{label} {k} plan_ms: {o['plan_ms_all']}\n    plan_cpu_ms: {o['plan_cpu_ms_all']}\n"
                      f"    why: {o['whys']}")
    (Path(__file__).parent / "testbed_summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
