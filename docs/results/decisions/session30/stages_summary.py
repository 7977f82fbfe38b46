# ruff: noqa: E501, E741  (measurement script of session 30)
"""Medians per stage of ``stages.txt`` (session 29b's ``stages.py`` on this folder's calls.pkl, 3 processes per side,
alternating): before -> after, ms of thread CPU, first pass and the median of 10 repeats."""

import collections
import re
import statistics
from pathlib import Path

acc = collections.defaultdict(list)
side = None
for ln in (Path(__file__).resolve().parent / "stages.txt").read_text().splitlines():
    if ln.startswith("=="):
        side = ln.split()[1]
        continue
    m = re.match(r"(\d+) (\w+) (first|rep-med) ([\d.]+) (.*)", ln)
    if not m:
        continue
    call, kind = int(m.group(1)), m.group(3)
    acc[(side, call, kind, "total")].append(float(m.group(4)))
    for kv in m.group(5).split():
        k, v = kv.split("=")
        acc[(side, call, kind, k)].append(float(v))
labels = [
    "total",
    "scorer",
    "table.decide",
    "table.background",
    "suffix_targets",
    "invest",
    "prefetch",
    "gradual",
    "spread",
]
print("| call | pass | " + " | ".join(labels) + " |")
print("|---|---|" + "---|" * len(labels))
for call in sorted({k[1] for k in acc}):
    for kind in ("first", "rep-med"):
        row = [
            f"{statistics.median(acc[('before', call, kind, l)]):.3f} -> {statistics.median(acc[('after', call, kind, l)]):.3f}"
            for l in labels
        ]
        print(f"| {call} | {kind} | " + " | ".join(row) + " |")
