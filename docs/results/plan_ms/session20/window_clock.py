"""Where a CFS throttle lands relative to a timed window, by the order of the window's clock reads (session 20).

    flock /work/wt/.bench.lock .venv/bin/python docs/results/plan_ms/session20/window_clock.py [--cpus 0.1]
        [--rounds 150] [--busy-ms 3] [--window-us 100] [--json PATH]

A child process in a CPU cgroup of ``--cpus`` cores over 10 ms CFS periods (``testbed.cgroups.CpuCgroup``, root)
repeats: ``--busy-ms`` of CPU in a Python loop (a local run's stand-in: it spends the quota and the cgroup is
throttled), then one timed window of ``--window-us`` of CPU (a fixed loop, calibrated unthrottled), timed three ways
in turn:

- ``wall, then thread CPU``: ``perf_counter()`` then ``thread_time()`` at the start (the client's ``plan_ms`` window
  up to session 19: ``RemoteEngine._remote``), ``perf_counter()`` then ``thread_time()`` at the end;
- ``thread CPU, then wall``: ``thread_time()`` first at both ends (the client's since session 20): a quota overspent
  before the window is found before it opens, one overspent inside it is found before it closes;
- ``wall only``: ``perf_counter()`` at both ends, no ``thread_time()``.

``thread_time()`` reads CLOCK_THREAD_CPUTIME_ID, which makes the kernel account the thread's runtime now (not at the
next tick): a quota already overspent is found there, and the throttle starts inside whatever the read opens. The
table counts windows whose wall exceeded half a CFS period (5 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
KINDS = ("wall, then thread CPU", "thread CPU, then wall", "wall only")


def spin(n: int) -> None:
    x = 0
    for i in range(n):
        x += i


def calibrate(us: float) -> int:
    n = 1000
    while True:
        t = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t
        if dt > 0.02:
            return max(1, int(n * us * 1e-6 / dt))
        n *= 2


def child(a) -> int:
    win, busy = calibrate(a.window_us), calibrate(a.busy_ms * 1e3)
    print("READY", flush=True)
    sys.stdin.readline()
    pc, tt = time.perf_counter, time.thread_time
    rows = []
    for i in range(a.rounds * len(KINDS)):
        kind = KINDS[i % len(KINDS)]
        spin(busy)
        if kind == KINDS[0]:
            t0 = pc(); c0 = tt(); spin(win); t1 = pc(); c1 = tt()  # noqa: E702
        elif kind == KINDS[1]:
            c0 = tt(); t0 = pc(); spin(win); c1 = tt(); t1 = pc()  # noqa: E702
        else:
            c0 = c1 = 0.0
            t0 = pc(); spin(win); t1 = pc()  # noqa: E702
        rows.append((kind, (t1 - t0) * 1e3, (c1 - c0) * 1e3))
    print("RESULT " + json.dumps(rows), flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpus", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--busy-ms", type=float, default=3.0)
    ap.add_argument("--window-us", type=float, default=100.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        return child(a)
    sys.path.insert(0, str(ROOT))
    from testbed.cgroups import CpuCgroup

    cmd = [sys.executable, __file__, "--child", "--rounds", str(a.rounds), "--busy-ms", str(a.busy_ms),
           "--window-us", str(a.window_us)]
    load0 = os.getloadavg()
    with CpuCgroup(f"coinfer-winclock-{os.getpid()}", float(os.cpu_count() or 1)) as cg:
        p = cg.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not p.stdout.readline().startswith("READY"):
            return 1
        cg.set_cpus(a.cpus)
        period = cg.effective_period_us / 1e3
        p.stdin.write("go\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=600)
        stats = cg.throttle_stats()
    rows = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    print(f"{a.cpus:g} of a core, CFS period {period:g} ms, {a.rounds} windows per kind of ~{a.window_us:g} us of CPU "
          f"after {a.busy_ms:g} ms of busy CPU each; load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}; cgroup {stats}")
    print("| window timed as | windows | CPU ms median | wall ms median | wall > half a period | share |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for k in KINDS:
        rs = [r for r in rows if r[0] == k]
        over = sum(r[1] > period / 2 for r in rs)
        cpu = statistics.median(r[2] for r in rs) if k != KINDS[2] else float("nan")
        print(f"| {k} | {len(rs)} | {cpu:.3f} | {statistics.median(r[1] for r in rs):.3f} | {over} | "
              f"{over / len(rs):.0%} |")
        summary[k] = {"n": len(rs), "over_half_period": over, "wall_median_ms": statistics.median(r[1] for r in rs)}
    if a.json:
        a.json.write_text(json.dumps({"cpus": a.cpus, "period_ms": period, "rounds": a.rounds, "busy_ms": a.busy_ms,
                                      "window_us": a.window_us, "summary": summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
