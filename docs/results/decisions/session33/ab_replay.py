# ruff: noqa: E501, SIM115  (measurement script of session 30)
"""Before / after side by side: session 29b's ``replay.py`` on session 30's ``calls.pkl`` (session 29b's six
recorded real-client calls + googlenet's request 2 and 3, ``make_calls.py``) in fresh processes, the two checkouts
alternating (which goes first alternates too), ROUNDS processes per side. Per call: the first pass's thread CPU
(a fresh process: cold memos, 32 MB written before each call to cool the caches; the calls before it in the file
ran first, as in a client) and the median of 5 repeats. Every answer is checked against the recorded one
(``same=True``: server set, prediction, background) and each side's modules are checked to come from its checkout.
Writes ab_replay.json and ab_replay.md here.

    python ab_replay.py BEFORE_ROOT AFTER_ROOT [ROUNDS]
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPLAY = HERE.parent / "session29b" / "replay.py"  # (session 30's script, copied: it writes here)
CALLS = HERE.parent / "session30" / "calls.pkl"
NAMES = {
    0: "connect",
    1: "held ahead",
    2: "connect",
    3: "held ahead",
    4: "request 2",
    5: "request 3",
    6: "connect, 200 Mbit/s",
    7: "request 2, 200 Mbit/s",
    8: "request 3, 200 Mbit/s",
}
roots = {"before": sys.argv[1], "after": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 16
got = {s: {} for s in roots}
for side, root in roots.items():
    f = subprocess.run(
        [sys.executable, "-c", "import ue_client.planning as p; print(p.__file__)"],
        cwd="/tmp",
        env=dict(os.environ, PYTHONPATH=root),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f.startswith(str(Path(root).resolve())), (side, f)
t0 = time.time()
load = []
for r in range(rounds):
    for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
        env = dict(os.environ, PYTHONPATH=roots[side])
        out = subprocess.run(
            [sys.executable, str(REPLAY), "--calls", str(CALLS), "--repeat", "5"],
            cwd="/tmp",
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for ln in out.splitlines():
            m = re.match(r"(\d+) (\w+) ([\d.]+) \(real ([\d.na]+)\) same=(\w+)", ln)
            if m:
                assert m.group(5) == "True", (side, ln)
                got[side].setdefault(int(m.group(1)), {"model": m.group(2), "first": [], "rep": []})["first"].append(
                    float(m.group(3))
                )
            m = re.match(r"rep (\d+) (\w+) ([\d.]+)", ln)
            if m:
                got[side][int(m.group(1))]["rep"].append(float(m.group(3)))
    load.append(os.getloadavg()[0])
lines = [
    f"{rounds} processes per side, alternating; {time.strftime('%H:%M', time.gmtime(t0))}-{time.strftime('%H:%M', time.gmtime())} UTC, "
    f"load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores. CPU ms (thread_time).",
    "",
    "| call | model | first pass before | first pass after | after / before (medians) | paired after - before | after lower | repeats before | repeats after | after / before |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for i in sorted(got["before"]):
    b, a = got["before"][i], got["after"][i]
    f = lambda xs: f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"
    mb, ma = statistics.median(b["first"]), statistics.median(a["first"])
    rb, ra = statistics.median(b["rep"]), statistics.median(a["rep"])
    d = statistics.median(x - y for x, y in zip(a["first"], b["first"], strict=True))
    lower = sum(x < y for x, y in zip(a["first"], b["first"], strict=True))
    lines.append(
        f"| {i} ({NAMES.get(i, '')}) | {b['model']} | {f(b['first'])} | {f(a['first'])} | {ma / mb:.2f} | {d:+.3f} | "
        f"{lower} of {rounds} | {rb:.3f} | {ra:.3f} | {ra / rb:.2f} |"
    )
print("\n".join(lines))
(HERE / "ab_replay.md").write_text("\n".join(lines) + "\n")
json.dump({"roots": roots, "rounds": rounds, "load": load, "got": got}, open(HERE / "ab_replay.json", "w"), indent=1)
