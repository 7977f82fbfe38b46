"""Side-by-side table of ``bench_request_plan.py`` JSONs: per model / policy / decision path, ``plan_cpu_ms``
median (n) of each run. Usage: ``python summarize_rp.py NAME=FILE.json [NAME=FILE.json ...]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

runs = [a.split("=", 1) for a in sys.argv[1:]]
data = {name: json.loads(Path(path).read_text())["summary"]["paths"] for name, path in runs}
keys = list(dict.fromkeys(k for d in data.values() for k in d if not k.endswith("after the first")))
print("| model / policy / path | " + " | ".join(name for name, _ in runs) + " |")
print("|---|" + "---|" * len(runs))
for k in keys:
    cells = []
    for name, _ in runs:
        v = data[name].get(k)
        cells.append("-" if v is None else f"{v['cpu_median_ms']:.3f} ({v['n']})")
    print(f"| {k} | " + " | ".join(cells) + " |")
