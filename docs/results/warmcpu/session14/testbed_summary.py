"""Warm medians (requests 1-7 of each stream) of latency_ms, cpu_ms, plan_ms, plan_cpu_ms per model and policy from
testbed result dirs: ``python testbed_summary.py testbed_after testbed_before`` (prints them; writes
testbed_summary.json here)."""

import glob
import json
import statistics
import sys
from pathlib import Path


def warm_medians(rs: list[dict]) -> dict:
    def med(k: str) -> float:
        return round(statistics.median(r[k] for r in rs), 3)

    return {"n": len(rs), "latency_ms": med("latency_ms"), "cpu_ms": med("cpu_ms"), "plan_ms": med("plan_ms"),
            "plan_cpu_ms": med("plan_cpu_ms"), "server_ops": med("server_ops"),
            "whys": [(r.get("plan_why") or "")[:10] for r in rs]}


def main(dirs: list[str]) -> None:
    rows: dict = {}
    for d in dirs:
        for f in sorted(glob.glob(f"{d}/logs/ue*.json")):
            j = json.loads(Path(f).read_text())
            sp = j.get("spec")
            if not sp or "streams" not in j:
                continue
            model = sp.get("model", "?").split(":")[-1]
            for p, s in j["streams"].items():
                rs = s.get("requests", [])[1:]
                if rs:
                    out = warm_medians(rs)
                    rows.setdefault(d, {})[f"{model}/{p}"] = out
                    print(d.split("/")[-1], model, p, out)
    Path("testbed_summary.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
