# ruff: noqa: E501, SIM115  (measurement script of session 29c, kept as run)
"""The runs of ab_replay.py (JSON files given) pooled: per call, first pass median [min-max] and repeats median per side,
the paired (same round) difference after - before of the first pass, and the rounds where after was lower."""
import json
import statistics as st
import sys

runs = [json.load(open(p)) for p in sys.argv[1:]]
print(f"{len(runs)} runs pooled; CPU ms (thread_time)")
print("| call | model | before first | after first | paired after - before (first) | after lower | before repeats | after repeats |")
print("|---|---|---|---|---|---|---|---|")
for i in sorted(runs[0]["before"], key=int):
    b = [x for g in runs for x in g["before"][i]["first"]]
    a = [x for g in runs for x in g["after"][i]["first"]]
    rb = [x for g in runs for x in g["before"][i]["rep"]]
    ra = [x for g in runs for x in g["after"][i]["rep"]]
    d = [y - x for x, y in zip(b, a, strict=True)]
    f = lambda xs: f"{st.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
    print(f"| {i} | {runs[0]['before'][i]['model']} | {f(b)} | {f(a)} | {st.median(d):+.3f} | {sum(x < 0 for x in d)} of {len(d)} | {st.median(rb):.3f} | {st.median(ra):.3f} |")
