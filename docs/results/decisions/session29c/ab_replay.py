# ruff: noqa: E501, SIM115  (measurement script of session 29c, kept as run)
"""Before / after side by side (session 29b's ``ab_replay.py``, its replay and recorded calls): replay the real client's
captured ``planning.choose`` calls (googlenet + resnet18, auto, 400 Mbit/s) in fresh processes, alternating checkouts,
ROUNDS rounds. Per call: the first pass's thread CPU (cold memos: a new process) and the median of 5 repeats.
Every answer is checked against the captured one (``same=True``) and each side's modules are checked to come from
its checkout. Writes ab_replay.json here.

    python ab_replay.py BEFORE_ROOT AFTER_ROOT [ROUNDS]
"""
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
S29B = HERE.parent / "session29b"
roots = {"before": sys.argv[1], "after": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 6
got = {s: {} for s in roots}
for side, root in roots.items():
    f = subprocess.run([sys.executable, "-c", "import ue_client.planning as p; print(p.__file__)"], cwd="/tmp",
                       env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, check=True).stdout.strip()
    assert f.startswith(str(Path(root).resolve())), (side, f)
for r in range(rounds):
    for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
        env = dict(os.environ, PYTHONPATH=roots[side])
        out = subprocess.run([sys.executable, str(S29B / "replay.py"), "--calls", str(S29B / "calls.pkl"), "--repeat", "5"],
                             cwd="/tmp", env=env, capture_output=True, text=True, check=True).stdout
        for ln in out.splitlines():
            m = re.match(r"(\d+) (\w+) ([\d.]+) \(real ([\d.]+)\) same=(\w+)", ln)
            if m:
                assert m.group(5) == "True", ln
                got[side].setdefault(int(m.group(1)), {"model": m.group(2), "first": [], "rep": [], "real": float(m.group(4))})["first"].append(float(m.group(3)))
            m = re.match(r"rep (\d+) (\w+) ([\d.]+)", ln)
            if m:
                got[side][int(m.group(1))]["rep"].append(float(m.group(3)))
print(f"{rounds} rounds per side; CPU ms (thread_time): first pass median [min-max] | repeats median")
print("| call | model | captured in the client (ms) | before first | after first | before repeats | after repeats |")
print("|---|---|---|---|---|---|---|")
for i in sorted(got["before"]):
    b, a = got["before"][i], got["after"][i]
    f = lambda xs: f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
    print(f"| {i} | {b['model']} | {b['real']:.3f} | {f(b['first'])} | {f(a['first'])} | {statistics.median(b['rep']):.3f} | {statistics.median(a['rep']):.3f} |")
json.dump(got, open(HERE / "ab_replay.json", "w"), indent=1)
