"""Per-request plan_ms of ab.sh's six runs (before1-3, after1-3 .json here), side by side, and the totals."""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def main() -> None:
    rows: dict = {}
    for side in ("before", "after"):
        for i in (1, 2, 3):
            d = json.loads((HERE / f"{side}{i}.json").read_text())
            print(f"{side}{i}: commit {d['commit']} load {d['load_before'][0]:.2f}")
            for r in d["results"]:
                for q in r["requests"]:
                    got = rows.setdefault((r["model"], q["request"]), {}).setdefault(side, [])
                    got.append((q["plan_ms"], q["plan_cpu_ms"], q["plan_why"]))
    print("| model | request | before plan_ms (3 runs) | before plan_why | after plan_ms (3 runs) | after plan_why |")
    print("|---|---|---|---|---|---|")

    def why(xs):
        return "; ".join(dict.fromkeys(x[2] for x in xs))

    for (m, n), v in sorted(rows.items()):
        b, a = v["before"], v["after"]
        print(f"| {m} | {n} | {' / '.join(f'{x[0]:.2f}' for x in b)} | {why(b)} | "
              f"{' / '.join(f'{x[0]:.2f}' for x in a)} | {why(a)} |")
    for side in ("before", "after"):
        ms = [x[0] for v in rows.values() for x in v[side]]
        cpu = [x[1] for v in rows.values() for x in v[side]]
        print(f"{side}: {len(ms)} decisions, plan_ms median {statistics.median(ms):.3f}, p99 {pct(ms, 0.99):.3f}, "
              f"max {max(ms):.3f}; plan_cpu_ms median {statistics.median(cpu):.3f} max {max(cpu):.3f}; "
              f"> 1 ms: {sum(x > 1 for x in ms)}; > 5 ms: {sum(x > 5 for x in ms)}")


if __name__ == "__main__":
    main()
